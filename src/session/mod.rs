//! The per-connection task: drives one transport from handshake to close.
//!
//! [`run`] does, in order (ASP.NET's `HubConnectionHandler.OnConnectedAsync` order):
//! 1. the handshake request, under a deadline and a size limit ([`handshake`]);
//! 2. registration with the hub (`HubLifetime::connect`), which subscribes the user's
//!    backplane channel; only then is the handshake answered, so nothing published after
//!    the client's `start()` resolved is missed (a failed subscribe answers with a handshake
//!    error instead);
//! 3. the hub's `on_connected` hook;
//! 4. one `select!` loop over: inbound bytes (parsed as a stream: clients batch several
//!    messages per frame), the outbound queue (everything queued goes out as one frame), the
//!    invocations running for this connection, the keep-alive / client-timeout timer, and
//!    server shutdown;
//! 5. a Close message when the server ends the connection, then the transport close;
//! 6. the `on_disconnected` hook and unregistration.
//!
//! Hub methods run inside this task (a `FuturesUnordered`), not in spawned tasks: an idle
//! connection costs one task, and a slow method only delays its own connection. Unary
//! invocations take one of `max_parallel_invocations` slots (ASP.NET's
//! `MaximumParallelInvocationsPerClient`, default 1, so results come back in order); streams
//! and methods with upload streams do not. Reads pause when too many invocations wait.

pub mod handshake;
mod invoke;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Identity;
use crate::connection::outbound::{Outbound, Outgoing, SLOW_CONSUMER_REASON};
use crate::connection::{Connection, ConnectionHandle, RequestInfo, TransportKind};
use crate::hub::{HubContext, HubLifetime};
use crate::ids::ConnectionId;
use crate::metrics::{inc, METRICS};
use crate::protocol::{Close, CompletionResult, HubMessage, ProtocolKind};
use crate::transport::{FrameSink, FrameSource, TransportError};

use invoke::{Dispatcher, TaskDone};

/// Most bytes written as one transport frame when draining the outbound queue.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// How long a single write may take before the connection is considered dead
/// (ASP.NET's `TransportSendTimeout`).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// The generic text of a Close caused by an error, as ASP.NET words it.
pub const CLOSE_ERROR_TEXT: &str = "Connection closed with an error.";

/// Everything a session needs besides the transport.
pub struct SessionParams {
    /// The hub.
    pub hub: Arc<HubLifetime>,
    /// The connection id (from negotiate, or fresh for skipNegotiation).
    pub connection_id: ConnectionId,
    /// Who is connecting.
    pub identity: Identity,
    /// The connect request.
    pub request: RequestInfo,
    /// The transport in use.
    pub transport: TransportKind,
    /// Fires on server shutdown: the session sends Close with `allowReconnect: true`.
    pub shutdown: CancellationToken,
}

/// Why the loop ended.
enum End {
    /// The client sent Close (its optional error).
    ClientClose(Option<String>),
    /// The transport went away without a Close.
    TransportGone(String),
    /// The server closed the connection (Close message already sent).
    ServerClose(Option<String>),
}

/// Runs one connection to completion.
pub async fn run<Src: FrameSource, Snk: FrameSink>(
    mut source: Src,
    mut sink: Snk,
    params: SessionParams,
) {
    let options = params.hub.definition().options.clone();
    let mut inbuf = BytesMut::new();

    // 1. Handshake.
    let protocol = match handshake::perform(
        &mut source,
        &mut sink,
        &mut inbuf,
        &options,
        params.transport,
    )
    .await
    {
        Some(p) => p,
        None => {
            sink.close(1000, "").await;
            return;
        }
    };

    // 2. Registration.
    let conn = Connection::new(
        params.connection_id,
        params.identity,
        protocol,
        params.transport,
        params.request,
        Outbound::new(options.outbound, options.slow_consumer),
    );
    let span = tracing::debug_span!("session", conn_id = %conn.id, user = ?conn.user_id().map(|u| u.as_str()), protocol = protocol.name());
    let _enter = span.enter();
    if let Err(e) = params.hub.connect(&conn).await {
        // The handshake is not answered yet: the client's start() fails with this error.
        tracing::warn!(error = %e, "backplane subscribe failed; refusing the connection");
        handshake::send_error(
            &mut sink,
            "Backplane unavailable; the server cannot deliver messages right now. Try again later.",
        )
        .await;
        sink.close(1011, "backplane unavailable").await;
        return;
    }
    // Only now is the handshake answered: the user's channel is subscribed, so nothing
    // published after the client's start() resolved is missed.
    if handshake::send_ok(&mut sink, protocol).await.is_none() {
        params.hub.disconnect(&conn);
        return;
    }
    let ctx = HubContext::new(conn.clone(), params.hub.clone());

    // 3. OnConnected.
    if let Some(hook) = params.hub.definition().on_connected.clone() {
        if let Err(e) = hook(ctx.clone()).await {
            let error = format!(
                "{CLOSE_ERROR_TEXT}{}",
                e.client_suffix(options.detailed_errors)
            );
            write_close(
                &mut sink,
                protocol,
                &Close {
                    error: Some(error),
                    allow_reconnect: false,
                },
            )
            .await;
            sink.close(1000, "").await;
            params.hub.disconnect(&conn);
            return;
        }
    }

    // 4. The loop.
    let end = Loop::new(conn.clone(), ctx.clone(), &params.hub, protocol)
        .run(&mut source, &mut sink, inbuf, params.shutdown)
        .await;

    // 5. Close the transport.
    let error = match &end {
        End::ClientClose(e) => e.clone(),
        End::TransportGone(e) => Some(e.clone()),
        End::ServerClose(e) => e.clone(),
    };
    match end {
        End::TransportGone(_) => {}
        _ => sink.close(1000, "").await,
    }

    // 6. OnDisconnected, then unregister (hooks may still use Groups and Clients).
    conn.aborted.cancel();
    if let Some(hook) = params.hub.definition().on_disconnected.clone() {
        hook(ctx, error).await;
    }
    params.hub.disconnect(&conn);
    tracing::debug!("session ended");
}

