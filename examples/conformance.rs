//! The conformance server: hub `/testhub` with the methods of ASP.NET's client
//! functional-test hub (`src/SignalR/clients/ts/FunctionalTests/TestHub.cs`), plus group,
//! user and client-result methods, and `/authorizedhub`, which requires a JWT.
//!
//! ```text
//! cargo run --release --example conformance -- --listen 127.0.0.1:5001 [--jwt-secret S]
//! ```
//!
//! The protocol tests include this file (`#[path]`) and call [`start`] on port 0.

use std::net::SocketAddr;
use std::time::Duration;

use feedhub::hub::{channel_stream, HubBuilder, HubContext, HubDefinition, HubError, UploadStream};
use feedhub::protocol::{Binary, Timestamp, Value};
use feedhub::{Server, ServerBuilder, ServerConfig};
use futures_util::stream;
use serde::{Deserialize, Serialize};

/// `CustomObject` of the ASP.NET test hub.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CustomObject {
    /// A name.
    pub name: String,
    /// A value.
    pub value: i64,
}

/// `ComplexObject` of the ASP.NET test hub: PascalCase in both protocols, `byte[]` as
/// base64/bin, `DateTime` as ISO string/timestamp.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ComplexObject {
    /// Bytes 1, 2, 3.
    pub byte_array: Binary,
    /// 2000-01-01T00:00:00Z.
    pub date_time: Timestamp,
    /// A GUID in its string form.
    pub guid: String,
    /// 1, 2, 3.
    pub int_array: Vec<i32>,
    /// "hello world".
    pub string: String,
}

async fn send_to(proxy: feedhub::hub::ClientProxy, message: Value) -> Result<(), HubError> {
    proxy.send("Send", vec![message]).await
}

