//! Raw-frame tests: the server's exact bytes and behaviour for handshakes, invocations and bad
//! input, over a real WebSocket against the conformance hub.

#[path = "support/mod.rs"]
mod support;

use feedhub::protocol::{CompletionResult, HubMessage, Invocation, ProtocolKind, Value};
use support::*;

fn invoke(id: &str, target: &str, args: Vec<Value>) -> HubMessage {
    HubMessage::Invocation(Invocation {
        invocation_id: Some(id.into()),
        ..Invocation::send(target, args)
    })
}

fn json(s: &str) -> Value {
    Value::json_checked(bytes::Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

async fn completion(c: &mut RawClient) -> (String, CompletionResult) {
    loop {
        match c.recv().await.expect("message") {
            HubMessage::Completion(done) => return (done.invocation_id, done.result),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn echo_in_both_protocols() {
    let s = start_conformance_server().await;
    for p in ProtocolKind::ALL {
        let mut c = RawClient::connect(&format!("{}/testhub", s.ws_url()), p).await;
        c.send(&invoke("1", "echo", vec![json("\"hi\"")])).await;
        let (id, r) = completion(&mut c).await;
        assert_eq!(id, "1");
        assert_eq!(r, CompletionResult::Value(json("\"hi\"")));
    }
}
