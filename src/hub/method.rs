//! Typed hub methods: argument binding ([`FromArgs`], [`FromArg`]), results ([`IntoValue`]),
//! client-to-server upload streams ([`UploadStream`]), server-to-client streams
//! ([`channel_stream`]), and the type-erased method table entry the session dispatches to.
//!
//! Binding follows ASP.NET: the argument count must match exactly, upload streams are
//! matched by `streamIds` (not counted as arguments), and a value that cannot be converted to
//! the parameter type is a binding error, reported with ASP.NET's wording by the session.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{HubContext, HubError};
use crate::protocol::Value;

/// One upload-stream item as the session received it: a value, or the client's error.
pub type UploadItem = Result<Value, String>;

/// Why arguments could not be bound. The session turns these into ASP.NET's error texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindError {
    /// Wrong number of arguments.
    Count {
        /// Arguments sent.
        provided: usize,
        /// Parameters expected.
        expected: usize,
    },
    /// Wrong number of upload streams.
    Streams {
        /// Streams sent.
        provided: usize,
        /// Stream parameters expected.
        expected: usize,
    },
    /// A value did not convert to its parameter type.
    Type(String),
}

/// One hub method parameter.
pub trait FromArg: Sized + Send + 'static {
    /// Whether this parameter is an upload stream (bound from `streamIds`).
    const IS_STREAM: bool = false;

    /// Binds a regular argument.
    fn from_value(value: Value) -> Result<Self, BindError>;

    /// Binds an upload stream.
    fn from_stream(_rx: mpsc::Receiver<UploadItem>) -> Result<Self, BindError> {
        Err(BindError::Type("parameter is not a stream".into()))
    }
}

impl<T: DeserializeOwned + Send + 'static> FromArg for T {
    fn from_value(value: Value) -> Result<Self, BindError> {
        value.decode().map_err(|e| BindError::Type(e.to_string()))
    }
}

impl FromArg for Value {
    fn from_value(value: Value) -> Result<Self, BindError> {
        Ok(value)
    }
}

/// A client-to-server stream parameter (ASP.NET's `ChannelReader<T>` / `IAsyncEnumerable<T>`
/// parameter). Items are decoded as they are read; the buffer holds at most
/// `StreamBufferCapacity` (10) items, beyond which the connection's reads wait.
#[derive(Debug)]
pub struct UploadStream<T> {
    rx: mpsc::Receiver<UploadItem>,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> UploadStream<T> {
    /// The next item: `None` at the end of the stream, `Some(Err)` if the client reported an
    /// error or an item did not decode.
    pub async fn next(&mut self) -> Option<Result<T, HubError>> {
        let item = self.rx.recv().await?;
        Some(match item {
            Ok(v) => v
                .decode::<T>()
                .map_err(|e| HubError::new(format!("Failed to bind Stream message. {e}"))),
            Err(e) => Err(HubError::new(e)),
        })
    }
}

impl<T: DeserializeOwned + Send + 'static> FromArg for UploadStream<T> {
    const IS_STREAM: bool = true;

    fn from_value(_value: Value) -> Result<Self, BindError> {
        Err(BindError::Type("stream parameter given a value".into()))
    }

    fn from_stream(rx: mpsc::Receiver<UploadItem>) -> Result<Self, BindError> {
        Ok(UploadStream {
            rx,
            _t: std::marker::PhantomData,
        })
    }
}

/// A hub method's whole parameter list: a tuple of [`FromArg`]s.
pub trait FromArgs: Sized + Send + 'static {
    /// Number of regular arguments.
    fn arity() -> usize;
    /// Number of upload-stream parameters.
    fn stream_count() -> usize;
    /// Binds the arguments and upload streams (counts already checked).
    fn bind(args: Vec<Value>, streams: Vec<mpsc::Receiver<UploadItem>>) -> Result<Self, BindError>;
}

macro_rules! tuple_from_args {
    ($($t:ident),*) => {
        impl<$($t: FromArg),*> FromArgs for ($($t,)*) {
            fn arity() -> usize {
                0 $(+ usize::from(!$t::IS_STREAM))*
            }
            fn stream_count() -> usize {
                0 $(+ usize::from($t::IS_STREAM))*
            }
            #[allow(unused_variables, unused_mut, clippy::unused_unit)]
            fn bind(args: Vec<Value>, streams: Vec<mpsc::Receiver<UploadItem>>) -> Result<Self, BindError> {
                let mut args = args.into_iter();
                let mut streams = streams.into_iter();
                Ok(($(
                    if $t::IS_STREAM {
                        $t::from_stream(streams.next().ok_or(BindError::Type("missing stream".into()))?)?
                    } else {
                        $t::from_value(args.next().ok_or(BindError::Type("missing argument".into()))?)?
                    },
                )*))
            }
        }
    };
}

tuple_from_args!();
tuple_from_args!(A);
tuple_from_args!(A, B);
tuple_from_args!(A, B, C);
tuple_from_args!(A, B, C, D);
tuple_from_args!(A, B, C, D, E);
tuple_from_args!(A, B, C, D, E, F);
tuple_from_args!(A, B, C, D, E, F, G);
tuple_from_args!(A, B, C, D, E, F, G, H);

/// A value a hub method returns or a client method receives.
pub trait IntoValue: Send + 'static {
    /// Converts into a [`Value`] (serialized lazily per protocol).
    fn into_value(self) -> Value;
}

impl<T: Serialize + Send + Sync + 'static> IntoValue for T {
    fn into_value(self) -> Value {
        Value::from_serialize(self)
    }
}

impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}

/// Arguments of a client method call: a tuple of [`IntoValue`]s, or a `Vec<Value>`.
pub trait IntoArgs: Send {
    /// The argument list.
    fn into_args(self) -> Vec<Value>;
}