/// The `/testhub` declaration.
pub fn test_hub() -> HubDefinition {
    HubBuilder::new("/testhub")
        .method("Echo", |_c: HubContext, (message,): (Value,)| async move { Ok::<_, HubError>(message) })
        .method("GetCallerConnectionId", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.connection_id().to_string())
        })
        .method("GetNumRedirects", |c: HubContext, (): ()| async move {
            let n = c.request().query_param("numRedirects").unwrap_or_default();
            n.parse::<i64>().map_err(|_| HubError::new("numRedirects is not an integer"))
        })
        .method("ThrowException", |_c: HubContext, (message,): (String,)| async move {
            Err::<(), _>(HubError::new(message))
        })
        .method("InvokeWithString", |c: HubContext, (message,): (Value,)| async move {
            c.clients().client(c.connection_id()).send("Message", vec![message]).await
        })
        .method("SendCustomObject", |c: HubContext, (obj,): (Value,)| async move {
            c.clients().client(c.connection_id()).send("CustomObject", vec![obj]).await
        })
        .stream("Stream", |_c: HubContext, (): ()| async move {
            Ok::<_, HubError>(stream::iter(["a", "b", "c"].map(|s| Ok::<_, HubError>(s.to_string()))))
        })
        .stream("InfiniteStream", |c: HubContext, (): ()| async move {
            let (writer, reader) = channel_stream::<String>(1);
            let cancel = c.cancellation();
            let connection_id = c.connection_id().to_string();
            let clients = c.clients();
            tokio::spawn(async move {
                cancel.cancelled().await;
                drop(writer);
                let _ = clients.client(&connection_id).send("StreamCanceled", ()).await;
            });
            Ok::<_, HubError>(reader)
        })
        .method("StreamingConcat", |_c: HubContext, (mut items,): (UploadStream<String>,)| async move {
            let mut out = String::new();
            while let Some(item) = items.next().await {
                out.push_str(&item?);
            }
            Ok::<_, HubError>(out)
        })
        .stream("EmptyStream", |_c: HubContext, (): ()| async move {
            Ok::<_, HubError>(stream::empty::<Result<i32, HubError>>())
        })
        .stream("StreamThrowException", |_c: HubContext, (message,): (String,)| async move {
            Err::<stream::Empty<Result<i32, HubError>>, _>(HubError::new(message))
        })
        .method("GetActiveTransportName", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.transport().name())
        })
        .method("EchoComplexObject", |_c: HubContext, (obj,): (Value,)| async move { Ok::<_, HubError>(obj) })
        .method("SendComplexObject", |_c: HubContext, (): ()| async move {
            Ok::<_, HubError>(ComplexObject {
                byte_array: Binary(vec![1, 2, 3]),
                date_time: Timestamp { seconds: 946_684_800, nanos: 0 },
                guid: "00010203-0405-0607-0706-050403020100".to_string(),
                int_array: vec![1, 2, 3],
                string: "hello world".to_string(),
            })
        })
        .method("GetContentTypeHeader", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.request().header("content-type").map(str::to_string))
        })
        .method("GetCookie", |c: HubContext, (name,): (String,)| async move {
            Ok::<_, HubError>(c.request().cookie(&name))
        })
        .method("GetUserIdentifier", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.user_id().map(str::to_string))
        })
        .method("JoinGroup", |c: HubContext, (group,): (String,)| async move {
            c.groups().add(c.connection_id(), &group).await
        })
        .method("LeaveGroup", |c: HubContext, (group,): (String,)| async move {
            c.groups().remove(c.connection_id(), &group).await
        })
        .method("SendToGroup", |c: HubContext, (group, message): (String, Value)| async move {
            send_to(c.clients().group(&group), message).await
        })
        .method("SendToGroups", |c: HubContext, (groups, message): (Vec<String>, Value)| async move {
            send_to(c.clients().groups(groups), message).await
        })
        .method("SendToOthersInGroup", |c: HubContext, (group, message): (String, Value)| async move {
            send_to(c.clients().others_in_group(&group), message).await
        })
        .method("SendToGroupExcept", |c: HubContext, (group, message, except): (String, Value, Vec<String>)| async move {
            send_to(c.clients().group_except(&group, except), message).await
        })
        .method("SendToUser", |c: HubContext, (user, message): (String, Value)| async move {
            send_to(c.clients().user(&user), message).await
        })
        .method("SendToUsers", |c: HubContext, (users, message): (Vec<String>, Value)| async move {
            send_to(c.clients().users(users), message).await
        })
        .method("SendToConnection", |c: HubContext, (id, message): (String, Value)| async move {
            c.clients().client(&id).send("Send", vec![message]).await
        })
        .method("SendToConnections", |c: HubContext, (ids, message): (Vec<String>, Value)| async move {
            send_to(c.clients().clients(ids), message).await
        })
        .method("SendToAll", |c: HubContext, (message,): (Value,)| async move {
            send_to(c.clients().all(), message).await
        })
        .method("SendToOthers", |c: HubContext, (message,): (Value,)| async move {
            send_to(c.clients().others(), message).await
        })
        .method("SendToAllExcept", |c: HubContext, (message, except): (Value, Vec<String>)| async move {
            send_to(c.clients().all_except(except), message).await
        })
        .method("InvokeClientResult", |c: HubContext, (value,): (Value,)| async move {
            c.clients().caller().invoke::<Value>("ClientResult", vec![value]).await
        })
        .method("Disconnect", |c: HubContext, (allow_reconnect,): (bool,)| async move {
            c.close(None, allow_reconnect);
            Ok::<_, HubError>(())
        })
        .configure(|o| o.client_result_timeout = Duration::from_secs(30))
        .build()
}

/// The `/authorizedhub` declaration: a JWT is required.
pub fn authorized_hub() -> HubDefinition {
    HubBuilder::new("/authorizedhub")
        .configure(|o| o.require_auth = true)
        .method("Echo", |_c: HubContext, (message,): (Value,)| async move {
            Ok::<_, HubError>(message)
        })
        .method("GetUserIdentifier", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.user_id().map(str::to_string))
        })
        .build()
}

/// Starts the conformance server.
pub async fn start(listen: SocketAddr, jwt_secret: Option<String>) -> anyhow::Result<Server> {
    let config = ServerConfig {
        listen,
        jwt_secret,
        // A page on a local dev server (Vite's default port) may connect; `*` is refused at
        // start (CORS responses carry credentials).
        cors_origins: vec!["http://localhost:5173".to_string()],
        ..ServerConfig::default()
    };
    ServerBuilder::new(config)
        .hub(test_hub())
        .hub(authorized_hub())
        .start()
        .await
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let mut listen: SocketAddr = "127.0.0.1:5001".parse()?;
    let mut secret = std::env::var("FEEDHUB_JWT_SECRET").ok();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or_default().parse()?,
            "--jwt-secret" => secret = args.next(),
            other => anyhow::bail!(
                "unknown argument {other}; usage: conformance [--listen ADDR] [--jwt-secret S]"
            ),
        }
    }
    let server = start(listen, secret).await?;
    println!(
        "conformance server on http://{}/testhub and /authorizedhub",
        server.local_addr()
    );
    server.run_until_signal().await;
    Ok(())
}
