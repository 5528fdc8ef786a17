//! ASP.NET Core SignalR Redis backplane interop of one hub (`HubOptions::aspnet`): feedhub
//! nodes and ASP.NET servers of the same hub type share one Redis, and each side's sends
//! reach the other side's clients. The wire format is [`crate::backplane::aspnet`].
//!
//! What a node does for a hub with interop, on top of its own channels:
//!
//! - **Subscriptions**, with the same reference counts as its own channels: `all`,
//!   `internal:groups`, its `ack` and `return` channels (at start), each local connection's
//!   `connection` channel and each local user's `user` channel (at connect), and each group
//!   with a local member (at join).
//! - **Inbound invocations** are pushed to each local recipient as the framed bytes of its
//!   protocol, copied as is (never re-encoded). A recipient whose protocol has no entry gets
//!   nothing, counted (`feedhub_aspnet_missing_protocol_total`).
//! - **Outbound sends** (hub sends from Rust and clients, not feed events) go out *only* in
//!   ASP.NET's format, with `json` and `messagepack` serializations, on ASP.NET's channels:
//!   feedhub nodes read them there as ASP.NET servers do, and skip their own echo by the
//!   origin tag ([`Origin::Send`]).
//! - **Feed events** (ingest, `FeedUpdated` sends on a hub with history) keep their
//!   history path (`feed-<id>`), and a copy goes to `H:user:{id}` tagged [`Origin::Feed`],
//!   which ASP.NET servers deliver and feedhub nodes skip (they have the event already).
//! - **Group commands** for a connection that is not local go out as ASP.NET group commands
//!   and wait for the ack ([`AspNetOptions::ack_timeout`](super::AspNetOptions)); commands
//!   for a local connection are applied (subscribe first) and then acked, as ASP.NET does.
//! - **Client results**: a 4-item invocation for a local connection is forwarded, and the
//!   client's completion is published on the caller's return channel; `invoke_client` for
//!   a connection that is not local publishes the 4-item form and waits on this node's own
//!   return channel.
//!
//! Malformed payloads are counted by channel kind (`feedhub_backplane_malformed_total`) and
//! skipped; nothing here blocks a dispatch worker (anything that awaits is spawned).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use super::lifetime::Target;
use super::{AspNetOptions, HubError, HubLifetime};
use crate::backplane::aspnet::{
    self, AspNetChannels, AspNetInvocation, AspNetTarget, GroupCommand, Origin,
};
use crate::backplane::{history::splice_offset, FeedAppend};
use crate::backplane::{Appended, BackplaneError, BackplaneMessage, BackplanePayload, Channel};
use crate::connection::ConnectionHandle;
use crate::ids::{ConnectionId, GroupName, UserId};
use crate::metrics::{inc, METRICS};
use crate::protocol::{
    Completion, CompletionResult, HubMessage, Invocation, PreparedMessage, ProtocolKind, Value,
};

/// Group commands and client results awaiting an answer, at most (beyond: refused).
const MAX_PENDING: usize = 10_000;

/// Largest completion frame accepted from a return channel.
const MAX_COMPLETION_BYTES: usize = 1024 * 1024;

/// The interop state of one hub on one node.
pub(super) struct AspNetLink {
    pub(super) channels: AspNetChannels,
    /// This node's server name for this hub (`{node}_{32 hex}`, new per start).
    pub(super) server: String,
    ack_timeout: Duration,
    next_id: AtomicI64,
    acks: Mutex<HashMap<i64, oneshot::Sender<()>>>,
    results: Mutex<HashMap<String, oneshot::Sender<CompletionResult>>>,
    /// Client result calls from other servers forwarded to local clients and not answered
    /// yet (each holds a pending result on its connection and a waiting task).
    forwarded: Arc<AtomicUsize>,
    malformed_logged: AtomicU64,
}

