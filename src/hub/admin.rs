//! What a management API (the Azure SignalR data-plane REST API, `crate::azure`) asks of a
//! hub beyond sends, answered across every node: existence checks, a user's group
//! memberships (also for the connections the user opens later), removing from every group,
//! and closing connections by user, group or all.
//!
//! - **Existence** (connection, user, group): a local member answers at once; otherwise the
//!   backplane's subscriber count of the connection's, user's or group's channel says
//!   whether another node holds one (every node subscribes the channels of its
//!   connections, users and groups; `Backplane::subscribers`). This node's own subscription
//!   kept during the unsubscribe debounce is not counted; another node's is, so a user or
//!   group that just left another node may still count for that node's debounce.
//! - **User groups**: the memberships live in the backplane ([`Backplane::user_group_add`],
//!   shared by every node) with their end (a `ttl`, or a year without one, as the service
//!   does; `ttl = 0` adds only the user's current connections and keeps nothing). A change
//!   is applied here to the user's local connections and published on the user's channel as
//!   [`BackplanePayload::Membership`], so every node holding the user applies it to its
//!   own. A connection that opens later joins its user's groups in
//!   [`HubLifetime::apply_user_groups`] (called by `connect`). Each node remembers the ends
//!   of its local users' memberships and a sweeper removes their connections when one ends.
//! - **Close** by user, group or all: the local connections are closed at once, the others
//!   by [`BackplanePayload::CloseTargets`] on the user's, group's or hub-wide channel.
//!
//! Nothing here awaits a client socket; inbound commands are applied by the dispatch
//! worker without waiting (a group subscribe is spawned).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dashmap::DashMap;

use super::lifetime::HubLifetime;
use super::HubError;
use crate::backplane::channel::ChannelTarget;
use crate::backplane::{BackplaneError, BackplaneMessage, BackplanePayload, Channel};
use crate::connection::ConnectionHandle;
use crate::ids::{ConnectionId, GroupName, UserId};

/// How long a user's group membership added without a `ttl` lasts (the service's "1 year
/// at most").
pub const DEFAULT_USER_GROUP_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// How often ended user-group memberships are looked for.
pub const USER_GROUP_SWEEP: Duration = Duration::from_millis(250);

/// Which connections a close addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseScope {
    /// Every connection of the hub.
    All,
    /// A group's members.
    Group(GroupName),
    /// A user's connections.
    User(UserId),
}

/// Per hub and node: whether user groups are on, and the ends of the memberships of local
/// users (user → group → end in Unix ms).
#[derive(Debug, Default)]
pub struct UserGroups {
    enabled: AtomicBool,
    ends: DashMap<UserId, HashMap<GroupName, u64>>,
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn io_error(e: BackplaneError) -> HubError {
    HubError::Other {
        kind: "IOException",
        message: e.to_string(),
    }
}

impl HubLifetime {
    /// The key under which the backplane keeps this hub's user groups.
    fn user_group_scope(&self) -> String {
        format!("{}:{}", self.def.options.channel_prefix, self.def.path)
    }

