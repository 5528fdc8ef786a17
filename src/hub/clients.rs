//! `Clients` and `Groups`: choosing who receives a client-method call, the way ASP.NET's
//! `IHubCallerClients` and `IGroupManager` do. Used from hub methods (with a caller) and from
//! outside any connection (`IHubContext`: the feed ingest, the HTTP publish API).
//!
//! An id that is not valid (empty, too long) can match no connection, so a send to it is a
//! no-op, as a send to an unknown connection is in ASP.NET.

use std::sync::Arc;

use super::lifetime::Target;
use super::method::{FromArg, IntoArgs};
use super::{HubError, HubLifetime};
use crate::connection::ConnectionHandle;
use crate::ids::{ConnectionId, GroupName, UserId};

fn conn_ids<S: AsRef<str>>(ids: impl IntoIterator<Item = S>) -> Vec<ConnectionId> {
    ids.into_iter()
        .filter_map(|s| ConnectionId::new(s.as_ref()).ok())
        .collect()
}

fn user_ids<S: AsRef<str>>(ids: impl IntoIterator<Item = S>) -> Vec<UserId> {
    ids.into_iter()
        .filter_map(|s| UserId::new(s.as_ref()).ok())
        .collect()
}

fn group_names<S: AsRef<str>>(ids: impl IntoIterator<Item = S>) -> Vec<GroupName> {
    ids.into_iter()
        .filter_map(|s| GroupName::new(s.as_ref()).ok())
        .collect()
}

/// Chooses recipients.
#[derive(Clone, Debug)]
pub struct Clients {
    lifetime: Arc<HubLifetime>,
    caller: Option<ConnectionHandle>,
}

impl Clients {
    pub(crate) fn new(lifetime: Arc<HubLifetime>, caller: Option<ConnectionHandle>) -> Clients {
        Clients { lifetime, caller }
    }

    fn proxy(&self, target: Target) -> ClientProxy {
        ClientProxy {
            lifetime: self.lifetime.clone(),
            target,
        }
    }

    fn caller_ids(&self) -> Vec<ConnectionId> {
        self.caller.iter().map(|c| c.id.clone()).collect()
    }

    /// Every connection of the hub.
    pub fn all(&self) -> ClientProxy {
        self.proxy(Target::All { except: Vec::new() })
    }

    /// Every connection except these.
    pub fn all_except<S: AsRef<str>>(&self, ids: impl IntoIterator<Item = S>) -> ClientProxy {
        self.proxy(Target::All {
            except: conn_ids(ids),
        })
    }

    /// The calling connection. Outside a hub call there is no caller and nothing is sent.
    pub fn caller(&self) -> SingleClientProxy {
        SingleClientProxy {
            lifetime: self.lifetime.clone(),
            id: self.caller.as_ref().map(|c| c.id.clone()),
        }
    }

    /// Every connection except the caller.
    pub fn others(&self) -> ClientProxy {
        self.proxy(Target::All {
            except: self.caller_ids(),
        })
    }

    /// One connection, on any node.
    pub fn client(&self, id: &str) -> SingleClientProxy {
        SingleClientProxy {
            lifetime: self.lifetime.clone(),
            id: ConnectionId::new(id).ok(),
        }
    }

    /// Some connections.
    pub fn clients<S: AsRef<str>>(&self, ids: impl IntoIterator<Item = S>) -> ClientProxy {
        self.proxy(Target::Connections(conn_ids(ids)))
    }

    /// Every connection of a user, on every node.
    pub fn user(&self, user_id: &str) -> ClientProxy {
        self.proxy(Target::Users(user_ids([user_id])))
    }

    /// Every connection of these users.
    pub fn users<S: AsRef<str>>(&self, user_ids_: impl IntoIterator<Item = S>) -> ClientProxy {
        self.proxy(Target::Users(user_ids(user_ids_)))
    }

    /// Members of a group.
    pub fn group(&self, name: &str) -> ClientProxy {
        self.proxy(Target::Groups {
            groups: group_names([name]),
            except: Vec::new(),
        })
    }

