//! Criterion benchmark of the JSON and MessagePack codecs, side by side.
//!
//! Two messages, each encoded and decoded with both protocols:
//! - `FeedUpdated`: a server→client invocation whose single argument is a ~200-byte JSON
//!   object held as a `Value::Json` (as it arrives from a JSON publisher or the backplane).
//!   JSON encoding copies it; MessagePack encoding transcodes it, which is the realistic
//!   cost of serving a MessagePack client.
//! - `Echo`: a client invocation with a short string, in the layout each JS client sends
//!   (JSON with `type` last; MessagePack with 5 elements).
//!
//! Decoding includes copying the frame into a fresh `BytesMut`, as a receive buffer would
//! hold it. Throughput is one message per iteration, so criterion reports messages/s.
//!
//! Run: `cargo bench --bench codecs -- --quick`

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use feedhub::protocol::{HubMessage, Invocation, ProtocolKind, Value, DEFAULT_MAX_MESSAGE_SIZE};

const FEED_ARG: &str = concat!(
    r#"{"feedId":"f-1024","seq":48213,"updatedAt":"2024-05-01T12:34:56.789Z","#,
    r#""title":"Quarterly results are in","author":{"id":42,"name":"Ada Lovelace"},"#,
    r#""tags":["finance","q1","earnings"],"score":0.9731,"unread":true}"#
);

fn feed_updated() -> HubMessage {
    HubMessage::Invocation(Invocation::send(
        "FeedUpdated",
        vec![Value::Json(Bytes::from_static(FEED_ARG.as_bytes()))],
    ))
}

fn echo(kind: ProtocolKind) -> HubMessage {
    let arg = match kind {
        ProtocolKind::Json => Value::Json(Bytes::from_static(b"\"hello world\"")),
        ProtocolKind::MessagePack => Value::MsgPack(Bytes::from_static(b"\xabhello world")),
    };
    HubMessage::Invocation(Invocation {
        invocation_id: Some("1".into()),
        target: "Echo".into(),
        arguments: vec![arg],
        ..Default::default()
    })
}

fn name(kind: ProtocolKind) -> &'static str {
    match kind {
        ProtocolKind::Json => "json",
        ProtocolKind::MessagePack => "msgpack",
    }
}

fn bench_encode(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: ProtocolKind,
    msg: &HubMessage,
) {
    let mut out = Vec::with_capacity(512);
    group.bench_function(name(kind), |b| {
        b.iter(|| {
            out.clear();
            kind.encode(black_box(msg), &mut out).expect("encode");
            black_box(out.len())
        })
    });
}

fn bench_decode(
    group: &mut BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: ProtocolKind,
    framed: &[u8],
) {
    group.bench_function(name(kind), |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(framed));
            let msg = kind
                .decode(&mut buf, DEFAULT_MAX_MESSAGE_SIZE)
                .expect("decode")
                .expect("complete");
            black_box(msg)
        })
    });
}

fn framed(kind: ProtocolKind, msg: &HubMessage) -> Vec<u8> {
    let mut out = Vec::new();
    kind.encode(msg, &mut out).expect("encode");
    out
}

fn codecs(c: &mut Criterion) {
    assert!(
        FEED_ARG.len() >= 190 && FEED_ARG.len() <= 230,
        "{}",
        FEED_ARG.len()
    );
    let feed = feed_updated();

    let mut group = c.benchmark_group("encode/FeedUpdated");
    group.throughput(Throughput::Elements(1));
    for kind in ProtocolKind::ALL {
        bench_encode(&mut group, kind, &feed);
    }
    group.finish();

    let mut group = c.benchmark_group("decode/FeedUpdated");
    group.throughput(Throughput::Elements(1));
    for kind in ProtocolKind::ALL {
        bench_decode(&mut group, kind, &framed(kind, &feed));
    }
    group.finish();

    let mut group = c.benchmark_group("encode/Echo");
    group.throughput(Throughput::Elements(1));
    for kind in ProtocolKind::ALL {
        bench_encode(&mut group, kind, &echo(kind));
    }
    group.finish();

    // The bytes each JS client actually sends.
    let echo_json = b"{\"arguments\":[\"hello world\"],\"invocationId\":\"1\",\"target\":\"Echo\",\"type\":1}\x1e";
    let echo_msgpack = b"\x17\x95\x01\x80\xa11\xa4Echo\x91\xabhello world";
    assert_eq!(
        ProtocolKind::MessagePack
            .decode(&mut BytesMut::from(&echo_msgpack[..]), 1024)
            .expect("valid")
            .as_ref(),
        Some(&echo(ProtocolKind::MessagePack))
    );
    let mut group = c.benchmark_group("decode/Echo");
    group.throughput(Throughput::Elements(1));
    bench_decode(&mut group, ProtocolKind::Json, echo_json);
    bench_decode(&mut group, ProtocolKind::MessagePack, echo_msgpack);
    group.finish();
}

criterion_group!(benches, codecs);
criterion_main!(benches);
