//! cargo-fuzz target `feed_event`: see `feedhub::fuzzing::feed_event`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| feedhub::fuzzing::feed_event(data));
