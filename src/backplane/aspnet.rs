//! The wire format of ASP.NET Core SignalR's Redis backplane
//! (`Microsoft.AspNetCore.SignalR.StackExchangeRedis`), so feedhub can share a Redis with
//! ASP.NET servers of the same hub. Pure: channel names, and encode/decode of the five
//! message kinds. See `docs/aspnet-interop.md` Part A (the spec) and Part C (the vectors
//! the unit tests check byte for byte).
//!
//! Channels: `C‖H:all`, `C‖H:user:{u}`, `C‖H:group:{g}`, `C‖H:connection:{c}`,
//! `C‖H:internal:groups`, `C‖H:internal:ack:{server}`, `C‖H:internal:return:{server}`,
//! where `H` is the hub's CLR type name and `C` the StackExchange.Redis channel prefix,
//! prepended with no separator ([`AspNetChannels`]).
//!
//! Payloads (MessagePack; readers accept *at least* the items listed and skip the rest):
//!
//! | kind | channel | layout |
//! |---|---|---|
//! | invocation | all, user, group, connection | `[excluded ids, {protocol: bin(framed message)}]`, or 4 items adding `invocationId, returnChannel` (client results) |
//! | group command | internal:groups | `[id, serverName, action (1 add, 2 remove), group, connectionId]` |
//! | ack | internal:ack:{server} | `[id]` |
//! | completion | internal:return:{server} | `[protocol, bin(framed completion)]` |
//!
//! **feedhub's origin tag.** ASP.NET payloads carry no origin, so a feedhub node could not
//! tell its own publishes from others'. feedhub appends a fifth invocation item, the str
//! `fh:<node>` (a send: its publisher already delivered it locally) or `fh-feed:<node>` (a
//! feed event: every feedhub node gets it through `feed-<id>`, with history), with nil
//! items 3 and 4. ASP.NET accepts it: `ReadInvocation` requires at least 2 items, reads
//! items 3 and 4 with `ReadString` (nil gives null: no client result) only when there are
//! more than 3, and never looks further; only the connection handler uses items 3 and 4, and
//! feedhub never tags a connection-channel send.
//!
//! Decoding checks every declared count against the bytes left (nothing is allocated from
//! a declared count), slices bins out of the payload without copying, and never panics.

use bytes::Bytes;

use super::Channel;
use crate::ids::{ConnectionId, GroupName, UserId};
use crate::protocol::mp::{self, Item, Reader};

/// The protocol name of the JSON hub protocol in the serializations map.
pub const JSON: &str = "json";
/// The protocol name of the MessagePack hub protocol in the serializations map.
pub const MESSAGEPACK: &str = "messagepack";

const TAG_SEND: &str = "fh:";
const TAG_FEED: &str = "fh-feed:";

/// A payload that does not follow the ASP.NET layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed ASP.NET backplane message: {0}")]
pub struct AspNetError(pub String);

impl From<mp::MpError> for AspNetError {
    fn from(e: mp::MpError) -> Self {
        AspNetError(e.0)
    }
}

fn err(msg: impl Into<String>) -> AspNetError {
    AspNetError(msg.into())
}

// ---- channels ----

/// The channel names of one hub type under one channel prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AspNetChannels {
    /// `C‖H`: the channel prefix, then the hub type name.
    base: String,
    /// `H`.
    hub: String,
    /// `C`.
    prefix: String,
}

/// What an ASP.NET channel addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AspNetTarget {
    /// `H:all`.
    All,
    /// `H:user:{u}`.
    User(UserId),
    /// `H:group:{g}`.
    Group(GroupName),
    /// `H:connection:{c}`.
    Connection(ConnectionId),
    /// `H:internal:groups`.
    Groups,
    /// `H:internal:ack:{server}`.
    Ack(String),
    /// `H:internal:return:{server}`.
    Return(String),
}

