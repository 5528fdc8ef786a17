//! The runtime of one hub on one node: its registry, its backplane subscriptions, local-first
//! fan-out, and what to do with messages other nodes publish.
//!
//! Sends deliver to matching *local* connections at once (encoding once per protocol through
//! one shared `PreparedMessage`), then publish to the backplane for the other nodes. A node
//! ignores its own messages when they come back (`origin`), so local recipients get each
//! message exactly once and without a backplane round trip. Nothing here awaits a client
//! socket: delivery is `try_push` into bounded outbound queues.
//!
//! Feed events of a hub with history (`HubOptions::history`: the feed hub) are the
//! exception: they are appended to the user's history and come back through the node's own
//! subscription, checked by the user's cursor (see [`super::history`]).

use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;

use crate::backplane::channel::{ChannelScheme, ChannelTarget};
use crate::backplane::{Backplane, BackplaneError, BackplaneMessage, BackplanePayload, Channel};
use crate::connection::ConnectionHandle;
use crate::ids::{ConnectionId, GroupName, UserId};
use crate::metrics::{inc, METRICS};
use crate::protocol::{HubMessage, Invocation, PreparedMessage, Value};

use super::aspnet::AspNetLink;
use super::history::{CursorCell, HistoryStats};
use super::registry::Registry;
use super::subscriptions::Subscriptions;
use super::{HubDefinition, HubError};
use crate::backplane::FeedAppend;

/// Who a send addresses (`Clients.X` in ASP.NET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every connection of the hub, except some.
    All {
        /// Excluded connections.
        except: Vec<ConnectionId>,
    },
    /// Some connections.
    Connections(Vec<ConnectionId>),
    /// Every connection of some users.
    Users(Vec<UserId>),
    /// Members of some groups, except some connections.
    Groups {
        /// The groups.
        groups: Vec<GroupName>,
        /// Excluded connections.
        except: Vec<ConnectionId>,
    },
}

/// Why [`HubLifetime::connect`] refused a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The user holds `max_connections_per_user` connections here already.
    #[error("{}", user_cap_message(*.0))]
    UserLimit(usize),
    /// The backplane subscription failed.
    #[error(transparent)]
    Backplane(#[from] BackplaneError),
}

/// What a client over the per-user cap is told (negotiate error, handshake error, Close).
pub fn user_cap_message(max: usize) -> String {
    format!("Too many connections for this user (at most {max} per user on this server). Close another connection and try again.")
}

/// One hub's runtime on this node.
pub struct HubLifetime {
    pub(super) def: HubDefinition,
    pub(super) registry: Registry,
    pub(super) subs: Arc<Subscriptions>,
    pub(super) backplane: Arc<dyn Backplane>,
    pub(super) scheme: ChannelScheme,
    /// This runtime itself, for the tasks it spawns (gap repairs).
    pub(super) me: Weak<HubLifetime>,
    /// Per user with local connections: the last delivered feed position.
    pub(super) cursors: DashMap<UserId, CursorCell>,
    pub(super) history_stats: HistoryStats,
    /// Memberships of local users in groups kept by the backplane (`admin`).
    pub(super) user_groups: super::admin::UserGroups,
    /// ASP.NET backplane interop (`HubOptions::aspnet`), see [`super::aspnet`].
    pub(super) aspnet: Option<AspNetLink>,
}

impl std::fmt::Debug for HubLifetime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubLifetime")
            .field("path", &self.def.path)
            .finish_non_exhaustive()
    }
}

impl HubLifetime {
    /// The runtime for `def` on a node using `backplane`.
    pub fn new(def: HubDefinition, backplane: Arc<dyn Backplane>) -> Arc<HubLifetime> {
        let aspnet = def
            .options
            .aspnet
            .as_ref()
            .map(|o| AspNetLink::new(o, backplane.node_id()));
        let mut scheme = ChannelScheme::with_prefix(
            &def.options.channel_prefix,
            &def.path,
            def.options.user_channels.clone(),
        );
        if let Some(link) = &aspnet {
            scheme = scheme.with_aspnet(link.channels.clone());
        }
        let subs = Subscriptions::new(backplane.clone(), def.options.unsubscribe_debounce);
        Arc::new_cyclic(|me| HubLifetime {
            def,
            registry: Registry::new(),
            subs,
            backplane,
            scheme,
            me: me.clone(),
            cursors: DashMap::new(),
            history_stats: HistoryStats::default(),
            user_groups: super::admin::UserGroups::default(),
            aspnet,
        })
    }

