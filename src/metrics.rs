//! Process-wide counters and gauges, rendered as Prometheus text at `/metrics`.
//!
//! Plain atomics: incrementing one is a single relaxed add on the hot path, and rendering
//! reads them without locks. Names follow Prometheus conventions (`_total` for counters).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::connection::outbound::PushError;

/// All metrics of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Connections currently open (after the handshake).
    pub connections: AtomicI64,
    /// Connections opened since start.
    pub connections_total: AtomicU64,
    /// Hub messages received from clients.
    pub messages_in: AtomicU64,
    /// Hub messages queued to clients.
    pub messages_out: AtomicU64,
    /// Messages dropped because a connection's queue was full.
    pub outbound_dropped: AtomicU64,
    /// Connections closed by the slow-consumer policy.
    pub slow_consumer_closes: AtomicU64,
    /// Protocol errors (malformed frames, handshakes, oversize messages).
    pub protocol_errors: AtomicU64,
    /// Hub method invocations that ended in an error.
    pub invocation_errors: AtomicU64,
    /// Requests rejected for authentication.
    pub auth_failures: AtomicU64,
    /// Backplane messages dropped because a dispatch queue was full.
    pub backplane_dropped: AtomicU64,
    /// Messages published to the backplane.
    pub backplane_published: AtomicU64,
    /// Messages received from the backplane.
    pub backplane_received: AtomicU64,
    /// Backplane publish failures.
    pub backplane_errors: AtomicU64,
    /// Backplane connected (1) or not (0); always 1 for the in-memory backplane.
    pub backplane_connected: AtomicI64,
    /// Channels this process is subscribed to on the external backplane.
    pub backplane_subscribed: AtomicI64,
    /// Backplane reconnects after a lost connection.
    pub backplane_reconnects: AtomicU64,
    /// Channels resubscribed after reconnects.
    pub backplane_resubscribed: AtomicU64,
    /// Duration of the last resubscribe, in milliseconds.
    pub backplane_resubscribe_ms: AtomicU64,
    /// Backplane messages dropped as malformed or oversized (feedhub envelopes).
    pub backplane_malformed: AtomicU64,
    /// ASP.NET backplane messages dropped as malformed, by channel kind
    /// ([`ASPNET_KINDS`] order).
    pub aspnet_malformed: [AtomicU64; 7],
    /// ASP.NET invocations not delivered to a connection because they had no serialization
    /// for its protocol.
    pub aspnet_missing_protocol: AtomicU64,
    /// ASP.NET group commands sent whose ack did not come in time.
    pub aspnet_ack_timeouts: AtomicU64,
    /// Feed events accepted (HTTP API or RabbitMQ).
    pub feed_events: AtomicU64,
    /// Feed events rejected as malformed.
    pub feed_rejected: AtomicU64,
    /// Stateful connections resumed on a new transport.
    pub stateful_resumes: AtomicU64,
    /// Messages written again after a stateful resume.
    pub stateful_resent: AtomicU64,
    /// Transports relayed to the owning node (requests that landed on another node).
    pub relays_opened: AtomicU64,
    /// Server-Sent Events and Long Polling requests forwarded to the node owning their
    /// connection.
    pub http_forwarded: AtomicU64,
    /// Forwarded requests the landing node failed because the owner's answer may have
    /// been lost (backplane outage, a gap, silence): 404 for a poll, a stream cut short.
    pub http_forwards_failed: AtomicU64,
    /// Connections ended by their owner because a forwarded poll answer or stream frame of
    /// theirs may have been lost.
    pub forwarded_connections_ended: AtomicU64,
    /// Feed events appended to a user's history.
    pub history_appends: AtomicU64,
    /// Redelivered feed events found already appended (not appended again).
    pub history_duplicates: AtomicU64,
    /// Duplicate feed events dropped by the node's cursors.
    pub feed_duplicates_dropped: AtomicU64,
    /// Feed events delivered without an offset (payload not a JSON object).
    pub feed_without_offset: AtomicU64,
    /// Raw (not feedhub-enveloped) messages on user channels delivered as is: no offset, no history.
    pub feed_raw: AtomicU64,
    /// History reads made to repair a gap or resync.
    pub gap_repairs: AtomicU64,
    /// Feed events delivered from history by gap repairs.
    pub gap_repaired_events: AtomicU64,
    /// Feed offsets given up: neither delivered live nor still in history.
    pub gap_lost_events: AtomicU64,
    /// `Recover` calls by result: recovered, not recovered, bad argument, failed.
    pub recover: [AtomicU64; 4],
    /// Open HTTP/WebSocket connections (admitted sockets).
    pub http_connections: AtomicI64,
    /// The total connection cap in force (after lowering it below the descriptor limit).
    pub http_connection_limit: AtomicI64,
    /// Connections refused at accept: total cap (503).
    pub refused_total_cap: AtomicU64,
    /// Connections refused at accept: per-address cap (429).
    pub refused_address_cap: AtomicU64,
    /// Negotiate/connect requests refused: per-address rate (429).
    pub refused_rate: AtomicU64,
    /// Negotiates (429) and connects (handshake error) refused: per-user cap.
    pub refused_user_cap: AtomicU64,
    /// WebSocket and SSE requests refused: Origin not allowed (403).
    pub refused_origin: AtomicU64,
    /// Connections closed: request head not complete in time.
    pub header_read_timeouts: AtomicU64,
    /// Connections closed: idle between requests.
    pub idle_timeouts: AtomicU64,
    /// Requests answered 408: body not complete in time.
    pub body_read_timeouts: AtomicU64,
    /// Connections without a request yet closed to make room at the total cap.
    pub evicted_fresh: AtomicU64,
}