impl AspNetChannels {
    /// The channels of hub type `hub` (`MyApp.Hubs.FeedHub`) under channel prefix `prefix`
    /// (usually empty).
    pub fn new(prefix: &str, hub: &str) -> AspNetChannels {
        AspNetChannels {
            base: format!("{prefix}{hub}"),
            hub: hub.to_string(),
            prefix: prefix.to_string(),
        }
    }

    /// The hub type name.
    pub fn hub(&self) -> &str {
        &self.hub
    }

    fn wire(&self, rest: &str) -> Channel {
        Channel::new(&format!("{}:{rest}", self.base))
    }

    /// `C‖H:all`.
    pub fn all(&self) -> Channel {
        self.wire("all")
    }

    /// `C‖H:user:{u}`.
    pub fn user(&self, user: &UserId) -> Channel {
        self.wire(&format!("user:{user}"))
    }

    /// `C‖H:group:{g}`.
    pub fn group(&self, group: &GroupName) -> Channel {
        self.wire(&format!("group:{group}"))
    }

    /// `C‖H:connection:{c}`.
    pub fn connection(&self, id: &ConnectionId) -> Channel {
        self.wire(&format!("connection:{id}"))
    }

    /// `C‖H:internal:groups`.
    pub fn groups(&self) -> Channel {
        self.wire("internal:groups")
    }

    /// `C‖H:internal:ack:{server}`.
    pub fn ack(&self, server: &str) -> Channel {
        self.wire(&format!("internal:ack:{server}"))
    }

    /// `C‖H:internal:return:{server}`.
    pub fn return_channel(&self, server: &str) -> Channel {
        self.wire(&format!("internal:return:{server}"))
    }

    /// The logical return channel `H:internal:return:{server}` (no prefix), as a client
    /// result call carries it.
    pub fn logical_return(&self, server: &str) -> String {
        format!("{}:internal:return:{server}", self.hub)
    }

    /// The wire channel of a logical name a peer sent (`C` prepended).
    pub fn wire_of_logical(&self, logical: &str) -> Channel {
        Channel::new(&format!("{}{logical}", self.prefix))
    }

    /// What `channel` addresses, if it is one of this hub's.
    pub fn parse(&self, channel: &Channel) -> Option<AspNetTarget> {
        let rest = channel
            .as_str()
            .strip_prefix(self.base.as_str())?
            .strip_prefix(':')?;
        if rest == "all" {
            return Some(AspNetTarget::All);
        }
        if rest == "internal:groups" {
            return Some(AspNetTarget::Groups);
        }
        if let Some(server) = rest.strip_prefix("internal:ack:") {
            return Some(AspNetTarget::Ack(server.to_string()));
        }
        if let Some(server) = rest.strip_prefix("internal:return:") {
            return Some(AspNetTarget::Return(server.to_string()));
        }
        let (kind, id) = rest.split_once(':')?;
        match kind {
            "user" => UserId::new(id).ok().map(AspNetTarget::User),
            "group" => GroupName::new(id).ok().map(AspNetTarget::Group),
            "connection" => ConnectionId::new(id).ok().map(AspNetTarget::Connection),
            _ => None,
        }
    }
}

/// A server name in ASP.NET's shape: `{name}_{32 lowercase hex digits}`, new per start.
pub fn server_name(node: &str) -> String {
    let n: u128 = rand::random();
    format!("{node}_{n:032x}")
}

// ---- messages ----

/// Who published an invocation, as far as feedhub can tell (its trailing tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A send of the feedhub node named: that node delivered it locally already.
    Send(String),
    /// A feed event published by the feedhub node named: feedhub nodes get it through the
    /// feed channel.
    Feed(String),
}

/// An invocation (all, user, group and connection channels).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AspNetInvocation {
    /// Connections that must not receive it.
    pub excluded: Vec<String>,
    /// Protocol name → framed hub message, in map order.
    pub serializations: Vec<(String, Bytes)>,
    /// A client result call's invocation id (item 3).
    pub invocation_id: Option<String>,
    /// A client result call's logical return channel (item 4).
    pub return_channel: Option<String>,
    /// feedhub's tag (item 5), if any.
    pub origin: Option<Origin>,
}

