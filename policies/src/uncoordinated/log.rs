//! The bookkeeping of sender-based pessimistic message logging, as the policy sees it.
//!
//! The payloads live in the senders' memory and the determinants (sender, sequence number,
//! receive order) at the receivers' buddies: the rank library and krund hold the bytes. The
//! policy keeps the index: what each receiver delivered since its newest safe checkpoint
//! (what a restart of that rank replays, in order), how much the senders hold, and what the
//! log may forget once a receiver's checkpoint is safe (garbage collection: a delivery
//! before a safe checkpoint of its receiver is never replayed again).
use std::collections::BTreeMap;

use crate::primitives::{Rank, Version};
use serde::{Deserialize, Serialize};

/// One delivery, as its determinant records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub from: Rank,
    pub seq: u64,
    /// The receiver's delivery count at this delivery.
    pub order: u64,
    /// The receiver's newest own checkpoint at the delivery.
    pub interval: Version,
    pub bytes: u64,
}

/// Totals of the message log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// Messages (and payload bytes) the senders logged.
    pub logged_messages: u64,
    pub logged_bytes: u64,
    /// Determinants made durable (one per delivery).
    pub determinants: u64,
    /// Messages garbage-collected (their receiver's later checkpoint is safe).
    pub collected_messages: u64,
    pub collected_bytes: u64,
    /// Messages replayed to restarted ranks.
    pub replayed_messages: u64,
}

impl LogStats {
    /// Payload bytes the senders hold now.
    pub fn held_bytes(&self) -> u64 {
        self.logged_bytes.saturating_sub(self.collected_bytes)
    }

    pub fn held_messages(&self) -> u64 {
        self.logged_messages.saturating_sub(self.collected_messages)
    }
}

/// The policy's index of the message log.
#[derive(Clone, Debug, Default)]
pub struct MessageLog {
    /// Per receiver: deliveries not yet covered by one of its safe checkpoints, in order.
    pending: BTreeMap<Rank, Vec<Delivery>>,
    stats: LogStats,
}

impl MessageLog {
    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// A sender logged a message of `bytes`.
    pub fn logged(&mut self, bytes: u64) {
        self.stats.logged_messages += 1;
        self.stats.logged_bytes += bytes;
    }

    /// `to` delivered a message after its determinant was made durable.
    pub fn delivered(&mut self, to: Rank, d: Delivery) {
        self.stats.determinants += 1;
        let v = self.pending.entry(to).or_default();
        // Reports of one receiver come in order; keep it sorted if a batch was reordered.
        let at = v.partition_point(|x| x.order < d.order);
        if v.get(at).is_some_and(|x| x.order == d.order) {
            return;
        }
        v.insert(at, d);
    }

    /// `rank`'s checkpoint `version` is safe: deliveries before it are never replayed, so
    /// their payloads and determinants may go. Returns the messages collected.
    pub fn trim(&mut self, rank: Rank, version: Version) -> u64 {
        let Some(v) = self.pending.get_mut(&rank) else {
            return 0;
        };
        let keep = v.split_off(v.partition_point(|d| d.interval < version));
        let gone = std::mem::replace(v, keep);
        self.stats.collected_messages += gone.len() as u64;
        self.stats.collected_bytes += gone.iter().map(|d| d.bytes).sum::<u64>();
        gone.len() as u64
    }

    /// What a restart of `rank` from `version` (`None`: the start) replays, in the recorded
    /// order: the deliveries after that checkpoint.
    pub fn replay_of(&self, rank: Rank, version: Option<Version>) -> Vec<Delivery> {
        let from = version.unwrap_or(0);
        self.pending
            .get(&rank)
            .map(|v| v.iter().filter(|d| d.interval >= from).copied().collect())
            .unwrap_or_default()
    }

    /// Every rank re-executes from its start (a re-wiring): whatever was delivered before
    /// is sent again by its re-executing sender, never replayed; the totals stay.
    pub fn forget_deliveries(&mut self) {
        self.pending.clear();
    }

    pub fn count_replayed(&mut self, n: u64) {
        self.stats.replayed_messages += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(order: u64, interval: Version) -> Delivery {
        Delivery {
            from: 1,
            seq: order,
            order,
            interval,
            bytes: 10,
        }
    }

    #[test]
    fn a_safe_checkpoint_collects_what_was_delivered_before_it() {
        let mut log = MessageLog::default();
        for (o, i) in [(0, 0), (1, 0), (2, 1), (3, 2)] {
            log.logged(10);
            log.delivered(0, d(o, i));
        }
        assert_eq!(log.replay_of(0, Some(1)).len(), 2);
        assert_eq!(log.trim(0, 1), 2);
        assert_eq!(log.stats().held_bytes(), 20);
        let replay: Vec<u64> = log.replay_of(0, Some(1)).iter().map(|d| d.order).collect();
        assert_eq!(replay, vec![2, 3]);
        assert_eq!(log.replay_of(0, Some(2)).len(), 1);
    }

    #[test]
    fn deliveries_are_kept_in_receive_order_without_duplicates() {
        let mut log = MessageLog::default();
        log.delivered(0, d(1, 0));
        log.delivered(0, d(0, 0));
        log.delivered(0, d(1, 0));
        let orders: Vec<u64> = log.replay_of(0, None).iter().map(|d| d.order).collect();
        assert_eq!(orders, vec![0, 1]);
    }
}
