//! feedhub: a SignalR-protocol-compatible hub server.
#![warn(missing_docs)]

pub mod protocol;
pub mod auth;
pub mod backplane;
pub mod connection;
pub mod hub;
pub mod ids;
pub mod metrics;
pub mod session;
pub mod transport;
