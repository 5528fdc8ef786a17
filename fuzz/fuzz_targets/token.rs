//! cargo-fuzz target `token`: see `feedhub::fuzzing::token`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::token(data));
