//! cargo-fuzz target `relay`: see `feedhub::fuzzing::relay`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::relay(data));