/// Releases one forwarded client result call's slot.
struct ForwardSlot(Arc<AtomicUsize>);

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AspNetLink {
    pub(super) fn new(options: &AspNetOptions, node: &str) -> AspNetLink {
        AspNetLink {
            channels: AspNetChannels::new(&options.channel_prefix, &options.hub_type),
            server: aspnet::server_name(node),
            ack_timeout: options.ack_timeout,
            next_id: AtomicI64::new(1),
            acks: Mutex::new(HashMap::new()),
            results: Mutex::new(HashMap::new()),
            forwarded: Arc::new(AtomicUsize::new(0)),
            malformed_logged: AtomicU64::new(0),
        }
    }

    /// The channels a node holds for the hub's whole life.
    pub(super) fn hub_channels(&self) -> Vec<Channel> {
        vec![
            self.channels.all(),
            self.channels.groups(),
            self.channels.ack(&self.server),
            self.channels.return_channel(&self.server),
        ]
    }

    fn lock_acks(&self) -> std::sync::MutexGuard<'_, HashMap<i64, oneshot::Sender<()>>> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_results(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<CompletionResult>>> {
        self.results.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kind_index(t: &AspNetTarget) -> usize {
    match t {
        AspNetTarget::All => 0,
        AspNetTarget::User(_) => 1,
        AspNetTarget::Group(_) => 2,
        AspNetTarget::Connection(_) => 3,
        AspNetTarget::Groups => 4,
        AspNetTarget::Ack(_) => 5,
        AspNetTarget::Return(_) => 6,
    }
}

fn io_error(message: String) -> HubError {
    HubError::Other {
        kind: "IOException",
        message,
    }
}

/// `json` and `messagepack` serializations of a prepared message (a protocol whose
/// encoding fails is left out).
fn serializations(prepared: &PreparedMessage) -> Vec<(String, Bytes)> {
    ProtocolKind::ALL
        .into_iter()
        .filter_map(|k| {
            prepared
                .bytes_for(k)
                .ok()
                .map(|b| (k.name().to_string(), b))
        })
        .collect()
}

impl HubLifetime {
    pub(super) fn aspnet_malformed(&self, target: &AspNetTarget, why: &str) {
        inc(&METRICS.aspnet_malformed[kind_index(target)]);
        let n = self
            .aspnet
            .as_ref()
            .map_or(0, |l| l.malformed_logged.fetch_add(1, Ordering::Relaxed));
        // The first and then every 1000th: a hostile publisher must not flood the log.
        if n % 1000 == 0 {
            tracing::warn!(hub = %self.def.path, kind = metrics_kind(target), reason = why,
                count = n + 1, "malformed ASP.NET backplane message dropped");
        }
    }

    async fn publish_aspnet(
        &self,
        channel: &Channel,
        payload: Vec<u8>,
    ) -> Result<Option<usize>, BackplaneError> {
        let msg = Arc::new(BackplaneMessage {
            origin: self.backplane.node_id().to_string(),
            payload: BackplanePayload::AspNet(Bytes::from(payload)),
        });
        let r = self.backplane.publish_reaching(channel, msg).await;
        if r.is_err() {
            inc(&METRICS.backplane_errors);
        }
        r
    }

    /// Publishes a send in ASP.NET's format for the recipients on other servers (local
    /// ones were served already).
    pub(super) async fn aspnet_publish_send(
        &self,
        link: &AspNetLink,
        target: &Target,
        prepared: &PreparedMessage,
    ) -> Result<(), BackplaneError> {
        let node = self.backplane.node_id().to_string();
        let tagged = |excluded: &[ConnectionId]| {
            aspnet::encode_invocation(&AspNetInvocation {
                excluded: excluded.iter().map(|c| c.as_str().to_string()).collect(),
                serializations: serializations(prepared),
                invocation_id: None,
                return_channel: None,
                origin: Some(Origin::Send(node.clone())),
            })
        };
        let mut out: Vec<(Channel, Vec<u8>)> = Vec::new();
        match target {
            Target::All { except } => out.push((link.channels.all(), tagged(except.as_slice()))),
            Target::Users(users) => {
                let payload = tagged(&[] as &[ConnectionId]);
                for u in users {
                    out.push((link.channels.user(u), payload.clone()));
                }
            }
            Target::Groups { groups, except } => {
                let payload = tagged(except.as_slice());
                for g in groups {
                    out.push((link.channels.group(g), payload.clone()));
                }
            }
            Target::Connections(ids) => {
                // Published only for connections that are not local, so never echoed back:
                // plain 2 items, as ASP.NET writes them.
                let remote: Vec<&ConnectionId> = ids
                    .iter()
                    .filter(|id| self.registry.get(id).is_none())
                    .collect();
                if !remote.is_empty() {
                    let payload = aspnet::encode_invocation(&AspNetInvocation {
                        excluded: Vec::new(),
                        serializations: serializations(prepared),
                        invocation_id: None,
                        return_channel: None,
                        origin: None,
                    });
                    for id in remote {
                        out.push((link.channels.connection(id), payload.clone()));
                    }
                }
            }
        }
        let mut first_error = None;
        for (channel, payload) in out {
            if let Err(e) = self.publish_aspnet(&channel, payload).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Publishes ASP.NET copies of appended feed events on `H:user:{id}` (what feedhub's
    /// own clients get: the payload with its offset), tagged so feedhub nodes skip them.
    /// A failed copy is logged and counted; the append stands.
    pub(super) async fn aspnet_feed_copies(&self, batch: &[FeedAppend], done: &[Appended]) {
        let Some(link) = &self.aspnet else {
            return;
        };
        let node = self.backplane.node_id().to_string();
        let mut sends = Vec::new();
        for (event, appended) in batch.iter().zip(done) {
            if appended.duplicate {
                continue;
            }
            let Ok(user) = UserId::new(&event.user) else {
                continue;
            };
            let body = splice_offset(&event.payload, appended.offset)
                .unwrap_or_else(|| event.payload.clone());
            let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
                self.def.options.feed_target.clone(),
                vec![Value::json_unchecked(body)],
            )));
            let payload = aspnet::encode_invocation(&AspNetInvocation {
                excluded: Vec::new(),
                serializations: serializations(&prepared),
                invocation_id: None,
                return_channel: None,
                origin: Some(Origin::Feed(node.clone())),
            });
            sends.push((link.channels.user(&user), payload));
        }
        // Issued in order on one multiplexed connection: per-user order is kept.
        let results = futures_util::future::join_all(
            sends
                .into_iter()
                .map(|(ch, p)| async move { self.publish_aspnet(&ch, p).await }),
        )
        .await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            tracing::warn!(hub = %self.def.path, error = %e, "ASP.NET copy of a feed event not published");
        }
    }

    /// Adds or removes a connection on another server (feedhub or ASP.NET) with an ASP.NET
    /// group command, and waits for its ack.
    pub(super) async fn aspnet_group_command(
        &self,
        link: &AspNetLink,
        id: &ConnectionId,
        group: &GroupName,
        add: bool,
    ) -> Result<(), HubError> {
        let cmd_id = link.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut acks = link.lock_acks();
            if acks.len() >= MAX_PENDING {
                return Err(io_error("too many group commands awaiting acks".into()));
            }
            acks.insert(cmd_id, tx);
        }
        let payload = aspnet::encode_group_command(&GroupCommand {
            id: cmd_id,
            server: link.server.clone(),
            action: if add {
                aspnet::ACTION_ADD
            } else {
                aspnet::ACTION_REMOVE
            },
            group: group.as_str().to_string(),
            connection: id.as_str().to_string(),
        });
        if let Err(e) = self.publish_aspnet(&link.channels.groups(), payload).await {
            link.lock_acks().remove(&cmd_id);
            return Err(io_error(e.to_string()));
        }
        match tokio::time::timeout(link.ack_timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                link.lock_acks().remove(&cmd_id);
                inc(&METRICS.aspnet_ack_timeouts);
                Err(io_error(format!(
                    "Timed out waiting for the ack of group command {cmd_id} (connection '{id}' is on no server?)"
                )))
            }
        }
    }

    /// Invokes a client method on a connection of another server and waits for its result
    /// on this node's return channel.
    pub(super) async fn aspnet_invoke_remote(
        &self,
        link: &AspNetLink,
        id: &ConnectionId,
        method: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, HubError> {
        let invocation_id = crate::ids::random_token();
        let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation {
            invocation_id: Some(invocation_id.clone()),
            ..Invocation::send(method, args)
        }));
        let (tx, rx) = oneshot::channel();
        {
            let mut results = link.lock_results();
            if results.len() >= MAX_PENDING {
                return Err(io_error("too many client results pending".into()));
            }
            results.insert(invocation_id.clone(), tx);
        }
        let payload = aspnet::encode_invocation(&AspNetInvocation {
            excluded: Vec::new(),
            serializations: serializations(&prepared),
            invocation_id: Some(invocation_id.clone()),
            return_channel: Some(link.channels.logical_return(&link.server)),
            origin: None,
        });
        let forget = || {
            link.lock_results().remove(&invocation_id);
        };
        match self
            .publish_aspnet(&link.channels.connection(id), payload)
            .await
        {
            Ok(Some(0)) => {
                forget();
                return Err(io_error(format!("Connection '{id}' does not exist.")));
            }
            Ok(_) => {}
            Err(e) => {
                forget();
                return Err(io_error(e.to_string()));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(CompletionResult::Value(v))) => Ok(v),
            Ok(Ok(CompletionResult::Void)) => Ok(Value::null()),
            Ok(Ok(CompletionResult::Error(e))) => Err(HubError::Hub(e)),
            Ok(Err(_)) | Err(_) => {
                forget();
                Err(HubError::new("Invocation canceled by the server."))
            }
        }
    }

    /// A message on one of the hub's ASP.NET channels. Never waits.
    pub(super) fn on_aspnet(&self, target: &AspNetTarget, msg: &BackplaneMessage) {
        let Some(link) = &self.aspnet else {
            return;
        };
        let BackplanePayload::AspNet(bytes) = &msg.payload else {
            self.aspnet_malformed(target, "not in ASP.NET's format");
            return;
        };
        match target {
            AspNetTarget::All
            | AspNetTarget::User(_)
            | AspNetTarget::Group(_)
            | AspNetTarget::Connection(_) => match aspnet::decode_invocation(bytes) {
                Ok(inv) => self.on_aspnet_invocation(link, target, inv),
                Err(e) => self.aspnet_malformed(target, &e.to_string()),
            },
            AspNetTarget::Groups => match aspnet::decode_group_command(bytes) {
                Ok(cmd) => self.on_group_command(link, cmd),
                Err(e) => self.aspnet_malformed(target, &e.to_string()),
            },
            AspNetTarget::Ack(server) => {
                if *server != link.server {
                    return;
                }
                match aspnet::decode_ack(bytes) {
                    Ok(id) => {
                        if let Some(tx) = link.lock_acks().remove(&id) {
                            let _ = tx.send(());
                        }
                    }
                    Err(e) => self.aspnet_malformed(target, &e.to_string()),
                }
            }
            AspNetTarget::Return(server) => {
                if *server != link.server {
                    return;
                }
                match decode_return(bytes) {
                    Ok(c) => {
                        if let Some(tx) = link.lock_results().remove(&c.invocation_id) {
                            let _ = tx.send(c.result);
                        }
                    }
                    Err(e) => self.aspnet_malformed(target, &e),
                }
            }
        }
    }

    fn on_aspnet_invocation(
        &self,
        link: &AspNetLink,
        target: &AspNetTarget,
        mut inv: AspNetInvocation,
    ) {
        match &inv.origin {
            // Feed copies: feedhub nodes have the event from the feed channel, with history.
            Some(Origin::Feed(_)) => return,
            // This node's own send: delivered locally when it was sent.
            Some(Origin::Send(node)) if node == self.backplane.node_id() => return,
            _ => {}
        }
        // Frames go to sockets as they are: one whose framing is broken would desynchronise
        // the client's parser (its SignalR client then closes), so such entries are dropped
        // and counted (ASP.NET forwards them).
        let before = inv.serializations.len();
        inv.serializations.retain(|(name, frame)| {
            ProtocolKind::from_name(name).is_none_or(|k| well_framed(k, frame))
        });
        if inv.serializations.len() != before {
            self.aspnet_malformed(target, "an entry's frame is not framed for its protocol");
        }
        let push = |c: &ConnectionHandle| {
            if inv.excluded.iter().any(|e| e == c.id.as_str()) {
                return;
            }
            match inv.serialization(c.protocol.name()) {
                Some(frame) => {
                    let _ = c.send_bytes(frame.clone());
                }
                None => inc(&METRICS.aspnet_missing_protocol),
            }
        };
        match target {
            AspNetTarget::All => self.registry.for_each(push),
            AspNetTarget::User(u) => self.registry.for_each_of_user(u, push),
            AspNetTarget::Group(g) => self.registry.for_each_in_group(g, push),
            AspNetTarget::Connection(id) => {
                let Some(conn) = self.registry.get(id) else {
                    return;
                };
                match (&inv.invocation_id, &inv.return_channel) {
                    (Some(call), Some(ret)) => {
                        self.forward_client_result(link, conn, &inv, call, ret)
                    }
                    _ => push(&conn),
                }
            }
            _ => {}
        }
    }

    /// A client result call from another server for a local connection: forward the frame,
    /// then publish the client's completion on the caller's return channel.
    fn forward_client_result(
        &self,
        link: &AspNetLink,
        conn: ConnectionHandle,
        inv: &AspNetInvocation,
        call: &str,
        ret: &str,
    ) {
        let Some(frame) = inv.serialization(conn.protocol.name()) else {
            inc(&METRICS.aspnet_missing_protocol);
            return;
        };
        if link.forwarded.fetch_add(1, Ordering::Relaxed) >= MAX_PENDING {
            link.forwarded.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(conn_id = %conn.id, "too many client result calls pending; call dropped");
            return;
        }
        let slot = ForwardSlot(link.forwarded.clone());
        let rx = conn.register_result_as(call.to_string());
        if conn.send_bytes(frame.clone()).is_err() {
            conn.forget_result(call);
            return;
        }
        let Some(this) = self.me.upgrade() else {
            return;
        };
        let channel = link.channels.wire_of_logical(ret);
        let call = call.to_string();
        let timeout = self.def.options.client_result_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let result = match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(Ok(v))) => CompletionResult::Value(v),
                Ok(Ok(Err(e))) => CompletionResult::Error(e),
                Ok(Err(_)) => {
                    CompletionResult::Error(format!("Connection '{}' disconnected.", conn.id))
                }
                Err(_) => {
                    // The caller has its own timeout; it hears nothing, as from ASP.NET.
                    conn.forget_result(&call);
                    return;
                }
            };
            let msg = HubMessage::Completion(Completion {
                headers: Vec::new(),
                invocation_id: call,
                result,
            });
            let mut frame = Vec::new();
            if let Err(e) = conn.protocol.encode(&msg, &mut frame) {
                tracing::warn!(error = %e, "client result could not be encoded");
                return;
            }
            let payload = aspnet::encode_completion(conn.protocol.name(), &frame);
            if let Err(e) = this.publish_aspnet(&channel, payload).await {
                tracing::warn!(error = %e, "client result not published");
            }
        });
    }

    /// A group command: applied and acked if the connection is local; ignored otherwise (no
    /// ack), as ASP.NET does.
    fn on_group_command(&self, link: &AspNetLink, cmd: GroupCommand) {
        let Ok(id) = ConnectionId::new(&cmd.connection) else {
            return;
        };
        let Some(conn) = self.registry.get(&id) else {
            return;
        };
        let Some(this) = self.me.upgrade() else {
            return;
        };
        let ack = link.channels.ack(&cmd.server);
        tokio::spawn(async move {
            // An unusable group name cannot have members: nothing to apply, still acked.
            if let Ok(group) = GroupName::new(&cmd.group) {
                match cmd.action {
                    aspnet::ACTION_ADD => {
                        if let Err(e) = this.add_local_to_group(&conn, &group).await {
                            // No ack: the sender times out, as when ASP.NET fails.
                            tracing::warn!(error = %e, "group add from the ASP.NET backplane failed");
                            return;
                        }
                    }
                    aspnet::ACTION_REMOVE => this.remove_local_from_group(&conn, &group),
                    _ => {}
                }
            }
            if let Err(e) = this.publish_aspnet(&ack, aspnet::encode_ack(cmd.id)).await {
                tracing::warn!(error = %e, "group command ack not published");
            }
        });
    }
}

