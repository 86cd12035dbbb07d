//! Where each version's copies went: the node holding its L2 copy (the buddy at the time the
//! copy landed) and the node keeping the parity that covers it (L3), so that a caller can
//! name the copy it will restore from ([`Store::copy_holder`], [`Store::parity_state`]).
//!
//! A version put again under the same number (a recovery rolled the owner back and its
//! checkpointer numbers on from there) starts afresh: what the earlier image reached says
//! nothing about the new one ([`Inner::reset_key`]).
use super::{Inner, Key, Level, Store};
use std::collections::HashMap;

/// Where L3 stands for a version this node put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParityState {
    /// The flush has not reached L3 yet, or the parity set waits for other members.
    Waiting,
    /// No parity covers this version: the store writes none, this node is in no parity
    /// set, or its set cannot complete (a member or the holder is gone).
    Skipped,
    /// A complete parity set covers it, kept at node `holder`.
    Safe { holder: usize },
    /// The image could not be sent to its parity holder.
    Failed(String),
}

/// The flush's L3 decision for a version: `Ok(None)` no parity, `Ok(Some(holder))` sent to
/// `holder`, `Err(why)` failed.
pub(super) type ParityPlan = Result<Option<usize>, String>;

/// Versions of one owner further than this below a new one are forgotten by the plans and
/// holders maps (the store keeps far fewer).
const FORGET_BELOW: u64 = 64;

impl Store {
    /// The node holding `owner`'s `version` at `level` while it is safe there: this node for
    /// L1, the buddy the copy landed on for L2, the parity holder for L3; `None` for L4 (a
    /// disk directory) or a version not safe at `level`.
    pub fn copy_holder(&self, owner: &str, version: u64, level: Level) -> Option<usize> {
        if !self.is_safe(owner, version, level) {
            return None;
        }
        self.inner
            .holders
            .lock()
            .expect("lock")
            .get(&(owner.to_string(), version))
            .and_then(|h| h[level as usize])
    }

    /// Where L3 stands for `owner`'s `version` (see [`ParityState`]).
    pub fn parity_state(&self, owner: &str, version: u64) -> ParityState {
        let key = (owner.to_string(), version);
        let plan = self
            .inner
            .parity_plan
            .lock()
            .expect("lock")
            .get(&key)
            .cloned();
        match plan {
            None => ParityState::Waiting,
            Some(Ok(None)) => ParityState::Skipped,
            Some(Err(e)) => ParityState::Failed(e),
            Some(Ok(Some(holder))) => {
                if self.is_safe(owner, version, Level::L3) {
                    ParityState::Safe { holder }
                } else {
                    ParityState::Waiting
                }
            }
        }
    }
}

impl Inner {
    /// Marks `key` safe at `level`, held by `node`.
    pub(super) fn mark_safe_at(&self, key: &Key, level: Level, node: usize) {
        {
            let mut holders = self.holders.lock().expect("lock");
            forget_old(&mut holders, key);
            holders.entry(key.clone()).or_default()[level as usize] = Some(node);
        }
        self.mark_safe(key, level);
    }

    /// Records the flush's L3 decision for `key`.
    pub(super) fn plan_parity(&self, key: &Key, plan: ParityPlan) {
        let mut plans = self.parity_plan.lock().expect("lock");
        forget_old(&mut plans, key);
        plans.insert(key.clone(), plan);
    }

    /// The node holding `key`'s L2 copy, if one was acknowledged.
    pub(super) fn l2_holder(&self, key: &Key) -> Option<usize> {
        self.holders
            .lock()
            .expect("lock")
            .get(key)
            .and_then(|h| h[Level::L2 as usize])
    }

    /// A new image under `key` (put again after a rollback): nothing the previous one
    /// reached counts for it.
    pub(super) fn reset_key(&self, key: &Key) {
        if let Some(s) = self.safe.lock().expect("lock").get_mut(key) {
            *s = [false; 4];
        }
        self.holders.lock().expect("lock").remove(key);
        self.parity_plan.lock().expect("lock").remove(key);
    }
}

/// Drops the entries of `key`'s owner more than [`FORGET_BELOW`] versions below it.
fn forget_old<V>(map: &mut HashMap<Key, V>, key: &Key) {
    if key.1 > FORGET_BELOW && map.len() > 4 * FORGET_BELOW as usize {
        map.retain(|k, _| k.0 != key.0 || k.1 + FORGET_BELOW >= key.1);
    }
}
