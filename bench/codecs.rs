//! Criterion benchmark of the JSON and MessagePack codecs.
fn main() {}
