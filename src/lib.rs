//! feedhub: a SignalR-protocol-compatible hub server.
//!
//! The unchanged official SignalR clients (`@microsoft/signalr` with JSON or MessagePack,
//! the 1.x `@aspnet/signalr`, third-party clients) connect to feedhub as they would to
//! ASP.NET Core SignalR. Hubs are declared in Rust with [`hub::HubBuilder`]; the built-in
//! feed hub ([`feed`]) pushes feed events to every connection of a user, across instances.
//!
//! # Layout
//! - [`protocol`]: pure codecs (handshake, JSON and MessagePack hub protocols, framing,
//!   [`protocol::PreparedMessage`]). Bytes in, message or `Ok(None)` out; no I/O.
//! - [`transport`]: WebSocket frames in and out; knows nothing about hubs.
//! - [`connection`]: the handle the hub sees; the bounded outbound queue with its
//!   slow-consumer policy.
//! - [`session`]: the per-connection task: handshake, dispatch loop, keep-alive, close.
//! - [`hub`]: the typed hub API, the registry, reference-counted subscriptions, local fan-out.
//! - [`backplane`]: cross-node delivery behind one trait (in-memory here; Redis beside it).
//! - [`ingest`]: feed events from the HTTP publish API and RabbitMQ ([`ingest::amqp`]).
//! - [`http`]: hyper routing: negotiate, the three transports (WebSockets, Server-Sent
//!   Events, Long Polling), health, metrics, CORS; no sticky sessions: SSE and Long Polling
//!   requests that land on another instance are forwarded to the connection's instance over
//!   the backplane ([`http::forward`]), stateful WebSocket resumes relayed ([`http::relay`]);
//!   admission and time limits ([`http::limits`], [`http::conn`], [`http::origin`]); its
//!   state ([`http::state`]), built by [`app`]; services [`app`] mounts beside the hubs
//!   ([`http::mount`]: the demo, a REST API) and the helpers they share ([`http::respond`]).
//! - [`tls`]: TLS termination (rustls, PEM files reloaded on SIGHUP), per connection.
//! - [`azure`]: the Azure SignalR Service data-plane REST API and serverless client
//!   redirect (`--azure-access-key`).
//! - [`app`]: the composition root; [`auth`], [`ids`], [`metrics`], [`feed`].
//! - [`fuzzing`]: one entry point per parser of network or peer bytes, with its
//!   invariants (the cargo-fuzz targets in `fuzz/` and the corpus replay test call them).
//! - [`demo`]: the feed page's assets and its post service (development identities only).
//!
//! # Data path
//! A feed event (`POST /api/feed` or a RabbitMQ message) is decoded by
//! [`ingest::event`] and handed to [`ingest::deliver`], which calls
//! [`hub::HubLifetime::send`] for the recipients. That delivers at once to the recipients'
//! local connections, through one shared [`protocol::PreparedMessage`] encoded at most once
//! per protocol, by a non-waiting push into each connection's bounded outbound queue; and it
//! publishes the event on each recipient's backplane channel (`feed-<userId>`), which only
//! nodes holding that user subscribe to. On those nodes a dispatch worker
//! ([`backplane::Inbox`]) hands it to [`hub::HubLifetime::on_delivery`], which does the
//! same local delivery. Each connection's [`session`] task drains its queue and writes
//! everything queued as one WebSocket frame (or one SSE event, or one poll response).
//! Nothing on the shared path ever awaits a client socket.
#![warn(missing_docs)]

pub mod app;
pub mod auth;
pub mod azure;
pub mod backplane;
pub mod connection;
pub mod demo;
pub mod feed;
pub mod fuzzing;
pub mod http;
pub mod hub;
pub mod ids;
pub mod ingest;
pub mod metrics;
pub mod protocol;
pub mod session;
pub mod tls;
pub mod transport;

pub use app::{Server, ServerBuilder, ServerConfig};
