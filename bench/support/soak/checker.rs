//! What a soak client does with feed events, and the check of what it applied. Pure logic,
//! no I/O.
//!
//! - [`Recipe`] is the documented client recipe (README "Delivery guarantees"): it keeps the
//!   last applied `offset` and the `epoch`; a live event with `offset <= last` is dropped, one
//!   with `last + 1` is applied, a gap is stashed and repaired with `Recover({offset, epoch})`
//!   (single flight); after a reconnect it calls `Recover` with its position. Events without
//!   an offset (a server without history) are applied as they come.
//! - [`Track`] checks what the recipe applied against the publisher's ground truth: the
//!   user's sequence number `k` must go 1 by 1 after deduplication by id. A `k` at or below the
//!   last one is a duplicate (the same id) unless it was missing (then it came out of order);
//!   a jump leaves missing `k`s (lost unless they come later). The first violation per user
//!   is kept with context, saying whose fault it looks like.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Deserialize;

/// Most stashed live events while a gap is repaired.
pub const MAX_STASH: usize = 10_000;
/// Most missing `k`s remembered per client.
pub const MAX_MISSING: usize = 100_000;

/// A feed event as the soak publishes it, with the server's `offset` when present.
#[derive(Debug, Clone, Deserialize)]
pub struct Ev {
    /// Stable event id.
    pub id: String,
    /// Publish time, µs since the epoch.
    pub t: u64,
    /// Per recipient, that user's sequence number.
    pub ks: HashMap<String, u64>,
    /// The server's per-user offset (feedhub with history).
    #[serde(default)]
    pub offset: Option<u64>,
}

/// `Recover`'s result.
#[derive(Debug, Clone, Deserialize)]
pub struct Recovered {
    /// Events after the given offset (the same objects `FeedUpdated` carries).
    #[serde(default)]
    pub events: Vec<serde_json::Value>,
    /// Whether the history reached back to the position.
    pub recovered: bool,
    /// The current offset.
    pub offset: u64,
    /// The current epoch.
    pub epoch: String,
}

/// How an applied event arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Live (`FeedUpdated`).
    Live,
    /// From `Recover` after a reconnect or a gap: repaired from history.
    Repaired,
    /// From the first load (`Recover(null)`): not a delivery to time.
    Initial,
}

/// Where the checker's numbers go.
pub trait Record {
    /// An event applied for the first time, with its latency since publishing.
    fn delivered(&self, latency_us: u64, kind: Kind);
    /// The same id applied again (a republished or redelivered event).
    fn duplicate(&self);
    /// A live event the recipe dropped because its offset was already applied.
    fn offset_duplicate(&self);
    /// A `k` that arrived after a later one (it had been counted missing).
    fn out_of_order(&self);
    /// A violation (first one per user is kept).
    fn violation(&self, user: &str, what: String);
}

/// The ground-truth check of one client.
#[derive(Debug)]
pub struct Track {
    /// The client's user.
    pub user: String,
    /// Highest `k` applied.
    pub last_k: u64,
    started: bool,
    missing: BTreeSet<u64>,
    /// Events applied (first time).
    pub applied: u64,
    /// Times the client had to reload (`recovered: false`).
    pub reloads: u64,
    /// The last few (offset, k) applied, for violation context.
    recent: Vec<(Option<u64>, u64)>,
}

impl Track {
    /// A fresh check for a client of `user`.
    pub fn new(user: String) -> Track {
        Track {
            user,
            last_k: 0,
            started: false,
            missing: BTreeSet::new(),
            applied: 0,
            reloads: 0,
            recent: Vec::new(),
        }
    }

    /// `k`s still missing.
    pub fn missing(&self) -> usize {
        self.missing.len()
    }

    /// The app reloaded its feed (`recovered: false`): the next event starts a new baseline.
    pub fn reload(&mut self) {
        self.reloads += 1;
        self.started = false;
    }

