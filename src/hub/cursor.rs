//! The node's per-user delivery cursor: server-side gap repair. Pure (no I/O, no clock).
//!
//! For every user with local connections the node remembers the last delivered position,
//! (epoch, offset). Each feed event from the backplane is checked against it:
//!
//! - `offset == last + 1` (same epoch): deliver;
//! - `offset <= last`: a duplicate (a redelivery, or an event a repair already delivered):
//!   drop;
//! - `offset > last + 1`: events were lost on the way (Redis pub/sub is at most once, the
//!   node's dispatch queue may drop): hold this event, ask for a history read after `last`
//!   ([`Fetch`]), deliver what it returns, then the held events, in offset order;
//! - another epoch: the history was lost and restarted; the position restarts at 0 of the
//!   new epoch (so a first event `1` is delivered at once, a later one repairs from 0).
//!
//! A resync (the backplane resubscribed after an outage, or the node dropped a message of
//! this user) asks for a read after `last` too. While a read is out, newer events are held
//! (at most [`MAX_HELD`]; beyond that they are dropped and read from history afterwards).
//! A read that brings nothing new while held events still leave a gap delivers the held
//! events anyway (the history no longer has the missing ones), so a repair always ends.
//! A user seen for the first time starts at whatever arrives (the page's first load calls
//! `Recover(null)`).

use std::collections::BTreeMap;
use std::sync::Arc;

/// Most events held per user while a history read is out.
pub const MAX_HELD: usize = 1024;

/// A history read to make: the events after `since`; answer with [`Cursor::on_page`] (or
/// [`Cursor::on_fetch_failed`]) passing `generation` back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// Identifies the read; answers to older reads are ignored.
    pub generation: u64,
    /// Read the events after this offset.
    pub since: u64,
}

/// What to do after a cursor step.
#[derive(Debug, PartialEq, Eq)]
pub struct Step<T> {
    /// Deliver these, in this order: (offset, item).
    pub deliver: Vec<(u64, T)>,
    /// Then make this history read.
    pub fetch: Option<Fetch>,
    /// Duplicates dropped by this step.
    pub duplicates: u64,
    /// Offsets given up as lost (neither delivered live nor found in history).
    pub lost: u64,
    /// Events delivered from a history read.
    pub repaired: u64,
}

impl<T> Default for Step<T> {
    fn default() -> Self {
        Step {
            deliver: Vec::new(),
            fetch: None,
            duplicates: 0,
            lost: 0,
            repaired: 0,
        }
    }
}

#[derive(Debug, Clone)]
struct Position {
    epoch: Arc<str>,
    last: u64,
    /// Set by [`Cursor::init`] from a history read, not by a delivery: events up to `last`
    /// may still be on their way, so they are delivered rather than dropped.
    provisional: bool,
}

#[derive(Debug)]
struct Repair<T> {
    generation: u64,
    held: BTreeMap<u64, T>,
    /// Held events were dropped (over [`MAX_HELD`]): read again afterwards.
    overflow: bool,
    /// A resync arrived while the read was out: read again afterwards.
    again: bool,
}

/// One user's cursor on one node.
#[derive(Debug)]
pub struct Cursor<T> {
    pos: Option<Position>,
    repair: Option<Repair<T>>,
    generation: u64,
}

impl<T> Default for Cursor<T> {
    fn default() -> Self {
        Cursor {
            pos: None,
            repair: None,
            generation: 0,
        }
    }
}

impl<T> Cursor<T> {
    /// A cursor that has seen nothing.
    pub fn new() -> Cursor<T> {
        Cursor::default()
    }

    /// The last delivered position, if any.
    pub fn position(&self) -> Option<(Arc<str>, u64)> {
        self.pos.as_ref().map(|p| (p.epoch.clone(), p.last))
    }

    /// Sets the position from a read of the history's top, for a user with no delivery
    /// yet (so a resync can repair from there); ignored once anything was delivered.
    pub fn init(&mut self, epoch: &Arc<str>, top: u64) {
        if self.pos.is_none() {
            self.pos = Some(Position {
                epoch: epoch.clone(),
                last: top,
                provisional: true,
            });
        }
    }

    /// Whether a history read is out.
    pub fn is_repairing(&self) -> bool {
        self.repair.is_some()
    }

    fn start_repair(&mut self, since: u64) -> Fetch {
        self.generation += 1;
        let generation = self.generation;
        self.repair = Some(Repair {
            generation,
            held: BTreeMap::new(),
            overflow: false,
            again: false,
        });
        Fetch { generation, since }
    }

