//! cargo-fuzz target `msgpack`: see `feedhub::fuzzing::msgpack`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::msgpack(data));
