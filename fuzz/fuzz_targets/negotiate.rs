//! cargo-fuzz target `negotiate`: see `feedhub::fuzzing::negotiate`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::negotiate(data));