impl IntoArgs for Vec<Value> {
    fn into_args(self) -> Vec<Value> {
        self
    }
}

macro_rules! tuple_into_args {
    ($($t:ident),*) => {
        impl<$($t: IntoValue),*> IntoArgs for ($($t,)*) {
            #[allow(non_snake_case)]
            fn into_args(self) -> Vec<Value> {
                let ($($t,)*) = self;
                vec![$($t.into_value()),*]
            }
        }
    };
}

tuple_into_args!();
tuple_into_args!(A);
tuple_into_args!(A, B);
tuple_into_args!(A, B, C);
tuple_into_args!(A, B, C, D);
tuple_into_args!(A, B, C, D, E);
tuple_into_args!(A, B, C, D, E, F);

/// The writing side of a [`channel_stream`] (ASP.NET's `ChannelWriter<T>`).
#[derive(Debug)]
pub struct StreamWriter<T> {
    tx: mpsc::Sender<Result<T, HubError>>,
}

impl<T> Clone for StreamWriter<T> {
    fn clone(&self) -> Self {
        StreamWriter {
            tx: self.tx.clone(),
        }
    }
}

impl<T: Send> StreamWriter<T> {
    /// Writes an item, waiting while the stream's buffer is full. Returns false when the
    /// stream was cancelled or the connection ended.
    pub async fn write(&self, item: T) -> bool {
        self.tx.send(Ok(item)).await.is_ok()
    }

    /// Ends the stream with an error.
    pub async fn fail(self, error: HubError) {
        let _ = self.tx.send(Err(error)).await;
    }

    /// Resolves when the reading side is gone (stream cancelled or finished).
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// The reading side of a [`channel_stream`]; return it from a streaming hub method.
#[derive(Debug)]
pub struct ChannelStream<T> {
    rx: mpsc::Receiver<Result<T, HubError>>,
}

impl<T> Stream for ChannelStream<T> {
    type Item = Result<T, HubError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// A bounded channel whose reading side is a stream a hub method can return; the stream ends
/// when every writer is dropped (ASP.NET's `Channel.CreateBounded` + `ChannelReader`).
pub fn channel_stream<T>(capacity: usize) -> (StreamWriter<T>, ChannelStream<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (StreamWriter { tx }, ChannelStream { rx })
}

/// What invoking a method produced.
pub(crate) enum Outcome {
    /// A unary method's result.
    Value(Result<Value, HubError>),
    /// A streaming method's stream (or the error it failed with before streaming).
    Stream(Result<BoxStream<'static, Result<Value, HubError>>, HubError>),
}

type Erased = dyn Fn(
        HubContext,
        Vec<Value>,
        Vec<mpsc::Receiver<UploadItem>>,
    ) -> Result<BoxFuture<'static, Outcome>, BindError>
    + Send
    + Sync;

/// A registered method, type-erased.
#[derive(Clone)]
pub(crate) struct MethodEntry {
    /// Streaming (answers StreamInvocation) or unary (answers Invocation).
    pub streaming: bool,
    /// Regular argument count.
    pub arity: usize,
    /// Upload stream count.
    pub streams: usize,
    /// Binds and starts the call.
    pub call: Arc<Erased>,
}

impl MethodEntry {
    pub(crate) fn unary<A, T, F, Fut>(name: &str, f: F) -> MethodEntry
    where
        A: FromArgs,
        T: IntoValue,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, HubError>> + Send + 'static,
    {
        let call =
            move |ctx: HubContext, args: Vec<Value>, streams: Vec<mpsc::Receiver<UploadItem>>| {
                let bound = A::bind(args, streams)?;
                let fut = f(ctx, bound);
                Ok(
                    Box::pin(async move { Outcome::Value(fut.await.map(IntoValue::into_value)) })
                        as BoxFuture<'static, Outcome>,
                )
            };
        let _ = name;
        MethodEntry {
            streaming: false,
            arity: A::arity(),
            streams: A::stream_count(),
            call: Arc::new(call),
        }
    }

    pub(crate) fn stream<A, T, S, F, Fut>(name: &str, f: F) -> MethodEntry
    where
        A: FromArgs,
        T: IntoValue,
        S: Stream<Item = Result<T, HubError>> + Send + 'static,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<S, HubError>> + Send + 'static,
    {
        let call =
            move |ctx: HubContext, args: Vec<Value>, streams: Vec<mpsc::Receiver<UploadItem>>| {
                let bound = A::bind(args, streams)?;
                let fut = f(ctx, bound);
                Ok(Box::pin(async move {
                    Outcome::Stream(
                        fut.await
                            .map(|s| s.map(|item| item.map(IntoValue::into_value)).boxed()),
                    )
                }) as BoxFuture<'static, Outcome>)
            };
        let _ = name;
        MethodEntry {
            streaming: true,
            arity: A::arity(),
            streams: A::stream_count(),
            call: Arc::new(call),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn json(s: &'static str) -> Value {
        Value::Json(Bytes::from_static(s.as_bytes()))
    }

    #[test]
    fn tuple_arity_skips_streams() {
        assert_eq!(<(String, UploadStream<String>, i32)>::arity(), 2);
        assert_eq!(<(String, UploadStream<String>, i32)>::stream_count(), 1);
        assert_eq!(<()>::arity(), 0);
    }

    #[test]
    fn binds_typed_values() {
        let (a, b): (String, i64) =
            FromArgs::bind(vec![json("\"x\""), json("42")], vec![]).unwrap();
        assert_eq!((a.as_str(), b), ("x", 42));
        let err = <(i64,)>::bind(vec![json("\"x\"")], vec![]).unwrap_err();
        assert!(matches!(err, BindError::Type(_)));
    }
}
