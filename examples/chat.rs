//! A minimal chat hub: `cargo run --example chat`, then connect any SignalR client to
//! `http://127.0.0.1:5002/chat` and call `Join(room)`, `Say(room, text)`, `Whisper(id, text)`.
use feedhub::hub::{HubBuilder, HubContext, HubError};
use feedhub::{ServerBuilder, ServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let hub = HubBuilder::new("/chat")
        .method("Join", |ctx: HubContext, (room,): (String,)| async move {
            ctx.groups().add(ctx.connection_id(), &room).await?;
            ctx.clients()
                .others_in_group(&room)
                .send("Joined", (ctx.connection_id().to_string(),))
                .await
        })
        .method(
            "Say",
            |ctx: HubContext, (room, text): (String, String)| async move {
                if text.len() > 1000 {
                    return Err(HubError::new("Message too long"));
                }
                let from = ctx.connection_id().to_string();
                ctx.clients()
                    .group(&room)
                    .send("Message", (from, text))
                    .await
            },
        )
        .method(
            "Whisper",
            |ctx: HubContext, (to, text): (String, String)| async move {
                let from = ctx.connection_id().to_string();
                ctx.clients()
                    .client(&to)
                    .send("Whisper", (from, text))
                    .await
            },
        )
        .on_disconnected(|ctx: HubContext, _error: Option<String>| async move {
            let _ = ctx
                .clients()
                .others()
                .send("Left", (ctx.connection_id().to_string(),))
                .await;
        })
        .build();
    let config = ServerConfig {
        listen: "127.0.0.1:5002".parse()?,
        ..ServerConfig::default()
    };
    let server = ServerBuilder::new(config).hub(hub).start().await?;
    println!("chat hub on http://{}/chat", server.local_addr());
    server.run_until_signal().await;
    Ok(())
}