async fn write_close<Snk: FrameSink>(sink: &mut Snk, protocol: ProtocolKind, close: &Close) {
    let mut out = Vec::new();
    if protocol
        .encode(&HubMessage::Close(close.clone()), &mut out)
        .is_ok()
    {
        let _ = tokio::time::timeout(
            SEND_TIMEOUT,
            sink.send(Bytes::from(out), protocol.transfer_format()),
        )
        .await;
    }
}

/// The state of the main loop.
struct Loop {
    conn: ConnectionHandle,
    protocol: ProtocolKind,
    dispatcher: Dispatcher,
    keep_alive: Duration,
    client_timeout: Duration,
    max_message_size: usize,
    ping: Bytes,
    last_sent: Instant,
    last_received: Instant,
    /// Armed by the client's first Ping (ASP.NET never times out clients that never ping).
    client_timeout_armed: bool,
}

impl Loop {
    fn new(
        conn: ConnectionHandle,
        ctx: HubContext,
        hub: &Arc<HubLifetime>,
        protocol: ProtocolKind,
    ) -> Loop {
        let options = &hub.definition().options;
        let mut ping = Vec::new();
        // Encoding a Ping cannot fail; an empty frame would only be a wasted write.
        let _ = protocol.encode(&HubMessage::Ping, &mut ping);
        let now = Instant::now();
        Loop {
            protocol,
            dispatcher: Dispatcher::new(ctx, hub.clone()),
            keep_alive: options.keep_alive_interval,
            client_timeout: options.client_timeout,
            max_message_size: options.max_message_size,
            ping: Bytes::from(ping),
            last_sent: now,
            last_received: now,
            client_timeout_armed: false,
            conn,
        }
    }

    fn next_deadline(&self) -> Instant {
        let ping_at = self.last_sent + self.keep_alive;
        if self.client_timeout_armed {
            ping_at.min(self.last_received + self.client_timeout)
        } else {
            ping_at
        }
    }

    async fn send<Snk: FrameSink>(
        &mut self,
        sink: &mut Snk,
        data: Bytes,
    ) -> Result<(), TransportError> {
        self.last_sent = Instant::now();
        match tokio::time::timeout(
            SEND_TIMEOUT,
            sink.send(data, self.protocol.transfer_format()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(TransportError::SendTimeout),
        }
    }

    async fn run<Src: FrameSource, Snk: FrameSink>(
        mut self,
        source: &mut Src,
        sink: &mut Snk,
        mut inbuf: BytesMut,
        shutdown: CancellationToken,
    ) -> End {
        let mut tasks: FuturesUnordered<BoxFuture<'static, TaskDone>> = FuturesUnordered::new();
        let timer = tokio::time::sleep_until(self.next_deadline());
        tokio::pin!(timer);
        let mut shutting_down = false;

        // Bytes that followed the handshake in the same frame are hub messages.
        if !inbuf.is_empty() {
            if let Err(end) = self.process_input(&mut inbuf, &mut tasks).await {
                return self.finish(sink, end).await;
            }
        }

        loop {
            self.dispatcher.start_pending(&mut tasks);
            timer.as_mut().reset(self.next_deadline());
            let can_read = !self.dispatcher.saturated();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if !shutting_down => {
                    shutting_down = true;
                    self.conn.close(None, true);
                }
                out = self.conn.outbound.next(MAX_BATCH_BYTES) => match out {
                    Outgoing::Frames(frames) => {
                        let data = concat(frames);
                        if let Err(e) = self.send(sink, data).await {
                            return End::TransportGone(e.to_string());
                        }
                    }
                    Outgoing::Close(req) => {
                        if req.error.as_deref() == Some(SLOW_CONSUMER_REASON) {
                            inc(&METRICS.slow_consumer_closes);
                        }
                        let close = Close { error: req.error.clone(), allow_reconnect: req.allow_reconnect };
                        let mut out = Vec::new();
                        if self.protocol.encode(&HubMessage::Close(close), &mut out).is_ok() {
                            let _ = self.send(sink, Bytes::from(out)).await;
                        }
                        return End::ServerClose(req.error);
                    }
                },
                Some(done) = tasks.next(), if !tasks.is_empty() => {
                    self.dispatcher.on_task_done(done);
                }
                chunk = source.recv(), if can_read => match chunk {
                    None => return End::TransportGone("transport closed by the client".into()),
                    Some(Err(TransportError::TooLarge)) => {
                        let error = crate::protocol::ProtocolError::TooLarge { limit: self.max_message_size }.to_string();
                        return self.finish(sink, End::ServerClose(Some(format!("{CLOSE_ERROR_TEXT} InvalidDataException: {error}")))).await;
                    }
                    Some(Err(e)) => return End::TransportGone(e.to_string()),
                    Some(Ok(bytes)) => {
                        self.last_received = Instant::now();
                        inbuf.extend_from_slice(&bytes);
                        if let Err(end) = self.process_input(&mut inbuf, &mut tasks).await {
                            return self.finish(sink, end).await;
                        }
                    }
                },
                () = &mut timer => {
                    let now = Instant::now();
                    if self.client_timeout_armed && now >= self.last_received + self.client_timeout {
                        tracing::debug!("client timeout");
                        self.conn.close(Some(format!("{CLOSE_ERROR_TEXT} Client hasn't sent a message/ping within the configured ClientTimeoutInterval.")), true);
                    } else if now >= self.last_sent + self.keep_alive {
                        let ping = self.ping.clone();
                        if let Err(e) = self.send(sink, ping).await {
                            return End::TransportGone(e.to_string());
                        }
                    }
                }
            }
        }
    }