impl AspNetInvocation {
    /// The framed message for `protocol` (the first entry of that name wins).
    pub fn serialization(&self, protocol: &str) -> Option<&Bytes> {
        self.serializations
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, b)| b)
    }
}

/// Group command actions.
pub const ACTION_ADD: u8 = 1;
/// Group command actions.
pub const ACTION_REMOVE: u8 = 2;

/// A group command (`internal:groups`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupCommand {
    /// The sender's command id (acked with it).
    pub id: i64,
    /// The sender's server name (the ack goes to its ack channel).
    pub server: String,
    /// [`ACTION_ADD`] or [`ACTION_REMOVE`]; anything else is still acked.
    pub action: u8,
    /// The group.
    pub group: String,
    /// The connection.
    pub connection: String,
}

/// A client result's completion (`internal:return:{server}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The protocol the frame is in.
    pub protocol: String,
    /// The framed CompletionMessage.
    pub frame: Bytes,
}

fn write_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len();
    if let Ok(v) = u8::try_from(n) {
        out.extend_from_slice(&[0xc4, v]);
    } else if let Ok(v) = u16::try_from(n) {
        out.push(0xc5);
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        let v = u32::try_from(n).unwrap_or(u32::MAX);
        out.push(0xc6);
        out.extend_from_slice(&v.to_be_bytes());
    }
    out.extend_from_slice(b);
}

/// Encodes an invocation. The array has 2 items, 4 with a client result's id and return
/// channel, 5 with feedhub's origin tag.
pub fn encode_invocation(inv: &AspNetInvocation) -> Vec<u8> {
    let size: usize = 16
        + inv.excluded.iter().map(|e| e.len() + 2).sum::<usize>()
        + inv
            .serializations
            .iter()
            .map(|(n, b)| n.len() + b.len() + 8)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size + 64);
    let items = if inv.origin.is_some() {
        5
    } else if inv.invocation_id.is_some() || inv.return_channel.is_some() {
        4
    } else {
        2
    };
    mp::write_array_len(&mut out, items);
    mp::write_array_len(&mut out, inv.excluded.len());
    for id in &inv.excluded {
        mp::write_str(&mut out, id);
    }
    mp::write_map_len(&mut out, inv.serializations.len());
    for (name, frame) in &inv.serializations {
        mp::write_str(&mut out, name);
        write_bin(&mut out, frame);
    }
    if items > 2 {
        for s in [&inv.invocation_id, &inv.return_channel] {
            match s {
                Some(s) => mp::write_str(&mut out, s),
                None => mp::write_nil(&mut out),
            }
        }
    }
    if let Some(origin) = &inv.origin {
        let tag = match origin {
            Origin::Send(node) => format!("{TAG_SEND}{node}"),
            Origin::Feed(node) => format!("{TAG_FEED}{node}"),
        };
        mp::write_str(&mut out, &tag);
    }
    out
}

/// Reads an array header of at least `min` items that fit in what is left.
fn header(r: &mut Reader<'_>, min: u32, what: &str) -> Result<u32, AspNetError> {
    let n = r.array_len(what)?;
    if n < min {
        return Err(err(format!("Insufficient items in {what} array.")));
    }
    if n as usize > r.remaining() {
        // Every item takes at least one byte.
        return Err(err(format!("{what} array of {n} items is truncated")));
    }
    Ok(n)
}

