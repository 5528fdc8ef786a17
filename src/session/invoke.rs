//! Dispatching a connection's invocations: method lookup, argument binding, the parallel
//! invocation limit, server-to-client streams with cancellation, client-to-server upload
//! streams, and client-result completions. Error texts are ASP.NET's, word for word, because
//! client tests written against ASP.NET assert them.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Pending;
use crate::connection::ConnectionHandle;
use crate::hub::method::{BindError, Outcome, UploadItem};
use crate::hub::{HubContext, HubLifetime};
use crate::metrics::{inc, METRICS};
use crate::protocol::{Completion, HubMessage, Invocation, StreamItem, Value};

/// The invocations running inside one session task. The `FuturesUnordered` is made on first
/// use and let go when it empties: it allocates as soon as it exists, and an idle connection
/// (most of a feed's) runs nothing (the idle memory budget in `bench/README.md`).
#[derive(Default)]
pub(crate) struct Tasks(Option<FuturesUnordered<BoxFuture<'static, TaskDone>>>);

impl Tasks {
    /// Runs `task` beside the others.
    pub(crate) fn push(&mut self, task: BoxFuture<'static, TaskDone>) {
        self.0.get_or_insert_with(FuturesUnordered::new).push(task);
    }

    /// Whether nothing runs.
    pub(crate) fn is_empty(&self) -> bool {
        match &self.0 {
            Some(t) => t.is_empty(),
            None => true,
        }
    }

    /// The next invocation to finish; `None` when nothing runs.
    pub(crate) async fn next(&mut self) -> Option<TaskDone> {
        let tasks = self.0.as_mut()?;
        let done = tasks.next().await;
        if tasks.is_empty() {
            self.0 = None;
        }
        done
    }
}

/// What a finished task tells the dispatcher.
pub(crate) struct TaskDone {
    /// It held an invocation slot.
    slot: bool,
    /// Upload streams to complete (the method returned).
    uploads: Vec<String>,
    /// The stream invocation that ended.
    stream: Option<String>,
}

/// A map by stream id that costs a pointer until its first entry: every connection's loop
/// holds two (upload streams, running streams) for its whole life and most never stream
/// (the idle memory budget in `bench/README.md`).
#[allow(clippy::box_collection)] // the point: a pointer, not a 48-byte empty map
pub(crate) struct LazyMap<V>(Option<Box<HashMap<String, V>>>);

impl<V> Default for LazyMap<V> {
    fn default() -> Self {
        LazyMap(None)
    }
}

impl<V> LazyMap<V> {
    fn insert(&mut self, key: String, value: V) -> Option<V> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(key, value)
    }

    fn get(&self, key: &str) -> Option<&V> {
        self.0.as_ref()?.get(key)
    }

    fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    fn remove(&mut self, key: &str) -> Option<V> {
        self.0.as_mut()?.remove(key)
    }
}

pub(crate) struct Dispatcher {
    ctx: HubContext,
    hub: Arc<HubLifetime>,
    uploads: LazyMap<mpsc::Sender<UploadItem>>,
    streams: LazyMap<CancellationToken>,
    pending: Pending,
    running_slots: usize,
    max_parallel: usize,
    max_pending: usize,
    detailed: bool,
    stream_capacity: usize,
}

/// Queues a message for this connection only (encoded once, for its protocol).
fn reply(conn: &ConnectionHandle, msg: HubMessage) {
    let mut out = Vec::new();
    match conn.protocol.encode(&msg, &mut out) {
        Ok(()) => {
            let _ = conn.send_bytes(Bytes::from(out));
        }
        Err(e) => {
            // A result that cannot be encoded must still complete the invocation.
            tracing::warn!(error = %e, "reply could not be encoded");
            let id = match &msg {
                HubMessage::Completion(c) => Some(c.invocation_id.clone()),
                HubMessage::StreamItem(i) => Some(i.invocation_id.clone()),
                _ => None,
            };
            if let Some(id) = id {
                let mut out = Vec::new();
                let error = format!("Failed to serialize the result: {e}");
                if conn
                    .protocol
                    .encode(
                        &HubMessage::Completion(Completion::with_error(id, error)),
                        &mut out,
                    )
                    .is_ok()
                {
                    let _ = conn.send_bytes(Bytes::from(out));
                }
            }
        }
    }
}

fn complete_error(conn: &ConnectionHandle, id: &Option<String>, error: String) {
    inc(&METRICS.invocation_errors);
    if let Some(id) = id {
        reply(
            conn,
            HubMessage::Completion(Completion::with_error(id.clone(), error)),
        );
    }
}

