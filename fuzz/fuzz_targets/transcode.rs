//! cargo-fuzz target `transcode`: see `feedhub::fuzzing::transcode`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::transcode(data));
