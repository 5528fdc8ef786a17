//! cargo-fuzz target `json`: see `feedhub::fuzzing::json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::json(data));