    /// Subscribes the hub-wide channel (and, with ASP.NET interop, ASP.NET's `all`,
    /// `internal:groups` and this node's `ack` and `return` channels). Call once before
    /// serving; on failure nothing is held, so it can be called again.
    pub async fn start(&self) -> Result<(), BackplaneError> {
        let mut channels = vec![self.scheme.all()];
        if let Some(link) = &self.aspnet {
            channels.extend(link.hub_channels());
        }
        let results =
            futures_util::future::join_all(channels.iter().map(|ch| self.subs.acquire(ch))).await;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            for ch in channels {
                self.subs.release(ch, true);
            }
            return Err(e);
        }
        Ok(())
    }

    /// The channels of a group: its own, and ASP.NET's for a hub with interop.
    fn group_channels(&self, group: &GroupName) -> Vec<Channel> {
        let mut channels = vec![self.scheme.group(group)];
        if let Some(a) = self.scheme.aspnet() {
            channels.push(a.group(group));
        }
        channels
    }

    /// This node's ASP.NET server name for this hub, for a hub with interop.
    pub fn aspnet_server_name(&self) -> Option<&str> {
        self.aspnet.as_ref().map(|l| l.server.as_str())
    }

    /// The hub declaration.
    pub fn definition(&self) -> &HubDefinition {
        &self.def
    }

    /// The registry of local connections.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The channel naming of this hub.
    pub fn scheme(&self) -> &ChannelScheme {
        &self.scheme
    }

    /// The backplane.
    pub fn backplane(&self) -> &Arc<dyn Backplane> {
        &self.backplane
    }

    /// Registers a connection and subscribes its user's and its own channel; returns once the
    /// subscriptions are active. Refused when its user already holds
    /// `max_connections_per_user` connections here.
    pub async fn connect(&self, conn: &ConnectionHandle) -> Result<(), ConnectError> {
        let max = self.def.options.max_connections_per_user;
        let Ok(first_for_user) = self.registry.insert_capped(conn, max) else {
            inc(&METRICS.refused_user_cap);
            return Err(ConnectError::UserLimit(max));
        };
        let mut channels = vec![self.scheme.connection(&conn.id)];
        if let Some(user) = conn.user_id() {
            channels.push(self.scheme.user(user));
        }
        if let Some(a) = self.scheme.aspnet() {
            channels.push(a.connection(&conn.id));
            if let Some(user) = conn.user_id() {
                channels.push(a.user(user));
            }
        }
        // Both subscriptions at once: with a network backplane they share one round trip.
        let results =
            futures_util::future::join_all(channels.iter().map(|ch| self.subs.acquire(ch))).await;
        if results.iter().any(Result::is_err) {
            let mut first_error = None;
            for (ch, r) in channels.into_iter().zip(results) {
                // The count was raised even on failure; release everything this connection
                // holds.
                self.subs.release(ch, true);
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
            }
            if self.registry.remove(conn) {
                if let Some(user) = conn.user_id() {
                    self.drop_cursor(user);
                }
            }
            if let Some(e) = first_error {
                return Err(ConnectError::Backplane(e));
            }
        }
        if first_for_user {
            if let Some(user) = conn.user_id() {
                self.init_cursor(user);
            }
        }
        // The user's groups kept by the backplane (only where they are enabled).
        self.apply_user_groups(conn).await;
        METRICS
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        inc(&METRICS.connections_total);
        Ok(())
    }

    /// Unregisters a connection: leaves its groups, releases its channels, fails its pending
    /// client results.
    pub fn disconnect(&self, conn: &ConnectionHandle) {
        let groups = std::mem::take(&mut *conn.groups.lock().unwrap_or_else(|p| p.into_inner()));
        for g in groups {
            if self.registry.remove_from_group(&g, &conn.id).is_some() {
                for ch in self.group_channels(&g) {
                    self.subs.release(ch, false);
                }
            }
        }
        let last_for_user = self.registry.remove(conn);
        if let Some(user) = conn.user_id() {
            if last_for_user {
                self.drop_cursor(user);
                self.forget_user_groups(user);
            }
            self.subs.release(self.scheme.user(user), false);
            if let Some(a) = self.scheme.aspnet() {
                self.subs.release(a.user(user), false);
            }
        }
        self.subs.release(self.scheme.connection(&conn.id), true);
        if let Some(a) = self.scheme.aspnet() {
            self.subs.release(a.connection(&conn.id), true);
        }
        conn.fail_pending_results();
        conn.aborted.cancel();
        METRICS
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Invokes `method(args)` on every connection `target` addresses, on every node.
    pub async fn send(
        &self,
        target: &Target,
        method: &str,
        args: Vec<Value>,
    ) -> Result<(), HubError> {
        if let (Target::Users(users), true, [payload]) = (
            target,
            self.def.options.history && method == self.def.options.feed_target,
            args.as_slice(),
        ) {
            return self.send_feed(users, payload).await;
        }
        let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
            method,
            args.clone(),
        )));
        let mut remote: Vec<(Channel, Vec<ConnectionId>)> = Vec::new();
        let aspnet = self.aspnet.as_ref();
        match target {
            Target::All { except } => {
                self.registry.for_each(|c| {
                    if !except.contains(&c.id) {
                        let _ = c.send_prepared(&prepared);
                    }
                });
                remote.push((self.scheme.all(), except.clone()));
            }
            Target::Connections(ids) => {
                for id in ids {
                    match self.registry.get(id) {
                        Some(c) => {
                            let _ = c.send_prepared(&prepared);
                        }
                        None => remote.push((self.scheme.connection(id), Vec::new())),
                    }
                }
            }
            Target::Users(users) => {
                for u in users {
                    self.registry.for_each_of_user(u, |c| {
                        let _ = c.send_prepared(&prepared);
                    });
                    remote.push((self.scheme.user(u), Vec::new()));
                }
            }
            Target::Groups { groups, except } => {
                for g in groups {
                    self.registry.for_each_in_group(g, |c| {
                        if !except.contains(&c.id) {
                            let _ = c.send_prepared(&prepared);
                        }
                    });
                    remote.push((self.scheme.group(g), except.clone()));
                }
            }
        }
        if let Some(link) = aspnet {
            // Other servers (feedhub or ASP.NET) get it in ASP.NET's format only.
            return self
                .aspnet_publish_send(link, target, &prepared)
                .await
                .map_err(|e| HubError::Other {
                    kind: "IOException",
                    message: e.to_string(),
                });
        }
        let mut first_error = None;
        for (channel, exclude) in remote {
            let msg = Arc::new(BackplaneMessage {
                origin: self.backplane.node_id().to_string(),
                payload: BackplanePayload::Invocation {
                    target: method.to_string(),
                    arguments: args.clone(),
                    exclude,
                },
            });
            if let Err(e) = self.backplane.publish(&channel, msg).await {
                inc(&METRICS.backplane_errors);
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            None => Ok(()),
            Some(e) => Err(HubError::Other {
                kind: "IOException",
                message: e.to_string(),
            }),
        }
    }

    /// A feed invocation to users of a hub with history (`Clients.User(..).Send("FeedUpdated",
    /// payload)` from Rust): appended like any ingested event, without an id.
    async fn send_feed(&self, users: &[UserId], payload: &Value) -> Result<(), HubError> {
        let json = match payload {
            Value::Json(b) => b.clone(),
            other => bytes::Bytes::from(other.to_json_string().map_err(|e| HubError::Other {
                kind: "InvalidDataException",
                message: e.to_string(),
            })?),
        };
        let batch: Vec<FeedAppend> = users
            .iter()
            .map(|u| FeedAppend {
                user: u.as_str().to_string(),
                id: String::new(),
                payload: json.clone(),
                redelivered: false,
            })
            .collect();
        self.append_feed(&batch)
            .await
            .map(|_| ())
            .map_err(|e| HubError::Other {
                kind: "IOException",
                message: e.to_string(),
            })
    }

    /// Adds a connection (on any node) to a group.
    pub async fn add_to_group(&self, id: &ConnectionId, group: &GroupName) -> Result<(), HubError> {
        match self.registry.get(id) {
            Some(conn) => self.add_local_to_group(&conn, group).await,
            None => match &self.aspnet {
                Some(link) => self.aspnet_group_command(link, id, group, true).await,
                None => self.publish_group_command(id, group, true).await,
            },
        }
    }

    /// Removes a connection (on any node) from a group.
    pub async fn remove_from_group(
        &self,
        id: &ConnectionId,
        group: &GroupName,
    ) -> Result<(), HubError> {
        match self.registry.get(id) {
            Some(conn) => {
                self.remove_local_from_group(&conn, group);
                Ok(())
            }
            None => match &self.aspnet {
                Some(link) => self.aspnet_group_command(link, id, group, false).await,
                None => self.publish_group_command(id, group, false).await,
            },
        }
    }

    pub(super) async fn add_local_to_group(
        &self,
        conn: &ConnectionHandle,
        group: &GroupName,
    ) -> Result<(), HubError> {
        if conn.outbound.is_closing() {
            return Ok(());
        }
        // Every member holds one count on the group channel; the last one out unsubscribes.
        if self.registry.add_to_group(group, conn).is_some() {
            conn.groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(group.clone());
            let channels = self.group_channels(group);
            for (i, ch) in channels.iter().enumerate() {
                if let Err(e) = self.subs.acquire(ch).await {
                    // Counts were raised for channels[..=i] (even the failed one).
                    for ch in channels.iter().take(i + 1) {
                        self.subs.release(ch.clone(), false);
                    }
                    if self.registry.remove_from_group(group, &conn.id).is_some() {
                        conn.groups
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .retain(|g| g != group);
                    }
                    return Err(HubError::Other {
                        kind: "IOException",
                        message: e.to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    pub(super) fn remove_local_from_group(&self, conn: &ConnectionHandle, group: &GroupName) {
        if self.registry.remove_from_group(group, &conn.id).is_some() {
            conn.groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|g| g != group);
            for ch in self.group_channels(group) {
                self.subs.release(ch, false);
            }
        }
    }

    async fn publish_group_command(
        &self,
        id: &ConnectionId,
        group: &GroupName,
        add: bool,
    ) -> Result<(), HubError> {
        let msg = Arc::new(BackplaneMessage {
            origin: self.backplane.node_id().to_string(),
            payload: BackplanePayload::Group {
                connection: id.clone(),
                group: group.clone(),
                add,
            },
        });
        self.backplane
            .publish(&self.scheme.connection(id), msg)
            .await
            .map_err(|e| HubError::Other {
                kind: "IOException",
                message: e.to_string(),
            })
    }

    /// Invokes a client method on one local connection and waits for its result
    /// (ASP.NET's client results).
    pub async fn invoke_client(
        &self,
        id: &ConnectionId,
        method: &str,
        args: Vec<Value>,
        timeout: Duration,
    ) -> Result<Value, HubError> {
        let Some(conn) = self.registry.get(id) else {
            if let Some(link) = &self.aspnet {
                return self
                    .aspnet_invoke_remote(link, id, method, args, timeout)
                    .await;
            }
            return Err(HubError::Other {
                kind: "IOException",
                message: format!("Connection '{id}' does not exist."),
            });
        };
        let (invocation_id, rx) = conn.register_result();
        let msg = HubMessage::Invocation(Invocation {
            invocation_id: Some(invocation_id.clone()),
            ..Invocation::send(method, args)
        });
        if conn.send_prepared(&PreparedMessage::new(msg)).is_err() {
            conn.forget_result(&invocation_id);
            return Err(HubError::Other {
                kind: "IOException",
                message: format!("Connection '{id}' disconnected."),
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(HubError::Hub(e)),
            Ok(Err(_)) => Err(HubError::Other {
                kind: "IOException",
                message: format!("Connection '{id}' disconnected."),
            }),
            Err(_) => {
                conn.forget_result(&invocation_id);
                Err(HubError::new("Invocation canceled by the server."))
            }
        }
    }

    /// Handles a message another node (or a foreign publisher) sent on one of this hub's
    /// channels. Never waits.
    pub fn on_delivery(&self, target: &ChannelTarget, msg: &BackplaneMessage) {
        if let ChannelTarget::AspNet(t) = target {
            self.on_aspnet(t, msg);
            return;
        }
        if let BackplanePayload::Feed(feed) = &msg.payload {
            // Appended events come back to their origin too: one path, one order.
            self.on_feed(target, feed);
            return;
        }
        if !msg.origin.is_empty() && msg.origin == self.backplane.node_id() {
            return; // Delivered locally when it was sent.
        }
        match &msg.payload {
            BackplanePayload::Invocation {
                target: method,
                arguments,
                exclude,
            } => {
                let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
                    method.clone(),
                    arguments.clone(),
                )));
                self.deliver_local(target, &prepared, exclude);
            }
            BackplanePayload::RawJson(bytes) => match Value::json_checked(bytes.clone()) {
                Ok(v) => {
                    // A foreign `PUBLISH feed-<id> <json>`: live only, no offset, no history.
                    inc(&METRICS.feed_raw);
                    let prepared = PreparedMessage::new(HubMessage::Invocation(Invocation::send(
                        self.def.options.feed_target.clone(),
                        vec![v],
                    )));
                    self.deliver_local(target, &prepared, &[]);
                }
                Err(e) => {
                    inc(&METRICS.feed_rejected);
                    tracing::warn!(error = %e, "non-JSON payload on a user channel dropped");
                }
            },
            BackplanePayload::Group {
                connection,
                group,
                add,
            } => {
                if let Some(conn) = self.registry.get(connection) {
                    if *add {
                        // Subscribing awaits the backplane; run it off the dispatch worker.
                        let group = group.clone();
                        let this = self.subs.clone();
                        let channels = self.group_channels(&group);
                        if self.registry.add_to_group(&group, &conn).is_some() {
                            conn.groups
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(group.clone());
                            tokio::spawn(async move {
                                for ch in &channels {
                                    if let Err(e) = this.acquire(ch).await {
                                        tracing::warn!(error = %e, "group subscribe failed");
                                    }
                                }
                            });
                        }
                    } else {
                        self.remove_local_from_group(&conn, group);
                    }
                }
            }
            BackplanePayload::CloseConnection { connection, error } => {
                if let Some(conn) = self.registry.get(connection) {
                    conn.close(error.clone(), false);
                }
            }
            BackplanePayload::Membership {
                group,
                add,
                expires_ms,
            } => self.on_membership(target, group.as_ref(), *add, *expires_ms),
            BackplanePayload::CloseTargets { exclude, error } => {
                self.close_local(target, exclude, error);
            }
            // Handled by the node's relay router before hubs see deliveries.
            BackplanePayload::Relay(_) => {}
            // ASP.NET's format on one of feedhub's own channels: nobody should publish that.
            BackplanePayload::AspNet(_) => inc(&METRICS.backplane_malformed),
            BackplanePayload::Feed(_) => {}
        }
    }

    fn deliver_local(
        &self,
        target: &ChannelTarget,
        prepared: &PreparedMessage,
        exclude: &[ConnectionId],
    ) {
        let push = |c: &ConnectionHandle| {
            if !exclude.contains(&c.id) {
                let _ = c.send_prepared(prepared);
            }
        };
        match target {
            ChannelTarget::All => self.registry.for_each(push),
            ChannelTarget::User(u) => self.registry.for_each_of_user(u, push),
            ChannelTarget::Group(g) => self.registry.for_each_in_group(g, push),
            ChannelTarget::Connection(id) => {
                if let Some(c) = self.registry.get(id) {
                    push(&c);
                }
            }
            ChannelTarget::AspNet(_) => {}
        }
    }
}
