//! Backplane channel names. Pure.
//!
//! | what | channel |
//! |---|---|
//! | a user of the feed hub | `feed-<userId>` (the public contract: anyone may `PUBLISH feed-42 <json>`) |
//! | a user of another hub | `<prefix>:user:<userId>` |
//! | a group | `<prefix>:group:<name>` |
//! | every connection of a hub | `<prefix>:all` |
//! | one connection | `<prefix>:conn:<connectionId>` |
//! | one node (relay replies) | `feedhub:node:<nodeId>` ([`node_channel`]) |
//!
//! A hub with ASP.NET interop (`HubOptions::aspnet`) also uses ASP.NET's channels
//! (`C‖H:all`, `C‖H:user:{u}`, …, see [`super::aspnet`]); [`ChannelScheme::parse`] reports
//! them as [`ChannelTarget::AspNet`].
//!
//! `<prefix>` is `<channel prefix>:<hub path>` (for example `feedhub:/hubs/feed`); the channel
//! prefix is `HubOptions::channel_prefix` (default `feedhub`), so several deployments (or
//! test runs) can share one Redis. Names are used only
//! with plain SUBSCRIBE, never pattern subscriptions, so an id like `*` is literal.

use std::fmt;
use std::sync::Arc;

use super::aspnet::{AspNetChannels, AspNetTarget};
use crate::ids::{ConnectionId, GroupName, UserId};

/// A backplane channel name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

impl Channel {
    /// Wraps a channel name.
    pub fn new(name: &str) -> Channel {
        Channel(Arc::from(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({:?})", &*self.0)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The channel of one node: relayed transport bytes addressed to it.
pub fn node_channel(node_id: &str) -> Channel {
    Channel::new(&format!("feedhub:node:{node_id}"))
}

/// How a user's channel is named for one hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChannelStyle {
    /// `<user_prefix><userId>`, e.g. `feed-42`.
    Plain(String),
    /// `<prefix>:user:<userId>`.
    Prefixed,
}

/// What a channel addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelTarget {
    /// Every connection of a user.
    User(UserId),
    /// Members of a group.
    Group(GroupName),
    /// Every connection.
    All,
    /// One connection.
    Connection(ConnectionId),
    /// One of the hub's ASP.NET channels.
    AspNet(AspNetTarget),
}

/// The channel naming of one hub.
#[derive(Debug, Clone)]
pub struct ChannelScheme {
    prefix: String,
    users: UserChannelStyle,
    aspnet: Option<AspNetChannels>,
}

impl ChannelScheme {
    /// A scheme for the hub at `path` with the default channel prefix `feedhub`.
    pub fn new(path: &str, users: UserChannelStyle) -> ChannelScheme {
        ChannelScheme::with_prefix("feedhub", path, users)
    }

    /// A scheme for the hub at `path` whose non-user channels start with `prefix:`.
    pub fn with_prefix(prefix: &str, path: &str, users: UserChannelStyle) -> ChannelScheme {
        ChannelScheme {
            prefix: format!("{prefix}:{path}"),
            users,
            aspnet: None,
        }
    }

    /// This scheme, also recognising the ASP.NET channels of `aspnet`.
    pub fn with_aspnet(mut self, aspnet: AspNetChannels) -> ChannelScheme {
        self.aspnet = Some(aspnet);
        self
    }

    /// The ASP.NET channels, for a hub with ASP.NET interop.
    pub fn aspnet(&self) -> Option<&AspNetChannels> {
        self.aspnet.as_ref()
    }

    /// The channel of a user.
    pub fn user(&self, user: &UserId) -> Channel {
        match &self.users {
            UserChannelStyle::Plain(p) => Channel::new(&format!("{p}{user}")),
            UserChannelStyle::Prefixed => Channel::new(&format!("{}:user:{user}", self.prefix)),
        }
    }

    /// The channel of a group.
    pub fn group(&self, group: &GroupName) -> Channel {
        Channel::new(&format!("{}:group:{group}", self.prefix))
    }

    /// The hub-wide channel.
    pub fn all(&self) -> Channel {
        Channel::new(&format!("{}:all", self.prefix))
    }

    /// The channel of one connection.
    pub fn connection(&self, id: &ConnectionId) -> Channel {
        Channel::new(&format!("{}:conn:{id}", self.prefix))
    }

    /// What `channel` addresses, if it belongs to this hub.
    pub fn parse(&self, channel: &Channel) -> Option<ChannelTarget> {
        if let Some(t) = self.aspnet.as_ref().and_then(|a| a.parse(channel)) {
            return Some(ChannelTarget::AspNet(t));
        }
        let name = channel.as_str();
        if let UserChannelStyle::Plain(p) = &self.users {
            if let Some(user) = name.strip_prefix(p.as_str()) {
                return UserId::new(user).ok().map(ChannelTarget::User);
            }
        }
        let rest = name.strip_prefix(self.prefix.as_str())?.strip_prefix(':')?;
        if rest == "all" {
            return Some(ChannelTarget::All);
        }
        let (kind, id) = rest.split_once(':')?;
        match kind {
            "user" if self.users == UserChannelStyle::Prefixed => {
                UserId::new(id).ok().map(ChannelTarget::User)
            }
            "group" => GroupName::new(id).ok().map(ChannelTarget::Group),
            "conn" => ConnectionId::new(id).ok().map(ChannelTarget::Connection),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feed_user_channels_round_trip() {
        let s = ChannelScheme::new("/hubs/feed", UserChannelStyle::Plain("feed-".into()));
        let u = UserId::new("1002").unwrap();
        assert_eq!(s.user(&u).as_str(), "feed-1002");
        assert_eq!(s.parse(&s.user(&u)), Some(ChannelTarget::User(u)));
        let g = GroupName::new("a:b*").unwrap();
        assert_eq!(s.group(&g).as_str(), "feedhub:/hubs/feed:group:a:b*");
        assert_eq!(s.parse(&s.group(&g)), Some(ChannelTarget::Group(g)));
        assert_eq!(s.parse(&s.all()), Some(ChannelTarget::All));
        assert_eq!(s.parse(&Channel::new("feed-")), None, "empty user id");
        assert_eq!(s.parse(&Channel::new("other")), None);
    }

    #[test]
    fn prefixed_user_channels() {
        let s = ChannelScheme::new("/testhub", UserChannelStyle::Prefixed);
        let u = UserId::new("*").unwrap();
        assert_eq!(s.user(&u).as_str(), "feedhub:/testhub:user:*");
        assert_eq!(s.parse(&s.user(&u)), Some(ChannelTarget::User(u)));
        let c = ConnectionId::new("abc").unwrap();
        assert_eq!(
            s.parse(&s.connection(&c)),
            Some(ChannelTarget::Connection(c))
        );
        let other = ChannelScheme::new("/testhub2", UserChannelStyle::Prefixed);
        assert_eq!(other.parse(&s.all()), None, "another hub's channel");
    }

    #[test]
    fn aspnet_channels_are_recognised_first() {
        let s = ChannelScheme::new("/hubs/feed", UserChannelStyle::Plain("feed-".into()))
            .with_aspnet(AspNetChannels::new("", "feed-x.Hub"));
        let u = UserId::new("7").unwrap();
        assert_eq!(
            s.parse(&Channel::new("feed-x.Hub:user:7")),
            Some(ChannelTarget::AspNet(AspNetTarget::User(u.clone())))
        );
        assert_eq!(s.parse(&s.user(&u)), Some(ChannelTarget::User(u)));
    }
}