    /// Gives up a repair: the held events are delivered in order (the gap before them is
    /// lost), and answers to its read are ignored from now on.
    fn flush(&mut self, step: &mut Step<T>) {
        let Some(repair) = self.repair.take() else {
            return;
        };
        self.generation += 1;
        let Some(pos) = self.pos.as_mut() else {
            return;
        };
        for (offset, item) in repair.held {
            if offset <= pos.last {
                step.duplicates += 1;
                continue;
            }
            step.lost += offset - pos.last - 1;
            pos.last = offset;
            step.deliver.push((offset, item));
        }
    }

    /// A live event.
    pub fn on_event(&mut self, epoch: &Arc<str>, offset: u64, item: T) -> Step<T> {
        let mut step = Step::default();
        let Some(pos) = self.pos.as_ref() else {
            self.pos = Some(Position {
                epoch: epoch.clone(),
                last: offset,
                provisional: false,
            });
            step.deliver.push((offset, item));
            return step;
        };
        if pos.epoch != *epoch {
            // The history restarted: whatever was held belongs to the old one.
            self.flush(&mut step);
            self.pos = Some(Position {
                epoch: epoch.clone(),
                last: 0,
                provisional: false,
            });
        }
        let (last, provisional) = self
            .pos
            .as_ref()
            .map_or((0, false), |p| (p.last, p.provisional));
        if offset <= last {
            if provisional && self.repair.is_none() {
                // Possibly appended before the position was read, and not delivered yet.
                step.deliver.push((offset, item));
            } else {
                step.duplicates += 1;
            }
            return step;
        }
        if let Some(pos) = self.pos.as_mut() {
            pos.provisional = false;
        }
        if let Some(repair) = self.repair.as_mut() {
            if repair.held.len() < MAX_HELD {
                repair.held.insert(offset, item);
            } else {
                repair.overflow = true;
            }
            return step;
        }
        if offset == last + 1 {
            if let Some(pos) = self.pos.as_mut() {
                pos.last = offset;
            }
            step.deliver.push((offset, item));
            return step;
        }
        let fetch = self.start_repair(last);
        if let Some(repair) = self.repair.as_mut() {
            repair.held.insert(offset, item);
        }
        step.fetch = Some(fetch);
        step
    }

    /// Messages of this user may have been lost: read the history after the last
    /// position (nothing to do for a user not seen yet).
    pub fn on_resync(&mut self) -> Option<Fetch> {
        let last = self.pos.as_ref()?.last;
        match self.repair.as_mut() {
            Some(repair) => {
                repair.again = true;
                None
            }
            None => Some(self.start_repair(last)),
        }
    }

    /// The answer to a history read: the history's epoch, its top offset, and the events
    /// after the read's `since` (oldest first).
    pub fn on_page(
        &mut self,
        generation: u64,
        epoch: &Arc<str>,
        top: u64,
        events: Vec<(u64, T)>,
    ) -> Step<T> {
        let mut step = Step::default();
        if self.repair.as_ref().map(|r| r.generation) != Some(generation) {
            return step; // A stale answer.
        }
        let Some(pos) = self.pos.as_ref() else {
            self.repair = None;
            return step;
        };
        if pos.epoch != *epoch {
            // The history restarted since we last delivered: deliver what is held (the old
            // history's newest events), then read the new history from its start.
            self.flush(&mut step);
            self.pos = Some(Position {
                epoch: epoch.clone(),
                last: 0,
                provisional: false,
            });
            if top > 0 {
                step.fetch = Some(self.start_repair(0));
            }
            return step;
        }
        let Some(mut repair) = self.repair.take() else {
            return step;
        };
        let Some(pos) = self.pos.as_mut() else {
            return step;
        };
        let before = pos.last;
        for (offset, item) in events {
            if offset <= pos.last {
                continue;
            }
            step.lost += offset - pos.last - 1;
            pos.last = offset;
            step.repaired += 1;
            step.deliver.push((offset, item));
        }
        let progressed = pos.last > before;
        // Held events that now follow on.
        while let Some(entry) = repair.held.first_entry() {
            let offset = *entry.key();
            if offset <= pos.last {
                entry.remove();
                step.duplicates += 1;
            } else if offset == pos.last + 1 {
                pos.last = offset;
                step.deliver.push((offset, entry.remove()));
            } else {
                break;
            }
        }
        let gap = !repair.held.is_empty();
        let behind = top > pos.last;
        if (gap || behind || repair.overflow || repair.again) && (progressed || repair.again) {
            let last = pos.last;
            let fetch = self.start_repair(last);
            if let Some(next) = self.repair.as_mut() {
                next.held = std::mem::take(&mut repair.held);
            }
            step.fetch = Some(fetch);
        } else if gap {
            // The history no longer has the missing events: deliver what is held.
            self.repair = Some(repair);
            self.flush(&mut step);
        }
        step
    }