/// The `result` labels of `feedhub_recover_total`, in [`Metrics::recover`] order.
pub const RECOVER_RESULTS: [&str; 4] = ["recovered", "not_recovered", "bad_argument", "error"];

/// The `kind` labels of ASP.NET messages in `feedhub_backplane_malformed_total`, in
/// [`Metrics::aspnet_malformed`] order: the channel they arrived on.
pub const ASPNET_KINDS: [&str; 7] = [
    "aspnet_all",
    "aspnet_user",
    "aspnet_group",
    "aspnet_connection",
    "aspnet_groups",
    "aspnet_ack",
    "aspnet_return",
];

/// The process's metrics.
pub static METRICS: Metrics = Metrics {
    connections: AtomicI64::new(0),
    connections_total: AtomicU64::new(0),
    messages_in: AtomicU64::new(0),
    messages_out: AtomicU64::new(0),
    outbound_dropped: AtomicU64::new(0),
    slow_consumer_closes: AtomicU64::new(0),
    protocol_errors: AtomicU64::new(0),
    invocation_errors: AtomicU64::new(0),
    auth_failures: AtomicU64::new(0),
    backplane_dropped: AtomicU64::new(0),
    backplane_published: AtomicU64::new(0),
    backplane_received: AtomicU64::new(0),
    backplane_errors: AtomicU64::new(0),
    backplane_connected: AtomicI64::new(0),
    backplane_subscribed: AtomicI64::new(0),
    backplane_reconnects: AtomicU64::new(0),
    backplane_resubscribed: AtomicU64::new(0),
    backplane_resubscribe_ms: AtomicU64::new(0),
    backplane_malformed: AtomicU64::new(0),
    aspnet_malformed: [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ],
    aspnet_missing_protocol: AtomicU64::new(0),
    aspnet_ack_timeouts: AtomicU64::new(0),
    feed_events: AtomicU64::new(0),
    feed_rejected: AtomicU64::new(0),
    stateful_resumes: AtomicU64::new(0),
    stateful_resent: AtomicU64::new(0),
    relays_opened: AtomicU64::new(0),
    http_forwarded: AtomicU64::new(0),
    http_forwards_failed: AtomicU64::new(0),
    forwarded_connections_ended: AtomicU64::new(0),
    history_appends: AtomicU64::new(0),
    history_duplicates: AtomicU64::new(0),
    feed_duplicates_dropped: AtomicU64::new(0),
    feed_without_offset: AtomicU64::new(0),
    feed_raw: AtomicU64::new(0),
    gap_repairs: AtomicU64::new(0),
    gap_repaired_events: AtomicU64::new(0),
    gap_lost_events: AtomicU64::new(0),
    recover: [
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    ],
    http_connections: AtomicI64::new(0),
    http_connection_limit: AtomicI64::new(0),
    refused_total_cap: AtomicU64::new(0),
    refused_address_cap: AtomicU64::new(0),
    refused_rate: AtomicU64::new(0),
    refused_user_cap: AtomicU64::new(0),
    refused_origin: AtomicU64::new(0),
    header_read_timeouts: AtomicU64::new(0),
    idle_timeouts: AtomicU64::new(0),
    body_read_timeouts: AtomicU64::new(0),
    evicted_fresh: AtomicU64::new(0),
};

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// Records the outcome of an outbound push.
    pub fn record_push(&self, result: &Result<(), PushError>) {
        match result {
            Ok(()) => inc(&self.messages_out),
            Err(PushError::Full) => inc(&self.outbound_dropped),
            Err(PushError::Closed) => {}
        }
    }

    /// Renders every metric in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let gauge = |out: &mut String, name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, c: &AtomicU64| {
            let v = c.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        // One counter with a label, one line per label value.
        let labelled = |out: &mut String,
                        name: &str,
                        help: &str,
                        label: &str,
                        values: &[(&str, &AtomicU64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (value, c) in values {
                let v = c.load(Ordering::Relaxed);
                let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {v}");
            }
        };
        gauge(
            &mut out,
            "feedhub_connections",
            "Open hub connections.",
            self.connections.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "feedhub_connections_total",
            "Hub connections opened.",
            &self.connections_total,
        );
        counter(
            &mut out,
            "feedhub_messages_in_total",
            "Hub messages received from clients.",
            &self.messages_in,
        );
        counter(
            &mut out,
            "feedhub_messages_out_total",
            "Hub messages queued to clients.",
            &self.messages_out,
        );
        counter(
            &mut out,
            "feedhub_outbound_dropped_total",
            "Messages dropped: connection queue full.",
            &self.outbound_dropped,
        );
        counter(
            &mut out,
            "feedhub_slow_consumer_closes_total",
            "Connections (or stateful transports) closed as slow consumers: outbound queue full or a write timed out.",
            &self.slow_consumer_closes,
        );
        counter(
            &mut out,
            "feedhub_stateful_resumes_total",
            "Stateful connections resumed on a new transport.",
            &self.stateful_resumes,
        );
        counter(
            &mut out,
            "feedhub_stateful_resent_total",
            "Messages resent after a stateful resume.",
            &self.stateful_resent,
        );
        counter(
            &mut out,
            "feedhub_relays_opened_total",
            "Transports relayed to the owning node (no sticky sessions).",
            &self.relays_opened,
        );
        counter(
            &mut out,
            "feedhub_http_forwarded_total",
            "Server-Sent Events and Long Polling requests forwarded to the owning node (no sticky sessions).",
            &self.http_forwarded,
        );
        counter(
            &mut out,
            "feedhub_http_forwards_failed_total",
            "Forwarded requests failed on the landing node because the owner's answer may have been lost (backplane outage, gap, silence).",
            &self.http_forwards_failed,
        );
        counter(
            &mut out,
            "feedhub_forwarded_connections_ended_total",
            "Connections their owner ended because a forwarded poll answer or stream frame may have been lost.",
            &self.forwarded_connections_ended,
        );
        counter(
            &mut out,
            "feedhub_protocol_errors_total",
            "Malformed handshakes, frames and messages.",
            &self.protocol_errors,
        );
        counter(
            &mut out,
            "feedhub_invocation_errors_total",
            "Hub invocations that failed.",
            &self.invocation_errors,
        );
        counter(
            &mut out,
            "feedhub_auth_failures_total",
            "Requests rejected with 401.",
            &self.auth_failures,
        );
        counter(
            &mut out,
            "feedhub_backplane_published_total",
            "Messages published to the backplane.",
            &self.backplane_published,
        );
        counter(
            &mut out,
            "feedhub_backplane_received_total",
            "Messages received from the backplane.",
            &self.backplane_received,
        );
        counter(
            &mut out,
            "feedhub_backplane_dropped_total",
            "Backplane messages dropped: dispatch queue full.",
            &self.backplane_dropped,
        );
        counter(
            &mut out,
            "feedhub_backplane_errors_total",
            "Backplane publish failures.",
            &self.backplane_errors,
        );
        gauge(
            &mut out,
            "feedhub_backplane_connected",
            "Redis backplane connected (1) or not (0).",
            self.backplane_connected.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "feedhub_backplane_subscribed_channels",
            "Channels subscribed on Redis.",
            self.backplane_subscribed.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "feedhub_backplane_reconnects_total",
            "Redis backplane reconnects after a lost connection.",
            &self.backplane_reconnects,
        );
        counter(
            &mut out,
            "feedhub_backplane_resubscribed_channels_total",
            "Channels resubscribed after Redis reconnects.",
            &self.backplane_resubscribed,
        );
        gauge(
            &mut out,
            "feedhub_backplane_last_resubscribe_milliseconds",
            "Duration of the last resubscribe after a Redis reconnect.",
            self.backplane_resubscribe_ms.load(Ordering::Relaxed) as i64,
        );
        let mut malformed = vec![("envelope", &self.backplane_malformed)];
        malformed.extend(ASPNET_KINDS.into_iter().zip(&self.aspnet_malformed));
        labelled(
            &mut out,
            "feedhub_backplane_malformed_total",
            "Backplane messages dropped as malformed or oversized, by kind (envelope: feedhub's own format; aspnet_*: ASP.NET's, by channel).",
            "kind",
            &malformed,
        );
        counter(
            &mut out,
            "feedhub_aspnet_missing_protocol_total",
            "ASP.NET backplane invocations not delivered to a connection: no serialization for its protocol.",
            &self.aspnet_missing_protocol,
        );
        counter(
            &mut out,
            "feedhub_aspnet_ack_timeouts_total",
            "ASP.NET group commands whose ack did not arrive in time.",
            &self.aspnet_ack_timeouts,
        );
        counter(
            &mut out,
            "feedhub_feed_events_total",
            "Feed events accepted.",
            &self.feed_events,
        );
        counter(
            &mut out,
            "feedhub_feed_rejected_total",
            "Feed events rejected as malformed.",
            &self.feed_rejected,
        );
        counter(
            &mut out,
            "feedhub_history_appends_total",
            "Feed events appended to a user's history.",
            &self.history_appends,
        );
        counter(
            &mut out,
            "feedhub_history_duplicates_total",
            "Redelivered feed events found already appended (not appended again).",
            &self.history_duplicates,
        );
        counter(
            &mut out,
            "feedhub_feed_duplicates_dropped_total",
            "Duplicate feed events dropped by the node's cursors.",
            &self.feed_duplicates_dropped,
        );
        counter(
            &mut out,
            "feedhub_feed_without_offset_total",
            "Feed events delivered without an offset (payload not a JSON object).",
            &self.feed_without_offset,
        );
        counter(
            &mut out,
            "feedhub_feed_raw_total",
            "Raw (not feedhub-enveloped) messages on user channels delivered as is: no offset, no history.",
            &self.feed_raw,
        );
        counter(
            &mut out,
            "feedhub_gap_repairs_total",
            "History reads made to repair a gap or resync.",
            &self.gap_repairs,
        );
        counter(
            &mut out,
            "feedhub_gap_repaired_events_total",
            "Feed events delivered from history by gap repairs.",
            &self.gap_repaired_events,
        );
        counter(
            &mut out,
            "feedhub_gap_lost_events_total",
            "Feed offsets given up: neither delivered live nor still in history.",
            &self.gap_lost_events,
        );
        let recover: Vec<_> = RECOVER_RESULTS.into_iter().zip(&self.recover).collect();
        labelled(
            &mut out,
            "feedhub_recover_total",
            "Recover calls by result.",
            "result",
            &recover,
        );
        gauge(
            &mut out,
            "feedhub_http_connections",
            "Open HTTP and WebSocket connections (admitted sockets).",
            self.http_connections.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "feedhub_http_connection_limit",
            "Total connection cap in force (below the descriptor limit).",
            self.http_connection_limit.load(Ordering::Relaxed),
        );
        labelled(
            &mut out,
            "feedhub_http_refused_total",
            "Connections and requests refused by a limit.",
            "reason",
            &[
                ("total_cap", &self.refused_total_cap),
                ("address_cap", &self.refused_address_cap),
                ("address_rate", &self.refused_rate),
                ("user_cap", &self.refused_user_cap),
                ("origin", &self.refused_origin),
            ],
        );
        labelled(
            &mut out,
            "feedhub_http_timeouts_total",
            "Connections closed or requests ended by a time limit.",
            "kind",
            &[
                ("header_read", &self.header_read_timeouts),
                ("idle", &self.idle_timeouts),
                ("body_read", &self.body_read_timeouts),
                ("evicted_at_cap", &self.evicted_fresh),
            ],
        );
        crate::ingest::amqp::AMQP_METRICS.render(&mut out);
        crate::tls::TLS_METRICS.render(&mut out);
        out
    }
}
