//! The soak's counters: totals and per phase (the warm-up, then one phase per fault from its
//! start to the next fault's, then the drain), delivery latency per second of the run (HDR
//! histograms), and the first violation per user. Shared by every client task; updates are
//! atomics or short mutexes, never held across an await.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use hdrhistogram::Histogram;

use super::checker::{Kind, Record};

/// Most phases (faults + 2).
pub const MAX_PHASES: usize = 64;

/// Counters of one phase.
#[derive(Default)]
pub struct Phase {
    /// Events applied for the first time, live.
    pub live: AtomicU64,
    /// Events applied for the first time from `Recover` after a reconnect or a gap.
    pub repaired: AtomicU64,
    /// The same id applied again.
    pub duplicates: AtomicU64,
    /// Live events the recipe dropped by offset.
    pub offset_duplicates: AtomicU64,
    /// Out-of-order arrivals.
    pub out_of_order: AtomicU64,
    /// Violations.
    pub violations: AtomicU64,
    /// Worst latency (µs) of an event applied in this phase.
    pub worst_us: AtomicU64,
    /// Fresh connections (negotiate) after the first.
    pub reconnects: AtomicU64,
    /// Stateful resumes that worked.
    pub resumes: AtomicU64,
    /// Stateful resumes that failed (a fresh connection followed).
    pub resume_failures: AtomicU64,
}

/// Everything the clients count.
pub struct Stats {
    /// When the run started.
    pub started: Instant,
    /// The current phase.
    pub phase: AtomicUsize,
    /// Per-phase counters.
    pub phases: Vec<Phase>,
    /// Latency (µs) of first deliveries (live and repaired) per second of the run.
    pub per_second: Vec<Mutex<Histogram<u32>>>,
    /// Latency (µs) of live first deliveries over the whole run.
    pub live_hist: Mutex<Histogram<u64>>,
    /// First violation per user.
    pub first_violation: Mutex<BTreeMap<String, String>>,
    /// Violations in total.
    pub violations: AtomicU64,
    /// Connect attempts that failed.
    pub connect_failures: AtomicU64,
    /// The last connect failure.
    pub last_connect_error: Mutex<Option<String>>,
    /// `Recover` calls that failed (history unavailable while Redis restarts); the recipe
    /// asks again at the next gap.
    pub recover_errors: AtomicU64,
    /// Events received that the client could not parse.
    pub malformed: AtomicU64,
    /// The stalled client: connections it opened, and Close messages it read (with reasons).
    pub stall_connects: AtomicU64,
    /// Close reasons the stalled client saw.
    pub stall_closes: Mutex<Vec<String>>,
}

fn hist(sigfig: u8) -> Histogram<u32> {
    Histogram::new_with_bounds(1, 3_600_000_000, sigfig).expect("histogram bounds")
}

impl Stats {
    /// Counters for a run of about `secs` seconds.
    pub fn new(secs: usize) -> Stats {
        Stats {
            started: Instant::now(),
            phase: AtomicUsize::new(0),
            phases: (0..MAX_PHASES).map(|_| Phase::default()).collect(),
            per_second: (0..secs + 600).map(|_| Mutex::new(hist(2))).collect(),
            live_hist: Mutex::new(
                Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("histogram bounds"),
            ),
            first_violation: Mutex::new(BTreeMap::new()),
            violations: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            last_connect_error: Mutex::new(None),
            recover_errors: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            stall_connects: AtomicU64::new(0),
            stall_closes: Mutex::new(Vec::new()),
        }
    }

    /// The current phase's counters.
    pub fn now(&self) -> &Phase {
        &self.phases[self.phase.load(Ordering::Relaxed).min(MAX_PHASES - 1)]
    }

    /// Seconds since the start.
    pub fn secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// A connect attempt failed.
    pub fn connect_failed(&self, e: &anyhow::Error) {
        self.connect_failures.fetch_add(1, Ordering::Relaxed);
        *self
            .last_connect_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(format!("{e:#}"));
    }

    /// Merged per-second histograms over `[from, to)` seconds.
    pub fn window(&self, from: f64, to: f64) -> Histogram<u32> {
        let mut h = hist(2);
        let a = from.max(0.0) as usize;
        let b = (to.max(0.0).ceil() as usize).min(self.per_second.len());
        for s in a..b {
            let _ = h.add(&*self.per_second[s].lock().unwrap_or_else(|p| p.into_inner()));
        }
        h
    }
}

impl Record for Stats {
    fn delivered(&self, latency_us: u64, kind: Kind) {
        let p = self.now();
        match kind {
            Kind::Initial => return,
            Kind::Live => {
                p.live.fetch_add(1, Ordering::Relaxed);
                let _ = self
                    .live_hist
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record(latency_us.max(1));
            }
            Kind::Repaired => {
                p.repaired.fetch_add(1, Ordering::Relaxed);
            }
        }
        p.worst_us.fetch_max(latency_us, Ordering::Relaxed);
        let s = self.started.elapsed().as_secs() as usize;
        if let Some(h) = self.per_second.get(s) {
            let _ = h
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(latency_us.clamp(1, 3_600_000_000));
        }
    }

    fn duplicate(&self) {
        self.now().duplicates.fetch_add(1, Ordering::Relaxed);
    }

    fn offset_duplicate(&self) {
        self.now().offset_duplicates.fetch_add(1, Ordering::Relaxed);
    }

    fn out_of_order(&self) {
        self.now().out_of_order.fetch_add(1, Ordering::Relaxed);
    }

    fn violation(&self, user: &str, what: String) {
        self.violations.fetch_add(1, Ordering::Relaxed);
        self.now().violations.fetch_add(1, Ordering::Relaxed);
        let mut m = self
            .first_violation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !m.contains_key(user) {
            eprintln!(
                "soak: first violation for user {user} at {:.1}s: {what}",
                self.secs()
            );
            m.insert(user.to_string(), format!("at {:.1}s: {what}", self.secs()));
        }
    }
}