impl Dispatcher {
    pub(crate) fn new(ctx: HubContext, hub: Arc<HubLifetime>) -> Dispatcher {
        let o = &hub.definition().options;
        Dispatcher {
            max_parallel: o.max_parallel_invocations.max(1),
            max_pending: o.max_pending_invocations.max(1),
            detailed: o.detailed_errors,
            stream_capacity: o.stream_buffer_capacity.max(1),
            ctx,
            hub,
            uploads: LazyMap::default(),
            streams: LazyMap::default(),
            pending: Pending::new(),
            running_slots: 0,
        }
    }

    /// Whether reads should pause until queued invocations start.
    pub(crate) fn saturated(&self) -> bool {
        self.pending.len() >= self.max_pending
    }

    pub(crate) fn start_pending(&mut self, tasks: &mut Tasks) {
        while self.running_slots < self.max_parallel {
            let Some(task) = self.pending.pop_front() else {
                break;
            };
            self.running_slots += 1;
            tasks.push(task);
        }
    }

    pub(crate) fn on_task_done(&mut self, done: TaskDone) {
        if done.slot {
            self.running_slots = self.running_slots.saturating_sub(1);
        }
        for id in done.uploads {
            self.uploads.remove(&id);
        }
        if let Some(id) = done.stream {
            self.streams.remove(&id);
        }
    }

    /// Handles an Invocation (`streaming == false`) or a StreamInvocation.
    pub(crate) fn invocation(&mut self, inv: Invocation, streaming: bool, tasks: &mut Tasks) {
        let conn = self.ctx.connection.clone();
        let target = inv.target.clone();
        let id = inv.invocation_id.clone().filter(|s| !s.is_empty());
        let Some(method) = self.hub.definition().method(&target).cloned() else {
            complete_error(&conn, &id, format!("Failed to invoke '{target}' due to an error on the server. HubException: Method does not exist."));
            return;
        };
        if method.streaming != streaming {
            let text = if streaming {
                format!("The client attempted to invoke the non-streaming '{target}' method with a streaming invocation.")
            } else {
                format!("The client attempted to invoke the streaming '{target}' method with a non-streaming invocation.")
            };
            complete_error(&conn, &id, text);
            return;
        }
        if inv.stream_ids.len() != method.streams {
            complete_error(
                &conn,
                &id,
                format!(
                    "An unexpected error occurred invoking '{target}' on the server. HubException: Client sent {} stream(s), Hub method expects {}.",
                    inv.stream_ids.len(),
                    method.streams
                ),
            );
            return;
        }
        if inv.arguments.len() != method.arity {
            let detail = if self.detailed {
                format!(" InvalidDataException: Invocation provides {} argument(s) but target expects {}.", inv.arguments.len(), method.arity)
            } else {
                String::new()
            };
            complete_error(
                &conn,
                &id,
                format!("Failed to invoke '{target}' due to an error on the server.{detail}"),
            );
            return;
        }
        if streaming {
            if let Some(sid) = &id {
                if self.streams.contains_key(sid) {
                    complete_error(
                        &conn,
                        &id,
                        format!("Invocation ID '{sid}' is already in use."),
                    );
                    return;
                }
            }
        }
        if inv.stream_ids.iter().any(|s| self.uploads.contains_key(s)) {
            complete_error(&conn, &id, format!("An unexpected error occurred invoking '{target}' on the server. HubException: Stream ID is already in use."));
            return;
        }

        // Upload streams: one bounded channel each.
        let mut receivers = Vec::with_capacity(inv.stream_ids.len());
        for sid in &inv.stream_ids {
            let (tx, rx) = mpsc::channel::<UploadItem>(self.stream_capacity);
            self.uploads.insert(sid.clone(), tx);
            receivers.push(rx);
        }
        let cancel = self.ctx.connection.aborted.child_token();
        let ctx = self.ctx.with_cancel(cancel.clone());
        let started = match (method.call)(ctx, inv.arguments, receivers) {
            Ok(fut) => fut,
            Err(e) => {
                for sid in &inv.stream_ids {
                    self.uploads.remove(sid);
                }
                let detail = match (&e, self.detailed) {
                    (_, false) => String::new(),
                    (BindError::Count { provided, expected }, true) => {
                        format!(" InvalidDataException: Invocation provides {provided} argument(s) but target expects {expected}.")
                    }
                    (BindError::Streams { provided, expected }, true) => {
                        format!(" HubException: Client sent {provided} stream(s), Hub method expects {expected}.")
                    }
                    (BindError::Type(_), true) => {
                        " InvalidDataException: Error binding arguments. Make sure that the types of the provided values match the types of the hub method being invoked.".to_string()
                    }
                };
                complete_error(
                    &conn,
                    &id,
                    format!("Failed to invoke '{target}' due to an error on the server.{detail}"),
                );
                return;
            }
        };
        let detailed = self.detailed;
        let uploads = inv.stream_ids.clone();

        if streaming {
            let sid = id.clone().unwrap_or_default();
            self.streams.insert(sid.clone(), cancel.clone());
            tasks.push(Box::pin(async move {
                run_stream(conn, sid.clone(), target, started, cancel, detailed).await;
                TaskDone {
                    slot: false,
                    uploads,
                    stream: Some(sid),
                }
            }));
            return;
        }

        let holds_slot = uploads.is_empty();
        let task: BoxFuture<'static, TaskDone> = Box::pin(async move {
            match started.await {
                Outcome::Value(Ok(v)) => {
                    if let Some(id) = id {
                        reply(
                            &conn,
                            HubMessage::Completion(Completion::with_result(id, v)),
                        );
                    }
                }
                Outcome::Value(Err(e)) => {
                    tracing::debug!(method = %target, error = %e, "hub method failed");
                    complete_error(
                        &conn,
                        &id,
                        format!(
                            "An unexpected error occurred invoking '{target}' on the server.{}",
                            e.client_suffix(detailed)
                        ),
                    );
                }
                Outcome::Stream(_) => {}
            }
            TaskDone {
                slot: holds_slot,
                uploads,
                stream: None,
            }
        });
        if holds_slot {
            self.pending.push_back(task);
        } else {
            // Methods with upload streams run beside others, as in ASP.NET: they wait for
            // items that arrive through this same connection.
            tasks.push(task);
        }
    }

    /// An item of an upload stream. Waits while that stream's buffer is full (back-pressure
    /// on this connection's reads only).
    pub(crate) async fn upload_item(&mut self, id: String, item: UploadItem) {
        if let Some(tx) = self.uploads.get(&id) {
            if tx.send(item).await.is_err() {
                self.uploads.remove(&id);
            }
        } else {
            tracing::debug!(stream_id = %id, "item for unknown stream ignored");
        }
    }

    /// A Completion from the client: the end of an upload stream, or a client result.
    pub(crate) async fn completion(&mut self, id: &str, result: Result<Option<Value>, String>) {
        if let Some(tx) = self.uploads.remove(id) {
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
            return; // Dropping the sender ends the stream.
        }
        let result = result.map(|v| v.unwrap_or_else(Value::null));
        if !self.ctx.connection.complete_result(id, result) {
            tracing::debug!(invocation_id = %id, "completion for unknown invocation ignored");
        }
    }

    /// CancelInvocation: stops a running stream. Unknown ids are ignored.
    pub(crate) fn cancel(&mut self, id: &str) {
        if let Some(token) = self.streams.get(id) {
            token.cancel();
        }
    }
}