/// Decodes an invocation.
pub fn decode_invocation(payload: &Bytes) -> Result<AspNetInvocation, AspNetError> {
    let mut r = Reader::new(payload);
    let len = header(&mut r, 2, "Invocation")?;
    let n = r.array_len("excluded ids")?;
    if n as usize > r.remaining() {
        return Err(err("excluded id list is truncated"));
    }
    let mut excluded = Vec::with_capacity(n as usize);
    for _ in 0..n {
        excluded.push(r.str("excluded id")?.to_string());
    }
    let n = r.map_len("serializations")?;
    if n as usize > r.remaining() / 2 {
        return Err(err("serializations map is truncated"));
    }
    let mut serializations = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = r.str("protocol name")?.to_string();
        let frame = match r.item()? {
            Item::Bin(b) => payload.slice_ref(b),
            Item::Nil => Bytes::new(),
            _ => return Err(err(format!("serialization '{name}' is not bin"))),
        };
        serializations.push((name, frame));
    }
    let (mut invocation_id, mut return_channel, mut origin) = (None, None, None);
    if len > 3 {
        invocation_id = r.str_or_nil("invocationId")?.map(str::to_string);
        return_channel = r.str_or_nil("return channel")?.map(str::to_string);
    }
    if len > 4 {
        // Item 5 is feedhub's; anything a future ASP.NET puts there is not a tag.
        if let Ok(Item::Str(s)) = r.item() {
            let s = std::str::from_utf8(s).unwrap_or("");
            if let Some(node) = s.strip_prefix(TAG_FEED) {
                origin = Some(Origin::Feed(node.to_string()));
            } else if let Some(node) = s.strip_prefix(TAG_SEND) {
                origin = Some(Origin::Send(node.to_string()));
            }
        }
    }
    Ok(AspNetInvocation {
        excluded,
        serializations,
        invocation_id,
        return_channel,
        origin,
    })
}

fn read_int(r: &mut Reader<'_>, what: &str) -> Result<i64, AspNetError> {
    match r.item()? {
        Item::Uint(n) => i64::try_from(n).map_err(|_| err(format!("{what} out of range"))),
        Item::Int(n) => Ok(n),
        _ => Err(err(format!("{what} is not an integer"))),
    }
}

/// Encodes a group command.
pub fn encode_group_command(cmd: &GroupCommand) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + cmd.server.len() + cmd.group.len() + cmd.connection.len());
    mp::write_array_len(&mut out, 5);
    mp::write_int(&mut out, cmd.id);
    mp::write_str(&mut out, &cmd.server);
    mp::write_uint(&mut out, u64::from(cmd.action));
    mp::write_str(&mut out, &cmd.group);
    mp::write_str(&mut out, &cmd.connection);
    out
}

/// Decodes a group command.
pub fn decode_group_command(payload: &[u8]) -> Result<GroupCommand, AspNetError> {
    let mut r = Reader::new(payload);
    header(&mut r, 5, "GroupCommand")?;
    let id = read_int(&mut r, "command id")?;
    let server = r.str("server name")?.to_string();
    let action = u8::try_from(r.uint("action")?).map_err(|_| err("action is not a byte"))?;
    let group = r.str("group")?.to_string();
    let connection = r.str("connection id")?.to_string();
    Ok(GroupCommand {
        id,
        server,
        action,
        group,
        connection,
    })
}

/// Encodes an ack.
pub fn encode_ack(id: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(10);
    mp::write_array_len(&mut out, 1);
    mp::write_int(&mut out, id);
    out
}

/// Decodes an ack.
pub fn decode_ack(payload: &[u8]) -> Result<i64, AspNetError> {
    let mut r = Reader::new(payload);
    header(&mut r, 1, "Ack")?;
    read_int(&mut r, "ack id")
}

/// Encodes a completion for a return channel.
pub fn encode_completion(protocol: &str, frame: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + protocol.len() + frame.len());
    mp::write_array_len(&mut out, 2);
    mp::write_str(&mut out, protocol);
    write_bin(&mut out, frame);
    out
}