    /// The history read failed (after the caller's retries): deliver what is held and
    /// accept the gap.
    pub fn on_fetch_failed(&mut self, generation: u64) -> Step<T> {
        let mut step = Step::default();
        if self.repair.as_ref().map(|r| r.generation) == Some(generation) {
            self.flush(&mut step);
        }
        step
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn offsets(step: &Step<&'static str>) -> Vec<u64> {
        step.deliver.iter().map(|(o, _)| *o).collect()
    }

    fn page(r: std::ops::RangeInclusive<u64>) -> Vec<(u64, &'static str)> {
        r.map(|o| (o, "h")).collect()
    }

    #[test]
    fn in_order_events_are_delivered_and_duplicates_dropped() {
        let mut c = Cursor::new();
        let a = e("A");
        assert_eq!(
            offsets(&c.on_event(&a, 5, "x")),
            vec![5],
            "first seen: any offset"
        );
        assert_eq!(offsets(&c.on_event(&a, 6, "x")), vec![6]);
        let dup = c.on_event(&a, 6, "x");
        assert!(dup.deliver.is_empty());
        assert_eq!(dup.duplicates, 1);
        assert_eq!(c.on_event(&a, 3, "x").duplicates, 1);
        assert_eq!(c.position(), Some((a, 6)));
    }

    #[test]
    fn a_jump_repairs_from_history_then_delivers_held_events() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, "live");
        let step = c.on_event(&a, 4, "live4");
        assert!(step.deliver.is_empty());
        let fetch = step.fetch.expect("fetch");
        assert_eq!(fetch.since, 1);
        // More live events while the read is out: held, including a duplicate of 4.
        assert!(c.on_event(&a, 5, "live5").deliver.is_empty());
        assert!(c.on_event(&a, 4, "again4").deliver.is_empty());
        // The read returns 2..=4 (top 4: 5 was appended after the read).
        let step = c.on_page(fetch.generation, &a, 4, page(2..=4));
        assert_eq!(offsets(&step), vec![2, 3, 4, 5]);
        assert_eq!(step.deliver[2].1, "h", "4 from history");
        assert_eq!(step.deliver[3].1, "live5");
        assert_eq!(step.repaired, 3);
        assert!(step.fetch.is_none());
        assert!(!c.is_repairing());
        assert_eq!(offsets(&c.on_event(&a, 6, "x")), vec![6]);
    }

    #[test]
    fn a_second_gap_during_repair_reads_again() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, "x");
        let f1 = c.on_event(&a, 3, "x").fetch.unwrap();
        c.on_event(&a, 7, "x"); // 4..6 lost too
        let step = c.on_page(f1.generation, &a, 3, page(2..=3));
        assert_eq!(offsets(&step), vec![2, 3]);
        let f2 = step.fetch.expect("second read");
        assert_eq!(f2.since, 3);
        // The first answer again (stale): ignored.
        assert!(c
            .on_page(f1.generation, &a, 3, page(2..=3))
            .deliver
            .is_empty());
        let step = c.on_page(f2.generation, &a, 7, page(4..=7));
        assert_eq!(offsets(&step), vec![4, 5, 6, 7]);
        assert_eq!(step.duplicates, 1, "held 7 came from history too");
        assert!(step.fetch.is_none());
    }

    #[test]
    fn a_limited_page_reads_on() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, "x");
        let f = c.on_event(&a, 10, "x").fetch.unwrap();
        let step = c.on_page(f.generation, &a, 10, page(2..=4));
        assert_eq!(offsets(&step), vec![2, 3, 4]);
        let f = step.fetch.expect("more");
        assert_eq!(f.since, 4);
        let step = c.on_page(f.generation, &a, 10, page(5..=9));
        assert_eq!(offsets(&step), vec![5, 6, 7, 8, 9, 10]);
        assert!(step.fetch.is_none());
    }

    #[test]
    fn a_trimmed_history_gives_up_the_gap() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, "x");
        let f = c.on_event(&a, 50, "x").fetch.unwrap();
        // Only 40..=50 are still kept.
        let step = c.on_page(f.generation, &a, 50, page(40..=50));
        assert_eq!(step.deliver.first().map(|d| d.0), Some(40));
        assert_eq!(step.lost, 38);
        assert!(step.fetch.is_none());
        // Expired entirely: nothing new, the held event goes out anyway.
        let f = c.on_event(&a, 60, "x").fetch.unwrap();
        let step = c.on_page(f.generation, &a, 60, vec![]);
        assert_eq!(offsets(&step), vec![60]);
        assert_eq!(step.lost, 9);
        assert!(!c.is_repairing());
    }

    #[test]
    fn resync_reads_after_the_last_position() {
        let mut c: Cursor<&str> = Cursor::new();
        assert_eq!(c.on_resync(), None, "unknown user: nothing to repair");
        let a = e("A");
        c.on_event(&a, 3, "x");
        let f = c.on_resync().expect("read");
        assert_eq!(f.since, 3);
        assert_eq!(c.on_resync(), None, "already reading");
        // The resync during the read asks for one more read.
        let step = c.on_page(f.generation, &a, 5, page(4..=5));
        assert_eq!(offsets(&step), vec![4, 5]);
        let f = step.fetch.expect("again");
        let step = c.on_page(f.generation, &a, 5, vec![]);
        assert!(step.deliver.is_empty() && step.fetch.is_none());
        assert!(!c.is_repairing());
    }

    #[test]
    fn an_epoch_change_restarts_at_zero() {
        let mut c = Cursor::new();
        let (a, b) = (e("A"), e("B"));
        c.on_event(&a, 40, "x");
        assert_eq!(offsets(&c.on_event(&b, 1, "x")), vec![1]);
        // New epoch seen mid-way: read it from its start.
        let mut c = Cursor::new();
        c.on_event(&a, 40, "x");
        let f = c.on_event(&b, 3, "x").fetch.unwrap();
        assert_eq!(f.since, 0);
        let step = c.on_page(f.generation, &b, 3, page(1..=3));
        assert_eq!(offsets(&step), vec![1, 2, 3]);
        // A resync that finds another epoch delivers what is held and reads the new one.
        let mut c = Cursor::new();
        c.on_event(&a, 7, "x");
        let f = c.on_event(&a, 9, "held9").fetch.unwrap();
        let step = c.on_page(f.generation, &b, 2, page(8..=8));
        assert_eq!(offsets(&step), vec![9], "held old-epoch event");
        let f = step.fetch.expect("read the new epoch");
        assert_eq!(f.since, 0);
        let step = c.on_page(f.generation, &b, 2, page(1..=2));
        assert_eq!(offsets(&step), vec![1, 2]);
        assert_eq!(c.position(), Some((b, 2)));
    }

    #[test]
    fn holding_is_bounded_and_overflow_reads_again() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, 0u64);
        let f = c.on_event(&a, 3, 3).fetch.unwrap();
        for o in 4..(4 + MAX_HELD as u64 + 10) {
            c.on_event(&a, o, o);
        }
        let top = 3 + MAX_HELD as u64 + 10;
        let step = c.on_page(f.generation, &a, 3, vec![(2, 2), (3, 3)]);
        // 2, 3, then the held ones that follow on.
        assert_eq!(step.deliver.len(), MAX_HELD + 1);
        let f = step.fetch.expect("overflow: read the rest");
        let rest: Vec<(u64, u64)> = ((f.since + 1)..=top).map(|o| (o, o)).collect();
        let step = c.on_page(f.generation, &a, top, rest);
        assert_eq!(step.deliver.last().map(|d| d.0), Some(top));
        assert!(step.fetch.is_none());
    }

    #[test]
    fn an_initial_position_delivers_what_may_be_in_flight() {
        let mut c = Cursor::new();
        let a = e("A");
        c.init(&a, 5);
        // 5 was appended before the read but is still on its way: delivered.
        assert_eq!(offsets(&c.on_event(&a, 5, "x")), vec![5]);
        assert_eq!(offsets(&c.on_event(&a, 6, "x")), vec![6]);
        assert_eq!(
            c.on_event(&a, 6, "x").duplicates,
            1,
            "real deliveries dedupe"
        );
        c.init(&a, 100);
        assert_eq!(
            c.position(),
            Some((a.clone(), 6)),
            "ignored after deliveries"
        );
        // A resync from an initial position reads after it.
        let mut c: Cursor<&str> = Cursor::new();
        c.init(&a, 9);
        assert_eq!(c.on_resync().map(|f| f.since), Some(9));
    }

    #[test]
    fn a_failed_read_delivers_what_is_held() {
        let mut c = Cursor::new();
        let a = e("A");
        c.on_event(&a, 1, "x");
        let f = c.on_event(&a, 5, "x").fetch.unwrap();
        c.on_event(&a, 6, "x");
        let step = c.on_fetch_failed(f.generation);
        assert_eq!(offsets(&step), vec![5, 6]);
        assert_eq!(step.lost, 3);
        assert!(!c.is_repairing());
        assert_eq!(offsets(&c.on_event(&a, 7, "x")), vec![7]);
    }
}