/// Pumps a server-to-client stream: StreamItems, then one Completion (empty at the end or on
/// cancellation, with an error if the stream failed).
async fn run_stream(
    conn: ConnectionHandle,
    id: String,
    target: String,
    started: BoxFuture<'static, Outcome>,
    cancel: CancellationToken,
    detailed: bool,
) {
    let stream = tokio::select! {
        _ = cancel.cancelled() => {
            reply(&conn, HubMessage::Completion(Completion::empty(id)));
            return;
        }
        outcome = started => match outcome {
            Outcome::Stream(Ok(s)) => s,
            Outcome::Stream(Err(e)) => {
                complete_error(&conn, &Some(id), format!("An unexpected error occurred invoking '{target}' on the server.{}", e.client_suffix(detailed)));
                return;
            }
            Outcome::Value(_) => return,
        },
    };
    tokio::pin!(stream);
    loop {
        // Items are paced by the connection's queue: wait while it is half full.
        conn.outbound.wait_for_space().await;
        let next = tokio::select! {
            _ = cancel.cancelled() => None,
            item = stream.next() => Some(item),
        };
        match next {
            None | Some(None) => {
                reply(&conn, HubMessage::Completion(Completion::empty(id)));
                return;
            }
            Some(Some(Ok(item))) => {
                reply(
                    &conn,
                    HubMessage::StreamItem(StreamItem {
                        headers: Vec::new(),
                        invocation_id: id.clone(),
                        item,
                    }),
                );
            }
            Some(Some(Err(e))) => {
                complete_error(
                    &conn,
                    &Some(id),
                    format!(
                        "An error occurred on the server while streaming results.{}",
                        e.client_suffix(detailed)
                    ),
                );
                return;
            }
        }
    }
}