fn metrics_kind(t: &AspNetTarget) -> &'static str {
    crate::metrics::ASPNET_KINDS
        .get(kind_index(t))
        .copied()
        .unwrap_or("aspnet")
}

/// Whether `frame` is exactly one framed message of `protocol`: JSON text ending in its
/// only 0x1E (valid JSON never holds a raw 0x1E), or a VarInt length matching the rest.
fn well_framed(protocol: ProtocolKind, frame: &[u8]) -> bool {
    match protocol {
        ProtocolKind::Json => {
            frame.last() == Some(&0x1e) && frame.iter().filter(|&&b| b == 0x1e).count() == 1
        }
        ProtocolKind::MessagePack => matches!(
            crate::protocol::framing::read_varint(frame),
            Ok(Some((len, prefix))) if prefix.checked_add(len) == Some(frame.len())
        ),
    }
}

/// A return channel message: the completion inside, parsed with the protocol it names.
fn decode_return(bytes: &Bytes) -> Result<Completion, String> {
    let c = aspnet::decode_completion(bytes).map_err(|e| e.to_string())?;
    let kind = ProtocolKind::from_name(&c.protocol)
        .ok_or_else(|| format!("unknown protocol '{}'", c.protocol))?;
    let mut buf = BytesMut::from(&c.frame[..]);
    match kind.decode(&mut buf, MAX_COMPLETION_BYTES) {
        Ok(Some(HubMessage::Completion(done))) => Ok(done),
        Ok(Some(_)) => Err("not a completion".into()),
        Ok(None) => Err("truncated completion".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_checks() {
        assert!(well_framed(ProtocolKind::Json, b"{}\x1e"));
        assert!(!well_framed(ProtocolKind::Json, b"{}"));
        assert!(!well_framed(ProtocolKind::Json, b"{}\x1e{}\x1e"));
        assert!(!well_framed(ProtocolKind::Json, b""));
        assert!(well_framed(ProtocolKind::MessagePack, &[0x02, 0x91, 0x06]));
        assert!(!well_framed(ProtocolKind::MessagePack, &[0x03, 0x91, 0x06]));
        assert!(!well_framed(ProtocolKind::MessagePack, &[0x80]));
        assert!(!well_framed(ProtocolKind::MessagePack, &[]));
    }
}
