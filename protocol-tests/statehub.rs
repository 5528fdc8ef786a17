//! The test hub of the stateful-reconnect tests (`/statehub`), included with `#[path]`.
//!
//! - `Numbers(count, delayMs, dropAt)`: streams 1..=count; before yielding each number in
//!   `dropAt` it runs the test's "cut" hook (the round-robin proxy's `drop_connections`), so
//!   the transport dies mid-stream at a known point.
//! - `Record(i)` / `Recorded()`: the client's messages as the server processed them (to
//!   check that resent client messages are processed exactly once).
//! - `Counters()`: `[OnConnected runs, OnDisconnected runs]`.
//! - `Resumes()`: `[stateful resumes, messages resent, relays opened]` of this process.
//! - `Echo(v)`: returns `v` (latency probes). `Cut()`: runs the cut hook now.
#![allow(dead_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use feedhub::hub::{HubBuilder, HubContext, HubDefinition, HubError};
use feedhub::metrics::METRICS;
use futures_util::stream;

/// The path of the test hub.
pub const STATE_HUB: &str = "/statehub";

/// Hook that cuts the client's transport.
pub type Cut = Arc<Mutex<Option<Box<dyn Fn() + Send + Sync>>>>;

/// What the test inspects.
#[derive(Clone, Default)]
pub struct HubState {
    /// OnConnected runs.
    pub connected: Arc<AtomicUsize>,
    /// OnDisconnected runs.
    pub disconnected: Arc<AtomicUsize>,
    /// `Record` arguments in processing order.
    pub recorded: Arc<Mutex<Vec<i64>>>,
    /// The cut hook.
    pub cut: Cut,
}

impl HubState {
    /// Sets the cut hook.
    pub fn set_cut(&self, f: impl Fn() + Send + Sync + 'static) {
        *self.cut.lock().unwrap() = Some(Box::new(f));
    }
}

/// The hub, with stateful reconnect on; `configure` adjusts its options further.
pub fn state_hub(
    state: &HubState,
    configure: impl FnOnce(&mut feedhub::hub::HubOptions),
) -> HubDefinition {
    let (c1, d1, r1, r2, cut) = (
        state.connected.clone(),
        state.disconnected.clone(),
        state.recorded.clone(),
        state.recorded.clone(),
        state.cut.clone(),
    );
    let (c2, d2) = (state.connected.clone(), state.disconnected.clone());
    let cut2 = state.cut.clone();
    HubBuilder::new(STATE_HUB)
        .configure(|o| {
            o.stateful_reconnect = true;
            configure(o);
        })
        .on_connected(move |_ctx| {
            c1.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .on_disconnected(move |_ctx, _err| {
            d1.fetch_add(1, Ordering::SeqCst);
            async {}
        })
        .stream(
            "Numbers",
            move |_c: HubContext, (count, delay_ms, drop_at): (i64, u64, Vec<i64>)| {
                let cut = cut.clone();
                async move {
                    let s = stream::unfold(1i64, move |i| {
                        let cut = cut.clone();
                        let drop_at = drop_at.clone();
                        async move {
                            if i > count {
                                return None;
                            }
                            if delay_ms > 0 {
                                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            }
                            if drop_at.contains(&i) {
                                if let Some(f) = cut.lock().unwrap().as_ref() {
                                    f();
                                }
                            }
                            Some((Ok::<_, HubError>(i), i + 1))
                        }
                    });
                    Ok::<_, HubError>(s)
                }
            },
        )
        .method("Record", move |_c: HubContext, (i,): (i64,)| {
            let r = r1.clone();
            async move {
                r.lock().unwrap().push(i);
                Ok::<_, HubError>(())
            }
        })
        .method("Recorded", move |_c: HubContext, (): ()| {
            let r = r2.clone();
            async move { Ok::<_, HubError>(r.lock().unwrap().clone()) }
        })
        .method("Counters", move |_c: HubContext, (): ()| {
            let (c, d) = (c2.clone(), d2.clone());
            async move {
                Ok::<_, HubError>(vec![
                    c.load(Ordering::SeqCst) as i64,
                    d.load(Ordering::SeqCst) as i64,
                ])
            }
        })
        .method("Resumes", |_c: HubContext, (): ()| async move {
            Ok::<_, HubError>(vec![
                METRICS.stateful_resumes.load(Ordering::Relaxed) as i64,
                METRICS.stateful_resent.load(Ordering::Relaxed) as i64,
                METRICS.relays_opened.load(Ordering::Relaxed) as i64,
            ])
        })
        .method(
            "Echo",
            |_c: HubContext, (v,): (feedhub::protocol::Value,)| async move { Ok::<_, HubError>(v) },
        )
        .method("Cut", move |_c: HubContext, (): ()| {
            let cut = cut2.clone();
            async move {
                if let Some(f) = cut.lock().unwrap().as_ref() {
                    f();
                }
                Ok::<_, HubError>(())
            }
        })
        .method("ConnectionId", |c: HubContext, (): ()| async move {
            Ok::<_, HubError>(c.connection_id().to_string())
        })
        .build()
}
