//! cargo-fuzz target `envelope`: see `feedhub::fuzzing::envelope`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::envelope(data));