    /// Turns on user groups kept in the backplane (the Azure REST API mounts them): new
    /// connections join their user's groups, and a sweeper removes connections from groups
    /// whose membership ended. Idempotent.
    pub fn enable_user_groups(self: &Arc<Self>) {
        if self.user_groups.enabled.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(USER_GROUP_SWEEP).await;
                let Some(hub) = me.upgrade() else { return };
                hub.sweep_user_groups(unix_ms());
            }
        });
    }

    /// Removes local connections from the groups whose user membership ended by `now_ms`.
    fn sweep_user_groups(&self, now_ms: u64) {
        let mut ended: Vec<(UserId, GroupName)> = Vec::new();
        self.user_groups.ends.retain(|user, groups| {
            groups.retain(|g, end| {
                let live = *end > now_ms;
                if !live {
                    ended.push((user.clone(), g.clone()));
                }
                live
            });
            !groups.is_empty()
        });
        for (user, group) in ended {
            self.registry.for_each_of_user(&user, |c| {
                self.remove_local_from_group(c, &group);
            });
        }
    }

    /// Remembers that local `user` is in `group` until `end` (a later end wins).
    fn note_end(&self, user: &UserId, group: &GroupName, end: u64) {
        self.user_groups
            .ends
            .entry(user.clone())
            .or_default()
            .insert(group.clone(), end);
    }

    /// Forgets the ends of a user without local connections.
    pub(super) fn forget_user_groups(&self, user: &UserId) {
        self.user_groups.ends.remove(user);
    }

    /// A new connection joins its user's groups (when user groups are on); failures are
    /// logged, the connection stays.
    pub(super) async fn apply_user_groups(&self, conn: &ConnectionHandle) {
        if !self.user_groups.enabled.load(Ordering::Acquire) {
            return;
        }
        let Some(user) = conn.user_id() else { return };
        let now = unix_ms();
        let groups = match self
            .backplane
            .user_groups(&self.user_group_scope(), user.as_str(), now)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(user = %user, error = %e, "user groups could not be read; the connection joins none");
                return;
            }
        };
        for ug in groups {
            let Ok(group) = GroupName::new(&ug.group) else {
                continue;
            };
            self.note_end(user, &group, ug.expires_ms);
            if let Err(e) = self.add_local_to_group(conn, &group).await {
                tracing::warn!(user = %user, group = %group, error = %e, "user group join failed");
            }
        }
    }

    /// Whether the connection exists on any node.
    pub async fn connection_exists(&self, id: &ConnectionId) -> Result<bool, HubError> {
        let local = self.registry.get(id).is_some();
        self.anywhere(self.scheme.connection(id), local).await
    }

    /// Whether the user has a connection on any node.
    pub async fn user_exists(&self, user: &UserId) -> Result<bool, HubError> {
        let local = self.registry.user_connection_count(user) > 0;
        self.anywhere(self.scheme.user(user), local).await
    }

    /// Whether the group has a member on any node.
    pub async fn group_exists(&self, group: &GroupName) -> Result<bool, HubError> {
        let local = self.registry.group_len(group) > 0;
        self.anywhere(self.scheme.group(group), local).await
    }

    /// `local`, or another node subscribes `channel` (this node's own lingering
    /// subscription not counted).
    async fn anywhere(&self, channel: Channel, local: bool) -> Result<bool, HubError> {
        if local {
            return Ok(true);
        }
        let counts = self
            .backplane
            .subscribers(std::slice::from_ref(&channel))
            .await
            .map_err(io_error)?;
        let n = counts.and_then(|c| c.first().copied()).unwrap_or(0);
        let mine = usize::from(self.subs.is_subscribed(&channel));
        Ok(n > mine)
    }

    /// Whether the user is in the group: a membership kept in the backplane, or a local
    /// connection of the user in the group. (A connection of the user added to the group by
    /// id on another node is not seen.)
    pub async fn user_in_group(&self, user: &UserId, group: &GroupName) -> Result<bool, HubError> {
        let mut local = false;
        self.registry.for_each_in_group(group, |c| {
            local |= c.user_id() == Some(user);
        });
        if local {
            return Ok(true);
        }
        let kept = self
            .backplane
            .user_groups(&self.user_group_scope(), user.as_str(), unix_ms())
            .await
            .map_err(io_error)?;
        Ok(kept.iter().any(|g| g.group == group.as_str()))
    }

    /// Adds a user to a group, on every node, for `ttl` (`None`: [`DEFAULT_USER_GROUP_TTL`];
    /// zero: only the user's current connections, nothing kept).
    pub async fn add_user_to_group(
        &self,
        user: &UserId,
        group: &GroupName,
        ttl: Option<Duration>,
    ) -> Result<(), HubError> {
        let ttl = ttl.unwrap_or(DEFAULT_USER_GROUP_TTL);
        let expires_ms = if ttl.is_zero() {
            None
        } else {
            let now = unix_ms();
            let end = now.saturating_add(ttl.as_millis() as u64);
            self.backplane
                .user_group_add(
                    &self.user_group_scope(),
                    user.as_str(),
                    group.as_str(),
                    end,
                    now,
                )
                .await
                .map_err(io_error)?;
            Some(end)
        };
        for conn in self.local_connections_of(user) {
            self.add_local_to_group(&conn, group).await?;
        }
        if let Some(end) = expires_ms {
            if self.registry.user_connection_count(user) > 0 {
                self.note_end(user, group, end);
            }
        }
        self.publish_command(
            self.scheme.user(user),
            BackplanePayload::Membership {
                group: Some(group.clone()),
                add: true,
                expires_ms,
            },
        )
        .await
    }

    /// Removes a user from a group (`None`: from every group), on every node: the kept
    /// membership and the user's connections.
    pub async fn remove_user_from_group(
        &self,
        user: &UserId,
        group: Option<&GroupName>,
    ) -> Result<(), HubError> {
        self.backplane
            .user_group_remove(
                &self.user_group_scope(),
                user.as_str(),
                group.map(GroupName::as_str),
            )
            .await
            .map_err(io_error)?;
        for conn in self.local_connections_of(user) {
            self.leave_local(&conn, group);
        }
        match group {
            Some(g) => {
                if let Some(mut groups) = self.user_groups.ends.get_mut(user) {
                    groups.remove(g);
                }
            }
            None => self.forget_user_groups(user),
        }
        self.publish_command(
            self.scheme.user(user),
            BackplanePayload::Membership {
                group: group.cloned(),
                add: false,
                expires_ms: None,
            },
        )
        .await
    }

    /// Removes a connection (on any node) from every group.
    pub async fn remove_connection_from_all_groups(
        &self,
        id: &ConnectionId,
    ) -> Result<(), HubError> {
        if let Some(conn) = self.registry.get(id) {
            self.leave_local(&conn, None);
            return Ok(());
        }
        self.publish_command(
            self.scheme.connection(id),
            BackplanePayload::Membership {
                group: None,
                add: false,
                expires_ms: None,
            },
        )
        .await
    }

    /// Closes a connection (on any node) with Close error `reason`.
    pub async fn close_connection(
        &self,
        id: &ConnectionId,
        reason: Option<String>,
    ) -> Result<(), HubError> {
        if let Some(conn) = self.registry.get(id) {
            conn.close(reason, false);
            return Ok(());
        }
        self.publish_command(
            self.scheme.connection(id),
            BackplanePayload::CloseConnection {
                connection: id.clone(),
                error: reason,
            },
        )
        .await
    }

    /// Closes every connection `scope` addresses, on every node, except `exclude`.
    pub async fn close_connections(
        &self,
        scope: &CloseScope,
        exclude: &[ConnectionId],
        reason: Option<String>,
    ) -> Result<(), HubError> {
        let (target, channel) = match scope {
            CloseScope::All => (ChannelTarget::All, self.scheme.all()),
            CloseScope::Group(g) => (ChannelTarget::Group(g.clone()), self.scheme.group(g)),
            CloseScope::User(u) => (ChannelTarget::User(u.clone()), self.scheme.user(u)),
        };
        self.close_local(&target, exclude, &reason);
        self.publish_command(
            channel,
            BackplanePayload::CloseTargets {
                exclude: exclude.to_vec(),
                error: reason,
            },
        )
        .await
    }

    /// Inbound [`BackplanePayload::CloseTargets`] (or a local close).
    pub(super) fn close_local(
        &self,
        target: &ChannelTarget,
        exclude: &[ConnectionId],
        reason: &Option<String>,
    ) {
        let close = |c: &ConnectionHandle| {
            if !exclude.contains(&c.id) {
                c.close(reason.clone(), false);
            }
        };
        match target {
            ChannelTarget::All => self.registry.for_each(close),
            ChannelTarget::User(u) => self.registry.for_each_of_user(u, close),
            ChannelTarget::Group(g) => self.registry.for_each_in_group(g, close),
            ChannelTarget::Connection(id) => {
                if let Some(c) = self.registry.get(id) {
                    close(&c);
                }
            }
            // Closes travel on feedhub's own channels only (an interop hub subscribes both).
            ChannelTarget::AspNet(_) => {}
        }
    }

    /// Inbound [`BackplanePayload::Membership`]: applied to the channel's local connections
    /// (a user's, or one). Never waits: a group subscribe runs in a task.
    pub(super) fn on_membership(
        &self,
        target: &ChannelTarget,
        group: Option<&GroupName>,
        add: bool,
        expires_ms: Option<u64>,
    ) {
        let conns: Vec<ConnectionHandle> = match target {
            ChannelTarget::User(u) => self.local_connections_of(u),
            ChannelTarget::Connection(id) => self.registry.get(id).into_iter().collect(),
            _ => return,
        };
        if conns.is_empty() {
            return;
        }
        match (add, group) {
            (true, Some(g)) => {
                if let (ChannelTarget::User(u), Some(end)) = (target, expires_ms) {
                    self.note_end(u, g, end);
                }
                let Some(me) = self.me.upgrade() else { return };
                let g = g.clone();
                tokio::spawn(async move {
                    for conn in conns {
                        if let Err(e) = me.add_local_to_group(&conn, &g).await {
                            tracing::warn!(group = %g, error = %e, "group join failed");
                        }
                    }
                });
            }
            (true, None) => {}
            (false, group) => {
                for conn in &conns {
                    self.leave_local(conn, group);
                }
                if let ChannelTarget::User(u) = target {
                    match group {
                        Some(g) => {
                            if let Some(mut groups) = self.user_groups.ends.get_mut(u) {
                                groups.remove(g);
                            }
                        }
                        None => self.forget_user_groups(u),
                    }
                }
            }
        }
    }

    /// A local connection leaves `group` (`None`: every group it is in).
    fn leave_local(&self, conn: &ConnectionHandle, group: Option<&GroupName>) {
        match group {
            Some(g) => self.remove_local_from_group(conn, g),
            None => {
                let groups = conn
                    .groups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                for g in &groups {
                    self.remove_local_from_group(conn, g);
                }
            }
        }
    }

    fn local_connections_of(&self, user: &UserId) -> Vec<ConnectionHandle> {
        let mut out = Vec::new();
        self.registry
            .for_each_of_user(user, |c| out.push(c.clone()));
        out
    }

    async fn publish_command(
        &self,
        channel: Channel,
        payload: BackplanePayload,
    ) -> Result<(), HubError> {
        let msg = Arc::new(BackplaneMessage {
            origin: self.backplane.node_id().to_string(),
            payload,
        });
        self.backplane
            .publish(&channel, msg)
            .await
            .map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use crate::backplane::memory::{MemoryBackplane, MemoryBus};
    use crate::backplane::{Backplane, Inbox};

    #[tokio::test]
    async fn memory_user_groups_expire_and_are_capped() {
        let (inbox, _rx) = Inbox::new(1, 8);
        let bp = MemoryBackplane::new(MemoryBus::new(), "n", inbox);
        bp.user_group_add("s", "u", "a", 2_000, 1_000)
            .await
            .unwrap();
        bp.user_group_add("s", "u", "b", 5_000, 1_000)
            .await
            .unwrap();
        bp.user_group_add("s2", "u", "c", 5_000, 1_000)
            .await
            .unwrap();
        let mut got: Vec<String> = bp
            .user_groups("s", "u", 1_500)
            .await
            .unwrap()
            .into_iter()
            .map(|g| g.group)
            .collect();
        got.sort();
        assert_eq!(got, ["a", "b"]);
        let got = bp.user_groups("s", "u", 2_000).await.unwrap();
        assert_eq!(got.len(), 1, "a ended at 2000");
        bp.user_group_remove("s", "u", Some("b")).await.unwrap();
        assert!(bp.user_groups("s", "u", 2_000).await.unwrap().is_empty());
        for i in 0..(crate::backplane::MAX_USER_GROUPS + 5) {
            bp.user_group_add("s", "v", &format!("g{i}"), 10_000 + i as u64, 0)
                .await
                .unwrap();
        }
        let kept = bp.user_groups("s", "v", 0).await.unwrap();
        assert_eq!(kept.len(), crate::backplane::MAX_USER_GROUPS);
        assert!(
            kept.iter().all(|g| g.expires_ms >= 10_005),
            "soonest dropped"
        );
        bp.user_group_remove("s", "v", None).await.unwrap();
        assert!(bp.user_groups("s", "v", 0).await.unwrap().is_empty());
    }
}
