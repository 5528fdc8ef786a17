//! cargo-fuzz target `handshake`: see `feedhub::fuzzing::handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::handshake(data));