    /// Sends the Close for an error end decided while processing input.
    async fn finish<Snk: FrameSink>(&mut self, sink: &mut Snk, end: End) -> End {
        match end {
            End::ServerClose(error) => {
                // ASP.NET keeps allowReconnect true unless the app aborted, the client closed
                // or OnConnected failed: a protocol error lets the client start over.
                let close = Close {
                    error: error.clone(),
                    allow_reconnect: true,
                };
                let mut out = Vec::new();
                if self
                    .protocol
                    .encode(&HubMessage::Close(close), &mut out)
                    .is_ok()
                {
                    let _ = self.send(sink, Bytes::from(out)).await;
                }
                End::ServerClose(error)
            }
            other => other,
        }
    }

    /// Decodes and handles every whole message in `inbuf`.
    async fn process_input(
        &mut self,
        inbuf: &mut BytesMut,
        tasks: &mut FuturesUnordered<BoxFuture<'static, TaskDone>>,
    ) -> Result<(), End> {
        loop {
            let msg = match self.protocol.decode(inbuf, self.max_message_size) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(()),
                Err(e) => {
                    inc(&METRICS.protocol_errors);
                    tracing::debug!(error = %e, "protocol error");
                    return Err(End::ServerClose(Some(format!(
                        "{CLOSE_ERROR_TEXT} InvalidDataException: {e}"
                    ))));
                }
            };
            inc(&METRICS.messages_in);
            match msg {
                HubMessage::Ping => self.client_timeout_armed = true,
                HubMessage::Close(c) => return Err(End::ClientClose(c.error)),
                HubMessage::Invocation(inv) => self.dispatcher.invocation(inv, false, tasks),
                HubMessage::StreamInvocation(inv) => self.dispatcher.invocation(inv, true, tasks),
                HubMessage::StreamItem(item) => {
                    self.dispatcher
                        .upload_item(item.invocation_id, Ok(item.item))
                        .await
                }
                HubMessage::Completion(c) => match c.result {
                    CompletionResult::Error(e) => {
                        self.dispatcher.completion(&c.invocation_id, Err(e)).await
                    }
                    CompletionResult::Value(v) => {
                        self.dispatcher
                            .completion(&c.invocation_id, Ok(Some(v)))
                            .await
                    }
                    CompletionResult::Void => {
                        self.dispatcher.completion(&c.invocation_id, Ok(None)).await
                    }
                },
                HubMessage::CancelInvocation(c) => self.dispatcher.cancel(&c.invocation_id),
                // Stateful reconnect is negotiated off on WebSockets-only sessions for now;
                // Ack and Sequence are accepted and ignored, as an old server would.
                HubMessage::Ack(_) | HubMessage::Sequence(_) => {}
            }
        }
    }
}

fn concat(mut frames: Vec<Bytes>) -> Bytes {
    if frames.len() == 1 {
        return frames.pop().unwrap_or_default();
    }
    let len = frames.iter().map(Bytes::len).sum();
    let mut out = BytesMut::with_capacity(len);
    for f in frames {
        out.extend_from_slice(&f);
    }
    out.freeze()
}

/// Upload streams of one connection: stream id → sender (bounded by `StreamBufferCapacity`).
pub(crate) type Uploads = HashMap<String, mpsc::Sender<crate::hub::method::UploadItem>>;

/// Invocations waiting for a slot.
pub(crate) type Pending = VecDeque<BoxFuture<'static, TaskDone>>;
