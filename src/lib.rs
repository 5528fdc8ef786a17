//! feedhub: a SignalR-protocol-compatible hub server.
#![warn(missing_docs)]

pub mod protocol;
