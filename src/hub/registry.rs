//! The node-local registry of one hub: connection id → connection, user id → that user's
//! connections, group → members. O(1) lookups by user (ASP.NET's default manager scans every
//! connection for a user send).
//!
//! `insert`/`remove` and the group operations report first/last transitions so the caller can
//! subscribe or unsubscribe the matching backplane channel.

use std::collections::HashMap;

use dashmap::DashMap;

use crate::connection::ConnectionHandle;
use crate::ids::{ConnectionId, GroupName, UserId};

/// The registry.
#[derive(Debug, Default)]
pub struct Registry {
    connections: DashMap<ConnectionId, ConnectionHandle>,
    users: DashMap<UserId, Vec<ConnectionHandle>>,
    groups: DashMap<GroupName, HashMap<ConnectionId, ConnectionHandle>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a connection. Returns true if it is its user's first connection here.
    pub fn insert(&self, conn: &ConnectionHandle) -> bool {
        self.insert_capped(conn, 0).unwrap_or(false)
    }

    /// [`Registry::insert`] unless the connection's user already has `max` connections here
    /// (`0`: no cap): then `Err(())` and nothing is added. The check and the insert happen
    /// under the user's entry lock, so concurrent connects cannot overshoot.
    #[allow(clippy::result_unit_err)]
    pub fn insert_capped(&self, conn: &ConnectionHandle, max: usize) -> Result<bool, ()> {
        let first = match conn.user_id() {
            Some(user) => {
                let mut entry = self.users.entry(user.clone()).or_default();
                if max > 0 && entry.len() >= max {
                    return Err(());
                }
                entry.push(conn.clone());
                entry.len() == 1
            }
            None => false,
        };
        self.connections.insert(conn.id.clone(), conn.clone());
        Ok(first)
    }

    /// Removes a connection. Returns true if it was its user's last connection here.
    pub fn remove(&self, conn: &ConnectionHandle) -> bool {
        self.connections.remove(&conn.id);
        let Some(user) = conn.user_id() else {
            return false;
        };
        let removed = self.users.remove_if_mut(user, |_, conns| {
            conns.retain(|c| c.id != conn.id);
            conns.is_empty()
        });
        removed.is_some()
    }

    /// A connection by id.
    pub fn get(&self, id: &ConnectionId) -> Option<ConnectionHandle> {
        self.connections.get(id).map(|c| c.clone())
    }

    /// Number of connections.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    /// Whether there are no connections.
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    /// Number of this user's connections here.
    pub fn user_connection_count(&self, user: &UserId) -> usize {
        self.users.get(user).map_or(0, |v| v.len())
    }

    /// Calls `f` for each of the user's connections.
    pub fn for_each_of_user(&self, user: &UserId, mut f: impl FnMut(&ConnectionHandle)) {
        if let Some(conns) = self.users.get(user) {
            conns.iter().for_each(&mut f);
        }
    }

    /// Calls `f` for each connection.
    pub fn for_each(&self, mut f: impl FnMut(&ConnectionHandle)) {
        self.connections.iter().for_each(|e| f(e.value()));
    }

    /// Calls `f` for each member of the group.
    pub fn for_each_in_group(&self, group: &GroupName, mut f: impl FnMut(&ConnectionHandle)) {
        if let Some(members) = self.groups.get(group) {
            members.values().for_each(&mut f);
        }
    }

    /// Adds a connection to a group. Returns `Some(first)` where `first` is true if it is
    /// the group's first member here; `None` if it was already a member.
    pub fn add_to_group(&self, group: &GroupName, conn: &ConnectionHandle) -> Option<bool> {
        let mut members = self.groups.entry(group.clone()).or_default();
        if members.contains_key(&conn.id) {
            return None;
        }
        members.insert(conn.id.clone(), conn.clone());
        Some(members.len() == 1)
    }

    /// Removes a connection from a group. Returns `Some(last)` where `last` is true if it
    /// was the group's last member here; `None` if it was not a member.
    pub fn remove_from_group(&self, group: &GroupName, id: &ConnectionId) -> Option<bool> {
        let mut was_member = false;
        let emptied = self.groups.remove_if_mut(group, |_, members| {
            was_member = members.remove(id).is_some();
            members.is_empty()
        });
        if emptied.is_some() {
            return Some(true);
        }
        was_member.then_some(false)
    }

    /// Number of members of a group here.
    pub fn group_len(&self, group: &GroupName) -> usize {
        self.groups.get(group).map_or(0, |m| m.len())
    }
}