    /// Members of these groups (a connection in two of them receives the message twice, as
    /// in ASP.NET).
    pub fn groups<S: AsRef<str>>(&self, names: impl IntoIterator<Item = S>) -> ClientProxy {
        self.proxy(Target::Groups {
            groups: group_names(names),
            except: Vec::new(),
        })
    }

    /// Members of a group except these connections.
    pub fn group_except<S: AsRef<str>>(
        &self,
        name: &str,
        ids: impl IntoIterator<Item = S>,
    ) -> ClientProxy {
        self.proxy(Target::Groups {
            groups: group_names([name]),
            except: conn_ids(ids),
        })
    }

    /// Members of a group except the caller.
    pub fn others_in_group(&self, name: &str) -> ClientProxy {
        self.proxy(Target::Groups {
            groups: group_names([name]),
            except: self.caller_ids(),
        })
    }
}

/// A set of recipients.
#[derive(Clone, Debug)]
pub struct ClientProxy {
    lifetime: Arc<HubLifetime>,
    target: Target,
}

impl ClientProxy {
    /// Invokes `method(args)` on every recipient, without waiting for them (`SendAsync`).
    /// Returns once local recipients have it queued and the backplane accepted it.
    pub async fn send(&self, method: &str, args: impl IntoArgs) -> Result<(), HubError> {
        self.lifetime
            .send(&self.target, method, args.into_args())
            .await
    }
}

/// One connection.
#[derive(Clone, Debug)]
pub struct SingleClientProxy {
    lifetime: Arc<HubLifetime>,
    id: Option<ConnectionId>,
}

impl SingleClientProxy {
    /// Invokes `method(args)` on the connection without waiting for it.
    pub async fn send(&self, method: &str, args: impl IntoArgs) -> Result<(), HubError> {
        match &self.id {
            Some(id) => {
                self.lifetime
                    .send(
                        &Target::Connections(vec![id.clone()]),
                        method,
                        args.into_args(),
                    )
                    .await
            }
            None => Ok(()),
        }
    }

    /// Invokes `method(args)` on the connection and waits for its result (client results,
    /// `InvokeAsync<T>`). Fails with the client's error text, on timeout, or when the
    /// connection goes away.
    pub async fn invoke<T: FromArg>(
        &self,
        method: &str,
        args: impl IntoArgs,
    ) -> Result<T, HubError> {
        let Some(id) = &self.id else {
            return Err(HubError::Other {
                kind: "IOException",
                message: "Connection does not exist.".into(),
            });
        };
        let timeout = self.lifetime.definition().options.client_result_timeout;
        let value = self
            .lifetime
            .invoke_client(id, method, args.into_args(), timeout)
            .await?;
        T::from_value(value).map_err(|e| HubError::Other {
            kind: "InvalidOperationException",
            message: format!("Client result wasn't deserializable: {e:?}"),
        })
    }
}

/// Group membership (`Groups` in ASP.NET). Groups are not persisted: a connection leaves all
/// of them when it ends.
#[derive(Clone, Debug)]
pub struct Groups {
    lifetime: Arc<HubLifetime>,
}

impl Groups {
    pub(crate) fn new(lifetime: Arc<HubLifetime>) -> Groups {
        Groups { lifetime }
    }

    /// `AddToGroupAsync`: the connection may be on any node.
    pub async fn add(&self, connection_id: &str, group: &str) -> Result<(), HubError> {
        let (id, group) = ids(connection_id, group)?;
        self.lifetime.add_to_group(&id, &group).await
    }

    /// `RemoveFromGroupAsync`.
    pub async fn remove(&self, connection_id: &str, group: &str) -> Result<(), HubError> {
        let (id, group) = ids(connection_id, group)?;
        self.lifetime.remove_from_group(&id, &group).await
    }
}

fn ids(connection_id: &str, group: &str) -> Result<(ConnectionId, GroupName), HubError> {
    let id = ConnectionId::new(connection_id)
        .map_err(|e| HubError::new(format!("Invalid connection id: {e}")))?;
    let group =
        GroupName::new(group).map_err(|e| HubError::new(format!("Invalid group name: {e}")))?;
    Ok((id, group))
}