    /// Checks one applied event. `context` describes how it arrived.
    pub fn apply(&mut self, ev: &Ev, kind: Kind, now_us: u64, rec: &dyn Record, context: &str) {
        let Some(&k) = ev.ks.get(&self.user) else {
            rec.violation(
                &self.user,
                format!(
                    "event {} (offset {:?}) is not addressed to user {} (ks={:?}): misrouted by the server, {context}",
                    ev.id, ev.offset, self.user, ev.ks
                ),
            );
            return;
        };
        if self.recent.len() >= 8 {
            self.recent.remove(0);
        }
        self.recent.push((ev.offset, k));
        if !self.started {
            self.started = true;
            self.last_k = k;
            self.applied += 1;
            rec.delivered(now_us.saturating_sub(ev.t), kind);
            return;
        }
        if k <= self.last_k {
            if self.missing.remove(&k) {
                rec.out_of_order();
                rec.violation(
                    &self.user,
                    format!(
                        "k={k} (id {}, offset {:?}) arrived after k={}: out of order, {context}; recent (offset,k): {:?}",
                        ev.id, ev.offset, self.last_k, self.recent
                    ),
                );
                self.applied += 1;
                rec.delivered(now_us.saturating_sub(ev.t), kind);
            } else {
                rec.duplicate();
            }
            return;
        }
        if k > self.last_k + 1 {
            let gap = k - self.last_k - 1;
            let contiguous = self
                .recent
                .iter()
                .rev()
                .nth(1)
                .and_then(|(o, _)| *o)
                .zip(ev.offset)
                .is_some_and(|(prev, cur)| cur == prev + 1);
            let blame = if contiguous {
                "offsets are contiguous, so the server appended the events without the missing ones (ingest lost them)"
            } else if ev.offset.is_some() {
                "the offsets jumped too and the recipe did not repair the gap (recovery incomplete)"
            } else {
                "the events carry no offset (no history on this server): nothing could repair the gap"
            };
            rec.violation(
                &self.user,
                format!(
                    "k jumped {} -> {k} (id {}, offset {:?}): {gap} missing; {blame}; {context}; recent (offset,k): {:?}",
                    self.last_k, ev.id, ev.offset, self.recent
                ),
            );
            for m in self.last_k + 1..k {
                if self.missing.len() >= MAX_MISSING {
                    break;
                }
                self.missing.insert(m);
            }
        }
        self.last_k = k;
        self.applied += 1;
        rec.delivered(now_us.saturating_sub(ev.t), kind);
    }
}

/// What the client must do after the recipe handled something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Nothing.
    Nothing,
    /// Call `Recover` with this argument (`None` = `Recover(null)`).
    Recover(Option<(u64, String)>),
}

/// The client recipe (see the module doc).
#[derive(Debug, Default)]
pub struct Recipe {
    /// Last applied offset.
    pub last: Option<u64>,
    /// The epoch of `last`.
    pub epoch: Option<String>,
    stash: BTreeMap<u64, Ev>,
    /// A `Recover` call is in flight.
    pub recovering: bool,
    /// The next `Recover` result repairs a reconnect or a gap (not a first load).
    repairing: bool,
    /// The server has no history (`Recover` is unknown): apply events as they come.
    pub no_history: bool,
    /// `Recover` calls in a row that stopped short of their position.
    reasks: u32,
}

impl Recipe {
    /// The `Recover` call to make on a (re)connect: the first load, or a repair from the
    /// position.
    pub fn on_connect(&mut self) -> Next {
        if self.no_history {
            return Next::Nothing;
        }
        self.recovering = true;
        match (&self.last, &self.epoch) {
            (Some(o), Some(e)) => {
                self.repairing = true;
                Next::Recover(Some((*o, e.clone())))
            }
            _ => {
                self.repairing = false;
                Next::Recover(None)
            }
        }
    }

    /// The connection ended: a `Recover` in flight is lost with it.
    pub fn on_disconnect(&mut self) {
        self.recovering = false;
    }

    /// A live `FeedUpdated` event.
    pub fn on_live(
        &mut self,
        ev: Ev,
        track: &mut Track,
        now_us: u64,
        rec: &dyn Record,
        ctx: &str,
    ) -> Next {
        let Some(offset) = ev.offset else {
            track.apply(&ev, Kind::Live, now_us, rec, ctx);
            return Next::Nothing;
        };
        if self.recovering || self.last.is_none() {
            if self.no_history && self.last.is_none() {
                self.last = Some(offset);
                track.apply(&ev, Kind::Live, now_us, rec, ctx);
                return Next::Nothing;
            }
            self.push_stash(offset, ev);
            if !self.recovering {
                // The first load failed (history unavailable): load again.
                self.recovering = true;
                self.repairing = false;
                return Next::Recover(None);
            }
            return Next::Nothing;
        }
        let last = self.last.unwrap_or(0);
        if offset <= last {
            rec.offset_duplicate();
            return Next::Nothing;
        }
        if offset == last + 1 && self.stash.is_empty() {
            self.last = Some(offset);
            track.apply(&ev, Kind::Live, now_us, rec, ctx);
            return Next::Nothing;
        }
        self.push_stash(offset, ev);
        self.drain(track, now_us, rec, ctx, Kind::Live);
        if self.stash.is_empty() || self.no_history {
            return Next::Nothing;
        }
        self.recovering = true;
        self.repairing = true;
        Next::Recover(Some((
            self.last.unwrap_or(0),
            self.epoch.clone().unwrap_or_default(),
        )))
    }

