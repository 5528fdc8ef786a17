//! Replays the fuzz corpora through the same entry points the cargo-fuzz targets call
//! (`feedhub::fuzzing`), in seconds, so every input that once crashed a parser stays a
//! regression test and the fuzzers' invariants are checked on every test run.
//!
//! Inputs, per target `<t>` (see `fuzz/README.md`):
//! - `fuzz/corpus/<t>/`: the committed, minimized corpus;
//! - `fuzz/regressions/<t>/`: inputs that crashed a target once (fixed since);
//! - seeds made here from the golden fixtures (`protocol-tests/fixtures/`) and the encoders.
//!
//! `cargo test --release --test fuzz_replay -- --ignored write_seed_corpus` writes the seeds
//! into `fuzz/corpus/<t>/seed-*` (how the corpora were started).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use feedhub::backplane::envelope;
use feedhub::backplane::{BackplaneMessage, BackplanePayload, RelayFrame, RelayKind};
use feedhub::fuzzing::TARGETS;
use feedhub::ids::{ConnectionId, GroupName};
use feedhub::protocol::Value;

/// Labelled inputs of one target.
type Inputs = Vec<(String, Vec<u8>)>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `dir` (none when it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn target(name: &str) -> fn(&[u8]) {
    TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Runs `inputs` through target `name`; returns the failures as "target/label: message".
fn replay(name: &str, inputs: &[(String, Vec<u8>)]) -> Vec<String> {
    let t = target(name);
    let mut failures = Vec::new();
    for (label, data) in inputs {
        if let Err(e) = catch_unwind(AssertUnwindSafe(|| t(data))) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}/{label}: {msg}"));
        }
    }
    failures
}

fn read_inputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    files(dir)
        .into_iter()
        .map(|p| {
            let label = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (label, data)
        })
        .collect()
}

