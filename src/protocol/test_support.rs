//! Test-only helpers shared by the codec tests: proptest strategies for JSON-ish values and
//! arbitrary hub messages.

use proptest::prelude::*;

use super::{
    Ack, CancelInvocation, Close, Completion, CompletionResult, HubMessage, Invocation, Sequence,
    StreamItem, Value,
};

/// Arbitrary JSON values: every scalar kind (finite floats only), nested arrays and objects.
pub(crate) fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value as J;
    let leaf = prop_oneof![
        Just(J::Null),
        any::<bool>().prop_map(J::Bool),
        any::<i64>().prop_map(J::from),
        any::<u64>().prop_map(J::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(J::from),
        ".{0,12}".prop_map(J::String),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(J::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| J::Object(m.into_iter().collect())),
        ]
    })
}

/// A [`Value::Json`] holding an arbitrary JSON value.
pub(crate) fn value() -> impl Strategy<Value = Value> {
    json_value().prop_map(Value::from)
}

fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((".{0,8}", ".{0,8}"), 0..3)
}

fn id() -> impl Strategy<Value = String> {
    ".{1,10}"
}

fn invocation(id_required: bool) -> impl Strategy<Value = Invocation> {
    let invocation_id = if id_required {
        id().prop_map(Some).boxed()
    } else {
        proptest::option::of(id()).boxed()
    };
    (
        headers(),
        invocation_id,
        ".{1,16}",
        proptest::collection::vec(value(), 0..4),
        proptest::collection::vec(id(), 0..3),
    )
        .prop_map(
            |(headers, invocation_id, target, arguments, stream_ids)| Invocation {
                headers,
                invocation_id,
                target,
                arguments,
                stream_ids,
            },
        )
}

/// Arbitrary hub messages of all nine types, restricted to what both protocols can carry
/// identically (non-empty ids and targets; a Close error is `None` or non-empty, since
/// MessagePack writes an empty error as `nil`).
pub(crate) fn hub_message() -> impl Strategy<Value = HubMessage> {
    let result = prop_oneof![
        Just(CompletionResult::Void),
        value().prop_map(CompletionResult::Value),
        ".{0,16}".prop_map(CompletionResult::Error),
    ];
    prop_oneof![
        invocation(false).prop_map(HubMessage::Invocation),
        invocation(true).prop_map(HubMessage::StreamInvocation),
        (headers(), id(), value()).prop_map(|(headers, invocation_id, item)| {
            HubMessage::StreamItem(StreamItem {
                headers,
                invocation_id,
                item,
            })
        }),
        (headers(), id(), result).prop_map(|(headers, invocation_id, result)| {
            HubMessage::Completion(Completion {
                headers,
                invocation_id,
                result,
            })
        }),
        (headers(), id()).prop_map(|(headers, invocation_id)| {
            HubMessage::CancelInvocation(CancelInvocation {
                headers,
                invocation_id,
            })
        }),
        Just(HubMessage::Ping),
        (proptest::option::of(".{1,16}"), any::<bool>()).prop_map(|(error, allow_reconnect)| {
            HubMessage::Close(Close {
                error,
                allow_reconnect,
            })
        }),
        any::<u64>().prop_map(|sequence_id| HubMessage::Ack(Ack { sequence_id })),
        any::<u64>().prop_map(|sequence_id| HubMessage::Sequence(Sequence { sequence_id })),
    ]
}
