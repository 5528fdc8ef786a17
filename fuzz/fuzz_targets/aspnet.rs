//! cargo-fuzz target `aspnet`: see `feedhub::fuzzing::aspnet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::aspnet(data));
