//! The `feedhub` binary.
fn main() {}
