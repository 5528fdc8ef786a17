//! Stateful reconnect bookkeeping (hub protocol version 2, messages Ack and Sequence), as
//! ASP.NET's `MessageBuffer` and the JS client's `MessageBuffer.ts` do it.
//!
//! Only "sequenced" messages count: Invocation, StreamItem, Completion, StreamInvocation and
//! CancelInvocation. Ids start at 1 and grow by one per sequenced message, in each direction.
//!
//! - Outbound, [`ReplayBuffer`]: every sequenced message written to the transport is kept,
//!   with its id, until the client acknowledges it (`Ack { sequenceId }` = the id of the
//!   last message it received). The buffer is bounded by messages and by bytes; when it is
//!   full the session stops draining the connection's outbound queue (backpressure: the
//!   queue's own bound and slow-consumer policy then decide), it never drops a sent message.
//!   After a reconnect the session writes `Sequence { first buffered id }` and then every
//!   buffered message again.
//! - Inbound, [`InboundSeq`]: counts the client's sequenced messages, remembers the highest
//!   id processed, drops the duplicates a client resends after a reconnect (its `Sequence`
//!   message resets the counter) and says when an Ack is due.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::protocol::HubMessage;

/// Bounds of the replay buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayLimits {
    /// Most unacknowledged bytes (ASP.NET `StatefulReconnectBufferSize`, 100,000).
    pub max_bytes: usize,
    /// Most unacknowledged messages.
    pub max_messages: usize,
}

impl Default for ReplayLimits {
    fn default() -> Self {
        ReplayLimits {
            max_bytes: 100_000,
            max_messages: 10_000,
        }
    }
}

/// Whether a message type takes a sequence id (types 1 to 5).
pub fn is_sequenced(msg: &HubMessage) -> bool {
    msg.is_sequenced()
}

/// Sent but unacknowledged messages.
#[derive(Debug)]
pub struct ReplayBuffer {
    items: VecDeque<(u64, Bytes)>,
    bytes: usize,
    /// Id of the last message sent (0: none yet).
    last_id: u64,
    limits: ReplayLimits,
}

impl ReplayBuffer {
    /// An empty buffer.
    pub fn new(limits: ReplayLimits) -> ReplayBuffer {
        ReplayBuffer {
            items: VecDeque::new(),
            bytes: 0,
            last_id: 0,
            limits,
        }
    }

    /// Bytes that may still be added before the buffer is full (0 when full). A single
    /// message larger than what is left is still taken when the buffer is not full, as the
    /// JS client does: the bound is reached, then the sender waits.
    pub fn room(&self) -> usize {
        if self.items.len() >= self.limits.max_messages || self.bytes >= self.limits.max_bytes {
            0
        } else {
            self.limits.max_bytes - self.bytes
        }
    }

    /// Messages that may still be added before the buffer is full.
    pub fn room_messages(&self) -> usize {
        self.limits.max_messages.saturating_sub(self.items.len())
    }

    /// Records a sent message and returns its id.
    pub fn push(&mut self, frame: Bytes) -> u64 {
        self.last_id += 1;
        self.bytes += frame.len();
        self.items.push_back((self.last_id, frame));
        self.last_id
    }

    /// The client received everything up to `id`: forget it. Returns how many were freed.
    pub fn ack(&mut self, id: u64) -> usize {
        let mut n = 0;
        while let Some((first, _)) = self.items.front() {
            if *first > id {
                break;
            }
            if let Some((_, f)) = self.items.pop_front() {
                self.bytes -= f.len();
                n += 1;
            }
        }
        n
    }

    /// The id the `Sequence` message after a reconnect carries: the first buffered id, or
    /// the next id when nothing is buffered.
    pub fn resume_id(&self) -> u64 {
        self.items.front().map_or(self.last_id + 1, |(id, _)| *id)
    }

    /// The buffered frames, oldest first.
    pub fn frames(&self) -> impl Iterator<Item = &Bytes> {
        self.items.iter().map(|(_, f)| f)
    }

    /// Buffered messages and bytes.
    pub fn depth(&self) -> (usize, usize) {
        (self.items.len(), self.bytes)
    }

    /// Id of the last message sent.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }
}

/// What to do with a received sequenced message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// New: process it.
    New,
    /// Already processed before the reconnect: drop it.
    Duplicate,
}

/// Inbound sequence tracking.
#[derive(Debug, Default)]
pub struct InboundSeq {
    next_id: u64,
    latest: u64,
    /// Highest id acknowledged to the client.
    acked: u64,
}

impl InboundSeq {
    /// Nothing received yet.
    pub fn new() -> InboundSeq {
        InboundSeq {
            next_id: 1,
            latest: 0,
            acked: 0,
        }
    }

    /// Counts one sequenced message from the client.
    pub fn received(&mut self) -> Received {
        let id = self.next_id;
        self.next_id += 1;
        if id <= self.latest {
            Received::Duplicate
        } else {
            self.latest = id;
            Received::New
        }
    }

    /// The client's `Sequence { id }`: the next message it sends has this id. An id past
    /// what we have seen would skip messages: an error.
    pub fn reset(&mut self, id: u64) -> Result<(), String> {
        if id == 0 || id > self.latest + 1 {
            return Err(format!(
                "Sequence ID {id} is greater than the amount of messages received ({}).",
                self.latest
            ));
        }
        self.next_id = id;
        Ok(())
    }

    /// The id to acknowledge, if there is something new to acknowledge; marks it acked.
    pub fn take_ack(&mut self) -> Option<u64> {
        if self.latest > self.acked {
            self.acked = self.latest;
            Some(self.latest)
        } else {
            None
        }
    }

    /// Whether an Ack is owed.
    pub fn ack_due(&self) -> bool {
        self.latest > self.acked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_trims_and_resume_id_follows() {
        let mut b = ReplayBuffer::new(ReplayLimits {
            max_bytes: 10,
            max_messages: 100,
        });
        assert_eq!(b.resume_id(), 1);
        for _ in 0..3 {
            b.push(Bytes::from_static(b"abc"));
        }
        assert_eq!(b.room(), 1);
        b.push(Bytes::from_static(b"abc"));
        assert_eq!(b.room(), 0, "full once the bound is reached");
        assert_eq!(b.ack(2), 2);
        assert_eq!(b.depth(), (2, 6));
        assert_eq!(b.resume_id(), 3);
        assert_eq!(b.ack(2), 0, "a repeated ack frees nothing");
        assert_eq!(b.ack(99), 2);
        assert_eq!(b.resume_id(), 5);
    }

    #[test]
    fn message_bound() {
        let mut b = ReplayBuffer::new(ReplayLimits {
            max_bytes: 1000,
            max_messages: 2,
        });
        b.push(Bytes::from_static(b"a"));
        b.push(Bytes::from_static(b"a"));
        assert_eq!(b.room(), 0);
    }

    #[test]
    fn inbound_dedupes_after_sequence_reset() {
        let mut s = InboundSeq::new();
        for _ in 0..3 {
            assert_eq!(s.received(), Received::New);
        }
        assert_eq!(s.take_ack(), Some(3));
        assert_eq!(s.take_ack(), None);
        // The client reconnects and resends from 2.
        s.reset(2).unwrap();
        assert_eq!(s.received(), Received::Duplicate);
        assert_eq!(s.received(), Received::Duplicate);
        assert_eq!(s.received(), Received::New);
        assert!(s.ack_due());
        assert!(s.reset(9).is_err());
        assert!(s.reset(0).is_err());
    }
}
