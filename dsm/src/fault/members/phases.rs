//! A member's side of a view change: the setting phase (connect to a newcomer, prepare
//! the next view), the logical phase (switch; entries migrate), the end (commit).
use super::*;

impl Engine {
    /// Adds node `id`'s descriptors of the regions (a join's setting phase).
    pub(crate) fn extend_regions(&self, id: NodeId, regions: &Descriptors) -> Result<()> {
        let mut map = self.regions.write().map_err(|_| poisoned())?;
        for (first, export, words) in regions {
            let Some(r) = map.get(first) else {
                continue; // freed since
            };
            let e = RemoteRegion::from_bytes(export)?;
            let w = RemoteRegion::from_bytes(words)?;
            let mut remote_export = r.remote_export.clone();
            let mut remote_words = r.remote_words.clone();
            let n = id as usize + 1;
            if remote_export.len() < n {
                remote_export.resize(n, e);
                remote_words.resize(n, w);
            }
            remote_export[id as usize] = e;
            remote_words[id as usize] = w;
            let info = RegionInfo {
                first_page: r.first_page,
                pages: r.pages,
                base: r.base,
                export: r.export.clone(),
                words: r.words.clone(),
                remote_export,
                remote_words,
            };
            map.insert(*first, Arc::new(info));
        }
        Ok(())
    }

    /// Setting phase at a member: connect to a newcomer, prepare the next view.
    pub(super) fn on_install(
        &self,
        epoch: u64,
        change: ViewChange,
        addr: &[u8],
        regions: &Descriptors,
    ) -> Result<()> {
        if let ViewChange::Join(id) = change {
            let peer = self.ep.connect(&EndpointAddress::from_bytes(addr)?)?;
            self.add_peer(id, peer)?;
            self.extend_regions(id, regions)?;
        }
        if let ViewChange::Fail(id) = change {
            // Node 0 knows it died; this member may not have heard yet.
            self.drop_dead(&[id])?;
        }
        let dead = self.dead_nodes();
        let c = {
            let mut v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_mut().ok_or_else(|| no_view(self.me))?;
            v.pending = Some((epoch, change));
            if let ViewChange::Join(id) = change {
                v.addrs.insert(id, addr.to_vec());
            }
            Change {
                epoch,
                locator: v.locator(Some(change)),
                old_members: v.members().difference(&dead).copied().collect(),
                new_members: v.members_after(change).difference(&dead).copied().collect(),
                failed: match change {
                    ViewChange::Fail(n) => Some(n),
                    _ => None,
                },
            }
        };
        self.node.lock().map_err(|_| poisoned())?.prepare_change(c);
        Ok(())
    }

    /// Logical phase at a member: switch to the next view (entries migrate).
    pub(super) fn on_migrate(&self, epoch: u64) -> Result<()> {
        let mut remote = Vec::new();
        let finished = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            let actions = node.start_change(epoch);
            self.execute(&mut node, actions, Data::None, &mut remote)?;
            node.take_finished()
        };
        self.after_actions(remote, finished)
    }

    /// Test injection ([`Members::hold`]): node 0 switches, but its entries and markers
    /// wait until it forwarded or held a request (at most 10 s); the others have not
    /// switched yet, so their requests reach node 0's old entries (forwarded) and node 0's
    /// requests reach entries still at their old managers (held).
    pub(super) fn migrate_held(&self, epoch: u64) -> Result<()> {
        let moved = |n: &crate::coherence::Node<crate::fault::RegisteredWords>| {
            n.stats.requests_forwarded + n.stats.requests_delayed
        };
        let mut remote = Vec::new();
        let (before, held) = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            let before = moved(&node);
            let (held, rest): (Vec<_>, Vec<_>) = node.start_change(epoch).into_iter().partition(
                |a| matches!(a, crate::coherence::Action::Send { msg, .. } if msg.is_migration()),
            );
            self.execute(&mut node, rest, Data::None, &mut remote)?;
            (before, held)
        };
        if !remote.is_empty() {
            self.run_remote(std::mem::take(&mut remote))?;
        }
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until && moved(&*self.node.lock().map_err(|_| poisoned())?) == before
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        let finished = {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            self.execute(&mut node, held, Data::None, &mut remote)?;
            node.take_finished()
        };
        self.after_actions(remote, finished)
    }

    /// Step 4 of the change to `epoch` ran here.
    pub(in crate::fault) fn migration_finished(&self, epoch: u64) -> Result<()> {
        let lost = self.lost_here()?;
        self.ctl_to(self.coordinator(), Ctl::Migrated { epoch, lost })
    }

    /// The pages this node, as a manager, knows lost (in live regions).
    fn lost_here(&self) -> Result<Vec<PageId>> {
        Ok(self
            .node
            .lock()
            .map_err(|_| poisoned())?
            .directory
            .lost_pages()
            .into_iter()
            .filter(|&p| region_of(&self.regions, p).is_some())
            .collect())
    }

    /// What a change left here, for a new coordinator ([`Ctl::State`]).
    pub(super) fn change_state(&self) -> Result<Ctl> {
        let (epoch, pending) = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(self.me))?;
            (v.epoch, v.pending)
        };
        let (switched, done) = match pending {
            Some((e, _)) => {
                let node = self.node.lock().map_err(|_| poisoned())?;
                let switched = node.epoch() == e;
                (switched, switched && !node.migrating())
            }
            None => (false, false),
        };
        let migrated = if done { Some(self.lost_here()?) } else { None };
        Ok(Ctl::State {
            epoch,
            pending,
            switched,
            migrated,
        })
    }

    /// End phase at a member: the view of `epoch` is the current one.
    pub(super) fn on_commit(&self, epoch: u64) -> Result<()> {
        let change = {
            let mut v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_mut().ok_or_else(|| no_view(self.me))?;
            let (e, c) = v.pending.take().ok_or_else(|| DsmError::Config {
                what: "membership".into(),
                reason: format!("commit of epoch {epoch} without a prepared change"),
            })?;
            if e != epoch {
                return Err(DsmError::Config {
                    what: "membership".into(),
                    reason: format!("commit of epoch {epoch}, epoch {e} was prepared"),
                });
            }
            v.history.push(c);
            v.epoch = epoch;
            match c {
                ViewChange::Join(n) => v.next_id = v.next_id.max(n + 1),
                ViewChange::Leave(n) => {
                    v.gone.insert(n);
                }
                ViewChange::Fail(n) => {
                    v.failed.insert(n);
                }
            }
            c
        };
        if let ViewChange::Fail(n) = change {
            if let Ok(mut p) = self.members.participants.lock() {
                p.remove(&n);
            }
            // Every manager rebuilt its entries: what still waits is asked again.
            let mut remote = Vec::new();
            {
                let mut node = self.node.lock().map_err(|_| poisoned())?;
                let actions = node.resend_outstanding();
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
            if !remote.is_empty() {
                self.run_remote(remote)?;
            }
            self.barrier_recheck()?;
        }
        if let ViewChange::Leave(n) = change {
            if let Ok(mut p) = self.members.participants.lock() {
                p.remove(&n);
            }
            if n != self.me {
                // Like a dead node: out of every copyset, never sent to again.
                self.drop_dead(&[n])?;
            }
            self.barrier_recheck()?;
        }
        Ok(())
    }
}