#[test]
fn committed_corpora_and_regressions_replay_cleanly() {
    let mut failures = Vec::new();
    let mut counts = BTreeMap::new();
    for (name, _) in TARGETS {
        let mut inputs = read_inputs(&root().join("fuzz/corpus").join(name));
        inputs.extend(read_inputs(&root().join("fuzz/regressions").join(name)));
        counts.insert(*name, inputs.len());
        failures.extend(replay(name, &inputs));
    }
    eprintln!("replayed: {counts:?}");
    for (name, n) in &counts {
        assert!(*n > 0, "fuzz/corpus/{name}/ is empty or missing");
    }
    assert!(
        failures.is_empty(),
        "{} failing inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn seeds_replay_cleanly() {
    let mut failures = Vec::new();
    for (name, inputs) in seeds() {
        assert!(!inputs.is_empty(), "no seeds for {name}");
        failures.extend(replay(name, &inputs));
    }
    assert!(
        failures.is_empty(),
        "{} failing seeds:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
#[ignore = "writes the seed corpus into fuzz/corpus/ (run by hand)"]
fn write_seed_corpus() {
    for (name, inputs) in seeds() {
        let dir = root().join("fuzz/corpus").join(name);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        for (label, data) in inputs {
            std::fs::write(dir.join(format!("seed-{label}")), data).expect("write seed");
        }
    }
}

// ---- seeds ----

fn fixtures(suffix: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root().join("protocol-tests/fixtures");
    let mut out: Vec<(String, Vec<u8>)> = read_inputs(&dir)
        .into_iter()
        .filter(|(label, _)| label.ends_with(suffix))
        .collect();
    assert!(!out.is_empty(), "no *{suffix} fixtures");
    // Every fixture of the protocol back to back: one transport unit with many messages.
    let all: Vec<u8> = out.iter().flat_map(|(_, d)| d.clone()).collect();
    out.push((format!("all{suffix}"), all));
    out
}

fn labelled(items: &[&[u8]]) -> Vec<(String, Vec<u8>)> {
    items
        .iter()
        .enumerate()
        .map(|(i, d)| (format!("{i:02}"), d.to_vec()))
        .collect()
}

fn relay(kind: RelayKind) -> BackplaneMessage {
    BackplaneMessage {
        origin: "node-a".into(),
        payload: BackplanePayload::Relay(RelayFrame { relay: 7, kind }),
    }
}

fn envelopes() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let id = || ConnectionId::new("c1").expect("id");
    let mut packed = Vec::new();
    // [7, "x"] as MessagePack.
    packed.extend_from_slice(&[0x92, 0x07, 0xa1, b'x']);
    let plain = [
        BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::Invocation {
                target: "FeedUpdated".into(),
                arguments: vec![
                    Value::json_unchecked(Bytes::from_static(br#"{"a":[1,2.5,"s",null]}"#)),
                    Value::MsgPack(Bytes::from(packed)),
                ],
                exclude: vec![id()],
            },
        },
        BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::RawJson(Bytes::from_static(br#"{"text":"hi"}"#)),
        },
        BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::Group {
                connection: id(),
                group: GroupName::new("g").expect("group"),
                add: true,
            },
        },
        BackplaneMessage {
            origin: "node-a".into(),
            payload: BackplanePayload::CloseConnection {
                connection: id(),
                error: Some("bye".into()),
            },
        },
    ];
    let relays = [
        relay(RelayKind::Open {
            connection: id(),
            reply_node: "node-b".into(),
        }),
        relay(RelayKind::Opened {
            owner: "node-a".into(),
        }),
        relay(RelayKind::Data {
            seq: 1,
            data: Bytes::from_static(b"{\"type\":6}\x1e"),
            binary: false,
        }),
        relay(RelayKind::Close),
        relay(RelayKind::Request {
            reply_node: "node-b".into(),
            method: "POST".into(),
            uri: "/hubs/feed?id=abc".into(),
            headers: vec![
                ("content-type".into(), Bytes::from_static(b"text/plain")),
                ("authorization".into(), Bytes::from_static(b"Bearer x")),
                ("connection".into(), Bytes::from_static(b"close")),
            ],
            body: Bytes::from_static(b"{\"type\":6}\x1e"),
        }),
        relay(RelayKind::Head {
            status: 200,
            headers: vec![(
                "content-type".into(),
                Bytes::from_static(b"text/event-stream"),
            )],
            body: Bytes::from_static(b"data: x\r\n\r\n"),
            end: false,
        }),
        relay(RelayKind::Claim {
            connection: id(),
            reply_node: "node-b".into(),
        }),
    ];
    let enc = |m: &BackplaneMessage| envelope::encode(m).expect("encode");
    (
        plain.iter().map(enc).collect(),
        relays.iter().map(enc).collect(),
    )
}

/// Seed inputs per target.
fn seeds() -> Vec<(&'static str, Inputs)> {
    let (plain, relays) = envelopes();
    let mut envelope_seeds: Vec<Vec<u8>> = plain.clone();
    envelope_seeds.extend(relays.iter().cloned());
    envelope_seeds.push(br#"{"text":"hello from another service"}"#.to_vec());
    let mut relay_seeds: Vec<Vec<u8>> = relays;
    relay_seeds.extend([
        b"\x04node-b\0POST\0/hubs/feed?id=x&_=1\0content-type:text/plain\nconnection:close\nx-a:1\0{\"type\":6}\x1e".to_vec(),
        b"\x85\0\xc8\0content-type:text/event-stream\ncache-control:no-cache\0data: {}\r\n\r\n".to_vec(),
        b"\x02\0\x01\0\xff\xfe".to_vec(),
        b"\x00c1\0node-b".to_vec(),
    ]);
    // MessagePack argument values and JSON values for the transcoder.
    let mut transcode: Vec<Vec<u8>> = vec![
        br#"[1,-2,3.5,"s\u0001",true,false,null,{"a":{"b":[]}},18446744073709551615,-9223372036854775808,1e300]"#.to_vec(),
        vec![0x84, 0xa1, b'a', 0x92, 0x01, 0xc0, 0x01, 0xc3, 0xc0, 0x02, 0xc4, 0x01, 0x01, 0x03],
        vec![0x81, 0x92, 0x01, 0xa1, b'x', 0xc0],
        vec![0xd6, 0xff, 0x65, 0x92, 0x00, 0x80],
        vec![0xc7, 12, 0xff, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        vec![0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0],
        vec![0xdc, 0x00, 0x02, 0xca, 0x3f, 0xc0, 0, 0, 0xd4, 0x05, 0x01],
    ];
    for (_, f) in fixtures(".msgpack.bin") {
        transcode.push(f.get(1..).unwrap_or_default().to_vec());
    }
    let bytes = |v: &[Vec<u8>]| -> Vec<(String, Vec<u8>)> {
        v.iter()
            .enumerate()
            .map(|(i, d)| (format!("{i:02}"), d.clone()))
            .collect()
    };
    vec![
        (
            "handshake",
            labelled(&[
                b"{\"protocol\":\"json\",\"version\":1}\x1e",
                b"{\"protocol\":\"messagepack\",\"version\":1}\x1e\x02\x91\x06",
                b"{\"version\":2,\"protocol\":\"JSON\",\"x\":[1]}\x1e{\"type\":6}\x1e",
                b"{}\x1e",
                b"{\"error\":\"Requested protocol 'x' is not available.\"}\x1e",
                b"{\"protocol\":\"json\"",
            ]),
        ),
        ("json", fixtures(".json.txt")),
        ("msgpack", fixtures(".msgpack.bin")),
        ("transcode", bytes(&transcode)),
        (
            "negotiate",
            labelled(&[
                b"negotiateVersion=1",
                b"negotiateVersion=1&useStatefulReconnect=true\0Bearer abc.def\0user-1",
                b"NegotiateVersion=0&id=abc&access_token=a%2Bb",
                b"negotiateVersion=-1",
                b"negotiateVersion=x\0Basic abc",
                b"tenant=a&negotiateVersion=7\0\0\xe2\x82\xac",
            ]),
        ),
        (
            "token",
            labelled(&[
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\0user-1\0node-a",
                b"eyJ0eXAiOiJKV1QifQ\0\0\0key",
                b"not a token\0u\0n\0k",
                b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\0\0node-b",
            ]),
        ),
        ("envelope", bytes(&envelope_seeds)),
        (
            "resp",
            labelled(&[
                b"*3\r\n$9\r\nsubscribe\r\n$6\r\nfeed-1\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$6\r\nfeed-1\r\n$2\r\n{}\r\n+OK\r\n-ERR x\r\n",
                b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$100\r\n0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789\r\n:5\r\n",
                b"*4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\nc\r\n$-1\r\n*-1\r\n",
            ]),
        ),
        (
            "feed_event",
            labelled(&[
                br#"{"recipients":["1002","1003",1004],"payload":{"text":"hi"},"id":"e1"}"#,
                b"{\"text\":\"hi\"}\0feed.42\0m1",
                b"[1,2]\0feed.7",
                br#"{"recipients":["a"],"payload":{"id":3,"x":{}}}"#,
                b"{\"recipients\":[\"u\"],\"payload\":{}}\0other.key\0msg-\"1\"",
            ]),
        ),
        ("relay", bytes(&relay_seeds)),
        ("aspnet", bytes(&aspnet_seeds())),
    ]
}

/// ASP.NET backplane payloads: the vectors of docs/aspnet-interop.md Part C and feedhub's
/// tagged form.
fn aspnet_seeds() -> Vec<Vec<u8>> {
    use feedhub::backplane::aspnet as a;
    let mut json = br#"{"type":1,"target":"FeedUpdated","arguments":[{"text":"hi"}]}"#.to_vec();
    json.push(0x1e);
    let mp = vec![
        0x1b, 0x96, 0x01, 0x80, 0xc0, 0xab, b'F', b'e', b'e', b'd', b'U', b'p', b'd', b'a', b't',
        b'e', b'd', 0x91, 0x81, 0xa4, b't', b'e', b'x', b't', 0xa2, b'h', b'i', 0x90,
    ];
    let inv = |excluded: Vec<String>, id: Option<String>, ret: Option<String>, origin| {
        a::encode_invocation(&a::AspNetInvocation {
            excluded,
            serializations: vec![
                ("json".into(), Bytes::from(json.clone())),
                ("messagepack".into(), Bytes::from(mp.clone())),
            ],
            invocation_id: id,
            return_channel: ret,
            origin,
        })
    };
    vec![
        inv(vec![], None, None, None),
        inv(
            vec!["conn-1".into()],
            None,
            None,
            Some(a::Origin::Send("node-1".into())),
        ),
        inv(vec![], None, None, Some(a::Origin::Feed("node-1".into()))),
        inv(
            vec![],
            Some("A".repeat(22)),
            Some(
                "MyApp.Hubs.FeedHub:internal:return:web01_0123456789abcdef0123456789abcdef".into(),
            ),
            None,
        ),
        a::encode_group_command(&a::GroupCommand {
            id: 7,
            server: "web01_0123456789abcdef0123456789abcdef".into(),
            action: a::ACTION_ADD,
            group: "friends".into(),
            connection: "conn-1".into(),
        }),
        a::encode_ack(70000),
        a::encode_completion(
            "json",
            b"{\"type\":3,\"invocationId\":\"x\",\"result\":\"ok\"}\x1e",
        ),
    ]
}