    fn push_stash(&mut self, offset: u64, ev: Ev) {
        if self.stash.len() >= MAX_STASH {
            // Bounded: the newest are dropped; Recover fetches them again.
            return;
        }
        self.stash.insert(offset, ev);
    }

    /// Applies stashed events that continue `last`; drops stale ones.
    fn drain(&mut self, track: &mut Track, now_us: u64, rec: &dyn Record, ctx: &str, kind: Kind) {
        while let Some((&o, _)) = self.stash.first_key_value() {
            let last = self.last.unwrap_or(0);
            if o <= last {
                self.stash.pop_first();
                rec.offset_duplicate();
            } else if o == last + 1 {
                if let Some((_, ev)) = self.stash.pop_first() {
                    self.last = Some(o);
                    track.apply(&ev, kind, now_us, rec, ctx);
                }
            } else {
                break;
            }
        }
    }

    /// `Recover` is not a hub method here (a server without history).
    pub fn on_no_history(&mut self, track: &mut Track, now_us: u64, rec: &dyn Record, ctx: &str) {
        self.no_history = true;
        self.recovering = false;
        let stash = std::mem::take(&mut self.stash);
        for (_, ev) in stash {
            track.apply(&ev, Kind::Live, now_us, rec, ctx);
        }
    }

    /// `Recover`'s result.
    pub fn on_recovered(
        &mut self,
        r: Recovered,
        track: &mut Track,
        now_us: u64,
        rec: &dyn Record,
        ctx: &str,
    ) -> Next {
        self.recovering = false;
        let repairing = self.repairing;
        let kind = if repairing {
            Kind::Repaired
        } else {
            Kind::Initial
        };
        let epoch_changed = self.epoch.as_deref().is_some_and(|e| e != r.epoch);
        if !r.recovered || (epoch_changed && repairing) {
            // The app reloads its feed from its own API and takes the returned position.
            rec.violation(
                &track.user,
                format!(
                    "Recover from {:?}/{:?} answered recovered:{} at {}/{} (history lost or rolled back: the app must reload); {ctx}",
                    self.last, self.epoch, r.recovered, r.offset, r.epoch
                ),
            );
            track.reload();
            self.last = Some(r.offset);
            self.epoch = Some(r.epoch);
            self.stash.retain(|o, _| *o > r.offset);
            self.drain(track, now_us, rec, ctx, Kind::Live);
            return Next::Nothing;
        }
        self.epoch = Some(r.epoch.clone());
        for v in r.events {
            let ev: Ev = match serde_json::from_value(v) {
                Ok(ev) => ev,
                Err(e) => {
                    rec.violation(
                        &track.user,
                        format!("Recover returned an event that is not the soak's: {e}; {ctx}"),
                    );
                    continue;
                }
            };
            let Some(o) = ev.offset else {
                rec.violation(
                    &track.user,
                    format!("Recover returned event {} without an offset; {ctx}", ev.id),
                );
                continue;
            };
            match self.last {
                Some(last) if o <= last => rec.offset_duplicate(),
                _ => {
                    self.last = Some(o);
                    track.apply(&ev, kind, now_us, rec, ctx);
                }
            }
        }
        match self.last {
            None => self.last = Some(r.offset),
            Some(l) if l < r.offset => {
                // The result stops short of its own position (the recover limit): ask
                // again from where it ended, a bounded number of times.
                self.reasks += 1;
                if self.reasks <= 5 {
                    self.recovering = true;
                    self.repairing = true;
                    return Next::Recover(Some((l, r.epoch)));
                }
                rec.violation(
                    &track.user,
                    format!(
                        "Recover keeps stopping at {l} short of its position {}; {ctx}",
                        r.offset
                    ),
                );
                self.last = Some(r.offset);
            }
            Some(_) => {}
        }
        self.reasks = 0;
        self.drain(track, now_us, rec, ctx, kind);
        if !self.stash.is_empty() {
            self.recovering = true;
            self.repairing = true;
            return Next::Recover(Some((self.last.unwrap_or(0), r.epoch)));
        }
        Next::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct Log {
        delivered: RefCell<u64>,
        repaired: RefCell<u64>,
        dups: RefCell<u64>,
        odups: RefCell<u64>,
        ooo: RefCell<u64>,
        violations: RefCell<Vec<String>>,
    }
    impl Record for Log {
        fn delivered(&self, _l: u64, kind: Kind) {
            *self.delivered.borrow_mut() += 1;
            if kind == Kind::Repaired {
                *self.repaired.borrow_mut() += 1;
            }
        }
        fn duplicate(&self) {
            *self.dups.borrow_mut() += 1;
        }
        fn offset_duplicate(&self) {
            *self.odups.borrow_mut() += 1;
        }
        fn out_of_order(&self) {
            *self.ooo.borrow_mut() += 1;
        }
        fn violation(&self, _u: &str, what: String) {
            self.violations.borrow_mut().push(what);
        }
    }

    fn ev(k: u64, offset: Option<u64>) -> Ev {
        Ev {
            id: format!("e{k}"),
            t: 0,
            ks: [("u".to_string(), k)].into_iter().collect(),
            offset,
        }
    }

    fn val(k: u64, o: u64) -> serde_json::Value {
        serde_json::json!({"id": format!("e{k}"), "t": 0, "ks": {"u": k}, "offset": o})
    }

    #[test]
    fn in_order_duplicates_and_gaps_are_told_apart() {
        let log = Log::default();
        let mut t = Track::new("u".into());
        for k in [1, 2, 2, 3, 5, 4, 6] {
            t.apply(&ev(k, None), Kind::Live, 0, &log, "");
        }
        assert_eq!(*log.dups.borrow(), 1);
        assert_eq!(*log.ooo.borrow(), 1);
        assert_eq!(t.missing(), 0);
        assert_eq!(t.last_k, 6);
        t.apply(&ev(9, None), Kind::Live, 0, &log, "");
        assert_eq!(t.missing(), 2);
    }

    #[test]
    fn recipe_repairs_a_gap_with_recover() {
        let log = Log::default();
        let mut t = Track::new("u".into());
        let mut r = Recipe::default();
        assert_eq!(r.on_connect(), Next::Recover(None));
        let first = Recovered {
            events: vec![val(1, 10), val(2, 11)],
            recovered: true,
            offset: 11,
            epoch: "e".into(),
        };
        assert_eq!(r.on_recovered(first, &mut t, 0, &log, ""), Next::Nothing);
        assert_eq!(
            r.on_live(ev(3, Some(12)), &mut t, 0, &log, ""),
            Next::Nothing
        );
        assert_eq!(
            r.on_live(ev(3, Some(12)), &mut t, 0, &log, ""),
            Next::Nothing
        );
        assert_eq!(*log.odups.borrow(), 1);
        // 13 is lost on the wire; 14 arrives: stash and recover from 12.
        assert_eq!(
            r.on_live(ev(5, Some(14)), &mut t, 0, &log, ""),
            Next::Recover(Some((12, "e".into())))
        );
        let rep = Recovered {
            events: vec![val(4, 13), val(5, 14)],
            recovered: true,
            offset: 14,
            epoch: "e".into(),
        };
        assert_eq!(r.on_recovered(rep, &mut t, 0, &log, ""), Next::Nothing);
        assert_eq!(t.last_k, 5);
        assert_eq!(t.missing(), 0);
        assert!(
            log.violations.borrow().is_empty(),
            "{:?}",
            log.violations.borrow()
        );
        // Both came from Recover (the stashed copy of 14 is then a duplicate by offset).
        assert_eq!(*log.repaired.borrow(), 2);
        assert_eq!(*log.odups.borrow(), 2);
        // A reconnect recovers from the position.
        r.on_disconnect();
        assert_eq!(r.on_connect(), Next::Recover(Some((14, "e".into()))));
        // A live event during the call is stashed and applied after the result.
        assert_eq!(
            r.on_live(ev(7, Some(16)), &mut t, 0, &log, ""),
            Next::Nothing
        );
        let rep = Recovered {
            events: vec![val(6, 15)],
            recovered: true,
            offset: 15,
            epoch: "e".into(),
        };
        assert_eq!(r.on_recovered(rep, &mut t, 0, &log, ""), Next::Nothing);
        assert_eq!(t.last_k, 7);
        assert!(
            log.violations.borrow().is_empty(),
            "{:?}",
            log.violations.borrow()
        );
    }

    #[test]
    fn recovered_false_is_a_reload_and_reported() {
        let log = Log::default();
        let mut t = Track::new("u".into());
        let mut r = Recipe {
            last: Some(5),
            epoch: Some("a".into()),
            ..Recipe::default()
        };
        let _ = r.on_connect();
        let rep = Recovered {
            events: vec![],
            recovered: false,
            offset: 2,
            epoch: "b".into(),
        };
        assert_eq!(r.on_recovered(rep, &mut t, 0, &log, ""), Next::Nothing);
        assert_eq!(t.reloads, 1);
        assert_eq!(log.violations.borrow().len(), 1);
        assert_eq!(r.last, Some(2));
    }
}