/// Decodes a completion.
pub fn decode_completion(payload: &Bytes) -> Result<Completion, AspNetError> {
    let mut r = Reader::new(payload);
    header(&mut r, 2, "CompletionMessage")?;
    let protocol = r.str("protocol name")?.to_string();
    let frame = match r.item()? {
        Item::Bin(b) => payload.slice_ref(b),
        _ => return Err(err("completion is not bin")),
    };
    Ok(Completion { protocol, frame })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    const C2: &str = "92 90 82 A4 6A 73 6F 6E C4 3E 7B 22 74 79 70 65 22 3A 31 2C 22 74 61 72 67 65 74 22 3A 22 46 65
65 64 55 70 64 61 74 65 64 22 2C 22 61 72 67 75 6D 65 6E 74 73 22 3A 5B 7B 22 74 65 78 74 22 3A
22 68 69 22 7D 5D 7D 1E AB 6D 65 73 73 61 67 65 70 61 63 6B C4 1C 1B 96 01 80 C0 AB 46 65 65 64
55 70 64 61 74 65 64 91 81 A4 74 65 78 74 A2 68 69 90";

    const SERVER: &str = "web01_0123456789abcdef0123456789abcdef";

    fn c2_invocation() -> AspNetInvocation {
        let mut json = br#"{"type":1,"target":"FeedUpdated","arguments":[{"text":"hi"}]}"#.to_vec();
        json.push(0x1e);
        AspNetInvocation {
            excluded: vec![],
            serializations: vec![
                (JSON.into(), Bytes::from(json)),
                (
                    MESSAGEPACK.into(),
                    Bytes::from(hex(
                        "1B 96 01 80 C0 AB 46 65 65 64 55 70 64 61 74 65 64 91 81 A4 74 65 78 74 A2 68 69 90",
                    )),
                ),
            ],
            invocation_id: None,
            return_channel: None,
            origin: None,
        }
    }

    #[test]
    fn c1_channels() {
        let ch = AspNetChannels::new("", "MyApp.Hubs.FeedHub");
        let u = UserId::new("1002").unwrap();
        let g = GroupName::new("friends").unwrap();
        assert_eq!(ch.user(&u).as_str(), "MyApp.Hubs.FeedHub:user:1002");
        assert_eq!(ch.group(&g).as_str(), "MyApp.Hubs.FeedHub:group:friends");
        assert_eq!(ch.all().as_str(), "MyApp.Hubs.FeedHub:all");
        assert_eq!(ch.groups().as_str(), "MyApp.Hubs.FeedHub:internal:groups");
        assert_eq!(
            ch.ack(SERVER).as_str(),
            format!("MyApp.Hubs.FeedHub:internal:ack:{SERVER}")
        );
        let prod = AspNetChannels::new("prod", "MyApp.Hubs.FeedHub");
        assert_eq!(prod.user(&u).as_str(), "prodMyApp.Hubs.FeedHub:user:1002");
        assert_eq!(
            prod.wire_of_logical(&prod.logical_return("s")).as_str(),
            "prodMyApp.Hubs.FeedHub:internal:return:s"
        );
        for (c, t) in [
            (prod.user(&u), AspNetTarget::User(u.clone())),
            (prod.group(&g), AspNetTarget::Group(g.clone())),
            (prod.all(), AspNetTarget::All),
            (prod.groups(), AspNetTarget::Groups),
            (prod.ack("s1"), AspNetTarget::Ack("s1".into())),
            (prod.return_channel("s1"), AspNetTarget::Return("s1".into())),
            (
                prod.connection(&ConnectionId::new("c1").unwrap()),
                AspNetTarget::Connection(ConnectionId::new("c1").unwrap()),
            ),
        ] {
            assert_eq!(prod.parse(&c), Some(t));
            assert_eq!(ch.parse(&c), None, "another prefix");
        }
        assert_eq!(
            prod.parse(&Channel::new("prodMyApp.Hubs.FeedHub2:all")),
            None
        );
        assert_eq!(
            prod.parse(&Channel::new("prodMyApp.Hubs.FeedHub:user:")),
            None
        );
        assert!(server_name("n1").starts_with("n1_"));
        assert_eq!(server_name("n1").len(), 3 + 32);
    }

    #[test]
    fn c2_user_send_both_directions() {
        let bytes = hex(C2);
        assert_eq!(bytes.len(), 114);
        assert_eq!(encode_invocation(&c2_invocation()), bytes);
        assert_eq!(
            decode_invocation(&Bytes::from(bytes)).unwrap(),
            c2_invocation()
        );
    }

    #[test]
    fn c3_group_command_and_acks() {
        let mut cmd = hex("95 07 D9 26");
        cmd.extend_from_slice(SERVER.as_bytes());
        cmd.extend(hex("01 A7 66 72 69 65 6E 64 73 A6 63 6F 6E 6E 2D 31"));
        let decoded = GroupCommand {
            id: 7,
            server: SERVER.into(),
            action: ACTION_ADD,
            group: "friends".into(),
            connection: "conn-1".into(),
        };
        assert_eq!(encode_group_command(&decoded), cmd);
        assert_eq!(decode_group_command(&cmd).unwrap(), decoded);
        for (id, h) in [
            (7, "91 07"),
            (180, "91 CC B4"),
            (70000, "91 CE 00 01 11 70"),
        ] {
            assert_eq!(encode_ack(id), hex(h));
            assert_eq!(decode_ack(&hex(h)).unwrap(), id);
        }
        let small = GroupCommand {
            id: 42,
            server: "S".into(),
            action: ACTION_ADD,
            group: "G".into(),
            connection: "C".into(),
        };
        let b = hex("95 2A A1 53 01 A1 47 A1 43");
        assert_eq!(encode_group_command(&small), b);
        assert_eq!(decode_group_command(&b).unwrap(), small);
    }

    #[test]
    fn c4_excluded_json_only() {
        let mut bytes = hex("92 91 A6 63 6F 6E 6E 2D 31 81 A4 6A 73 6F 6E C4 2A");
        let mut frame = br#"{"type":1,"target":"Ping","arguments":[]}"#.to_vec();
        frame.push(0x1e);
        bytes.extend_from_slice(&frame);
        let inv = AspNetInvocation {
            excluded: vec!["conn-1".into()],
            serializations: vec![(JSON.into(), Bytes::from(frame))],
            invocation_id: None,
            return_channel: None,
            origin: None,
        };
        assert_eq!(encode_invocation(&inv), bytes);
        let back = decode_invocation(&Bytes::from(bytes)).unwrap();
        assert_eq!(back, inv);
        assert_eq!(back.serialization(MESSAGEPACK), None);
    }

    #[test]
    fn c5_client_result_call_and_reply() {
        let id = "A".repeat(22);
        let ret = format!("MyApp.Hubs.FeedHub:internal:return:{SERVER}");
        let mut frame =
            format!(r#"{{"type":1,"invocationId":"{id}","target":"GetStatus","arguments":[]}}"#)
                .into_bytes();
        frame.push(0x1e);
        let mut bytes = hex("94 90 81 A4 6A 73 6F 6E C4 57");
        bytes.extend_from_slice(&frame);
        bytes.push(0xB6);
        bytes.extend_from_slice(id.as_bytes());
        bytes.extend(hex("D9 49"));
        bytes.extend_from_slice(ret.as_bytes());
        assert_eq!(bytes.len(), 195);
        let inv = AspNetInvocation {
            excluded: vec![],
            serializations: vec![(JSON.into(), Bytes::from(frame))],
            invocation_id: Some(id.clone()),
            return_channel: Some(ret.clone()),
            origin: None,
        };
        assert_eq!(encode_invocation(&inv), bytes);
        assert_eq!(decode_invocation(&Bytes::from(bytes)).unwrap(), inv);

        let mut done = format!(r#"{{"type":3,"invocationId":"{id}","result":"ok"}}"#).into_bytes();
        done.push(0x1e);
        let mut reply = hex("92 A4 6A 73 6F 6E C4 41");
        reply.extend_from_slice(&done);
        assert_eq!(encode_completion(JSON, &done), reply);
        let back = decode_completion(&Bytes::from(reply)).unwrap();
        assert_eq!(back.protocol, JSON);
        assert_eq!(&back.frame[..], &done[..]);
    }

    #[test]
    fn origin_tag_is_a_fifth_item_with_nil_items_three_and_four() {
        let mut inv = c2_invocation();
        inv.origin = Some(Origin::Send("node-1".into()));
        let bytes = encode_invocation(&inv);
        assert_eq!(bytes[0], 0x95);
        // Items 3 and 4 are nil, then the tag.
        let tail = [&[0xc0u8, 0xc0, 0xa9][..], &b"fh:node-1"[..]].concat();
        assert!(bytes.ends_with(&tail));
        assert_eq!(decode_invocation(&Bytes::from(bytes)).unwrap(), inv);
        inv.origin = Some(Origin::Feed("n".into()));
        let bytes = Bytes::from(encode_invocation(&inv));
        assert_eq!(decode_invocation(&bytes).unwrap(), inv);
        // A fifth item that is no tag, and further items, are ignored.
        let mut odd = hex("96 90 80 C0 C0 A3 78 79 7A 01");
        assert_eq!(
            decode_invocation(&Bytes::from(odd.clone())).unwrap().origin,
            None
        );
        odd[5] = 0x07;
        assert!(decode_invocation(&Bytes::from(odd))
            .unwrap()
            .origin
            .is_none());
    }

    #[test]
    fn rejects_what_aspnet_rejects() {
        // nil excluded ids, one-item invocation, short group command, non-bin value.
        for bad in [
            "92 C0 80",
            "91 90",
            "94 07 A1 53 01 A1 47",
            "92 90 81 A4 6A 73 6F 6E A1 78",
            "90",
            "C1",
            "",
        ] {
            let b = Bytes::from(hex(bad));
            assert!(decode_invocation(&b).is_err(), "{bad}");
            assert!(decode_group_command(&b).is_err(), "{bad}");
        }
        assert!(decode_ack(&hex("91 A1 31")).is_err());
        assert!(decode_ack(&hex("90")).is_err());
        assert!(decode_completion(&Bytes::from(hex("92 A4 6A 73 6F 6E A1 78"))).is_err());
        // A huge declared count is refused at once, not allocated.
        assert!(decode_invocation(&Bytes::from(hex("92 DD FF FF FF FF"))).is_err());
        assert!(decode_invocation(&Bytes::from(hex("92 90 DF FF FF FF FF"))).is_err());
    }

    #[test]
    fn truncation_at_every_byte_never_panics() {
        let mut inv = c2_invocation();
        inv.excluded = vec!["a".into(), "bb".into()];
        inv.invocation_id = Some("x".into());
        inv.return_channel = Some("y".into());
        inv.origin = Some(Origin::Send("z".into()));
        let full = encode_invocation(&inv);
        let cmd = encode_group_command(&GroupCommand {
            id: 70000,
            server: SERVER.into(),
            action: 2,
            group: "g".into(),
            connection: "c".into(),
        });
        let done = encode_completion(MESSAGEPACK, b"\x05\x93\x03\x80\xa1x");
        for payload in [full, cmd, done, encode_ack(70000)] {
            for cut in 0..payload.len() {
                let b = Bytes::copy_from_slice(&payload[..cut]);
                let _ = decode_invocation(&b);
                let _ = decode_group_command(&b);
                let _ = decode_ack(&b);
                let _ = decode_completion(&b);
            }
            // And every single-byte corruption.
            for i in 0..payload.len() {
                for x in [0x00, 0x7f, 0xc1, 0xdd, 0xff] {
                    let mut p = payload.clone();
                    p[i] = x;
                    let b = Bytes::from(p);
                    let _ = decode_invocation(&b);
                    let _ = decode_group_command(&b);
                    let _ = decode_ack(&b);
                    let _ = decode_completion(&b);
                }
            }
        }
    }
}
