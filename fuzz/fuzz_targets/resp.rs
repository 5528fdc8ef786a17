//! cargo-fuzz target `resp`: see `feedhub::fuzzing::resp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::resp(data));
