//! A node that joins a running DSM, a node that leaves it, and node 0's side of both
//! (the protocol is in [`crate::fault::members`]).
use std::time::{Duration, Instant};

use fabric::{EndpointAddress, FabricError};

use super::*;
use crate::coherence::Change;
use crate::fault::members::{self, ChangeReport, Ctl, View, ViewChange};
use crate::fault::TAG_DSM_MEMBER;

/// The collectives of a node that joined during the run: it takes no part in the job's
/// all-gathers (allocations are among the initial ranks, before any change).
struct NoCollective {
    rank: usize,
    size: usize,
}

impl Collective for NoCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn allgather(&mut self, _blob: &[u8]) -> std::result::Result<Vec<Vec<u8>>, String> {
        Err(format!(
            "node {} joined during the run: the job's collectives (alloc, free) are among \
             its initial ranks",
            self.rank
        ))
    }
}

/// The end of one attempt to join: a member, or the address to ask again at.
enum Joined {
    Member(Dsm),
    Again(EndpointAddress),
}

fn join_error(reason: impl std::fmt::Display) -> DsmError {
    DsmError::Collective {
        what: "join".into(),
        reason: reason.to_string(),
    }
}

impl Dsm {
    /// Where a node that joins reaches this DSM: node 0's endpoint address (hex), for
    /// [`Dsm::join`].
    pub fn contact(&self) -> Result<String> {
        let coordinator = self.engine.coordinator();
        let v = self
            .engine
            .members
            .view
            .lock()
            .map_err(|_| collective("contact", "poisoned"))?;
        let addr = v
            .as_ref()
            .and_then(|v| v.addrs.get(&coordinator).cloned())
            .ok_or_else(|| {
                collective(
                    "contact",
                    format!("the coordinator's (node {coordinator}) address is unknown"),
                )
            })?;
        Ok(EndpointAddress::from_bytes(&addr)?.to_hex())
    }

    /// Joins a running DSM through `contact` ([`Dsm::contact`] of one of its nodes): node 0
    /// admits this node (at once, or when it calls [`Dsm::admit`]); it maps every region at
    /// its address, becomes the manager of the directory entries the locator gives it
    /// (they migrate from their old managers while the others keep faulting), and may
    /// access the regions, and take the DSM locks. It takes no part in the job's barriers
    /// and allocations.
    /// Returns once the change is committed everywhere.
    ///
    /// If node 0 dies during the join, the next coordinator finishes it (some member
    /// switched to it) or drops it and tells this node, which then asks it again from the
    /// start (a new endpoint, a new welcome), all within `within`.
    pub fn join(
        contact: &str,
        fabric: &FabricConfig,
        config: DsmConfig,
        within: Duration,
    ) -> Result<Dsm> {
        let start = Instant::now();
        let deadline = start + within;
        let mut coordinator = EndpointAddress::from_hex(contact.trim())?;
        loop {
            match Dsm::join_once(&coordinator, fabric, config.clone(), start, deadline)? {
                Joined::Member(dsm) => return Ok(dsm),
                Joined::Again(next) => {
                    eprintln!(
                        "krun dsm: the coordinator died before the join was set up; asking \
                         the next coordinator again"
                    );
                    coordinator = next;
                }
            }
        }
    }

    /// One attempt of [`Dsm::join`] through `coordinator`.
    fn join_once(
        coordinator: &EndpointAddress,
        fabric: &FabricConfig,
        config: DsmConfig,
        start: Instant,
        deadline: Instant,
    ) -> Result<Joined> {
        let ep: Arc<dyn Endpoint> = Arc::from(fabric::open(fabric)?);
        let c_peer = ep.connect(coordinator)?;
        let own = ep.address();
        members::send_raw(
            &*ep,
            c_peer,
            u32::MAX,
            &Ctl::Join {
                addr: own.to_bytes(),
            },
        )?;
        let welcome = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DsmError::Timeout {
                    what: "join: waiting for node 0's welcome".into(),
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            match ep.recv(TAG_DSM_MEMBER, left.min(Duration::from_millis(100))) {
                Ok(m) => match members::decode(&m.data) {
                    Ok((_, Ctl::Welcome(w))) => break *w,
                    Ok((_, other)) => return Err(join_error(format!("node 0 answered {other:?}"))),
                    Err(e) => return Err(join_error(format!("node 0's answer: {e}"))),
                },
                Err(FabricError::RecvTimeout { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let id = welcome.id;
        let n = id as usize + 1;
        if welcome.addrs.iter().any(|(m, _)| *m >= id) || welcome.epoch == 0 {
            return Err(join_error(format!(
                "malformed welcome (id {id}, epoch {})",
                welcome.epoch
            )));
        }
        let mut peers = vec![None; n];
        for (m, addr) in &welcome.addrs {
            peers[*m as usize] = Some(ep.connect(&EndpointAddress::from_bytes(addr)?)?);
        }
        let this = ep.connect(&own)?;
        peers[id as usize] = Some(this);
        // The regions, at their addresses, with this node's memory registered.
        let regions: Regions = Arc::new(RwLock::new(BTreeMap::new()));
        let uffd = Uffd::open()?;
        let mut mapped = BTreeMap::new();
        let mut ready = Vec::new();
        let mut next_page = 0;
        for r in &welcome.regions {
            let bytes = r.pages as usize * PAGE;
            map(r.base, bytes, true).map_err(|e| {
                join_error(format!(
                    "the region at {:#x} ({bytes} bytes) cannot be mapped at its address \
                     here: {e}",
                    r.base
                ))
            })?;
            mapped.insert(r.base, bytes);
            let export = ep.register(Region::new(crate::fault::words::export_len(
                r.pages as usize,
            ))?)?;
            let words = ep.register(Region::new(r.pages as usize * 8)?)?;
            let parse = |all: &[Vec<u8>], mine: RemoteRegion| -> Result<Vec<RemoteRegion>> {
                (0..n)
                    .map(|i| -> Result<RemoteRegion> {
                        match all.get(i) {
                            _ if i == id as usize => Ok(mine),
                            Some(b) if !b.is_empty() => Ok(RemoteRegion::from_bytes(b)?),
                            // A node gone: never addressed (no connection).
                            _ => Ok(mine),
                        }
                    })
                    .collect()
            };
            let info = RegionInfo {
                first_page: r.first_page,
                pages: r.pages,
                base: r.base,
                remote_export: parse(&r.export, export.remote())?,
                remote_words: parse(&r.words, words.remote())?,
                export: export.clone(),
                words: words.clone(),
            };
            ready.push((
                r.first_page,
                export.remote().to_bytes().to_vec(),
                words.remote().to_bytes().to_vec(),
            ));
            regions
                .write()
                .map_err(|_| join_error("poisoned"))?
                .insert(r.first_page, Arc::new(info));
            uffd.register(r.base, bytes as u64)?;
            next_page = next_page.max(r.first_page + r.pages);
        }
        // The view before this join; the join is the change in progress.
        let kind = if welcome.dynamic {
            LocatorKind::CellTree
        } else {
            LocatorKind::Modulo
        };
        let mut view = View::new(
            kind,
            welcome.initial,
            welcome.addrs.iter().cloned().collect(),
        );
        view.history = welcome.history.clone();
        view.epoch = welcome.epoch - 1;
        view.next_id = id;
        view.gone = welcome.gone.iter().copied().collect();
        let change = ViewChange::Join(id);
        view.pending = Some((welcome.epoch, change));
        view.addrs.insert(id, own.to_bytes());
        let mut node = Node::new(
            id,
            view.locator(None),
            Engine::words(regions.clone(), ep.clone(), id, this),
            config.one_sided,
        );
        node.prepare_change(Change {
            epoch: welcome.epoch,
            locator: view.locator(Some(change)),
            old_members: view.members(),
            new_members: view.members_after(change),
            failed: None,
        });
        let engine = Arc::new(
            Engine::new(id, ep.clone(), peers, node, regions, uffd, config.prefetch)
                .with_fault_timeout(config.fault_timeout)
                .with_speculation(config.speculate),
        );
        engine.members.set_participants(
            (0..welcome.initial)
                .filter(|m| !view.gone.contains(m))
                .collect(),
        );
        engine.members.set_view(view);
        engine.node_failed(&welcome.gone, false)?;
        let mut threads = engine.spawn(config.fault_threads)?;
        let stop = Arc::new(AtomicBool::new(false));
        let locks = Locks::new(id, ep.clone(), lock_peers(&engine, id), config.locks.max(1));
        let locks = super::wire_locks(&engine, locks, config.fault_timeout, &stop, &mut threads)?;
        let dsm = Dsm {
            engine: engine.clone(),
            boot: Mutex::new(Box::new(NoCollective {
                rank: id as usize,
                size: welcome.initial as usize,
            })),
            threads,
            rank: id,
            size: welcome.initial as usize,
            next_page: Mutex::new(next_page),
            locks,
            stop,
            mapped: Mutex::new(mapped),
        };
        members::send_raw(&*ep, c_peer, id, &Ctl::Ready { regions: ready })?;
        while engine.members.epoch() < welcome.epoch {
            dsm.check()?;
            if let Some(next) = engine.members.take_rejoin() {
                // Dropped by the next coordinator: this attempt's threads, mappings and
                // endpoint go with `dsm`, then the join starts again there.
                drop(dsm);
                return Ok(Joined::Again(EndpointAddress::from_bytes(&next)?));
            }
            if Instant::now() >= deadline {
                return Err(DsmError::Timeout {
                    what: format!("join: waiting for the change to epoch {}", welcome.epoch),
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Joined::Member(dsm))
    }

    /// Leaves the DSM (any node but node 0), once this process no longer accesses it: the
    /// pages it owns move to node 0, its directory entries to their new managers, and the
    /// others stop addressing it; the rest of the job's ranks go on (their barriers no
    /// longer wait for it). Drop the `Dsm` afterwards.
    pub fn leave(&self, within: Duration) -> Result<()> {
        self.check()?;
        self.engine.leave(within)
    }

    /// Node 0: waits (at most `within`) for a node to ask to join and runs its addition
    /// (when joins are not admitted automatically: [`Dsm::set_auto_admit`]); returns the
    /// time spent in each phase.
    pub fn admit(&self, within: Duration) -> Result<ChangeReport> {
        if self.rank != self.engine.coordinator() {
            return Err(DsmError::Config {
                what: "admit".into(),
                reason: format!(
                    "node {}: only the coordinator (node {}) admits nodes",
                    self.rank,
                    self.engine.coordinator()
                ),
            });
        }
        self.check()?;
        self.engine.admit(within)
    }

    /// Node 0: whether a join request is run as soon as it arrives (the default) or waits
    /// for [`Dsm::admit`].
    pub fn set_auto_admit(&self, on: bool) {
        self.engine
            .members
            .auto_admit
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Number of membership changes committed at this node.
    pub fn epoch(&self) -> u64 {
        self.engine.members.epoch()
    }

    /// The DSM's members now (in this node's view).
    pub fn members(&self) -> Vec<NodeId> {
        self.engine
            .members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.members().into_iter().collect()))
            .unwrap_or_default()
    }

    /// Node 0: the changes it ran, with their phases (and, for a failure, the pages
    /// found lost).
    pub fn changes(&self) -> Vec<ChangeReport> {
        self.engine.members.reports()
    }

    /// Pages found lost (every copy died) by the failures handled so far, for the program
    /// or its HA policy to restore from a checkpoint: at node 0 every member's report
    /// ([`ChangeReport::lost`]); at another node, the lost pages it manages. An access to
    /// one fails with [`DsmError::PageLost`] (never a zero page).
    pub fn lost_pages(&self) -> Vec<PageId> {
        let mut lost: std::collections::BTreeSet<PageId> = self
            .engine
            .node
            .lock()
            .map(|n| n.directory.lost_pages().into_iter().collect())
            .unwrap_or_default();
        lost.extend(self.engine.members.lost());
        let regions = self.regions();
        lost.into_iter()
            .filter(|&p| {
                regions
                    .iter()
                    .any(|r| p >= r.first_page() && p < r.first_page() + (r.len() / PAGE) as PageId)
            })
            .collect()
    }

    /// The failures node 0 handled so far (their entries were rebuilt), by node.
    pub fn failures_handled(&self) -> Vec<NodeId> {
        self.engine
            .members
            .view
            .lock()
            .ok()
            .and_then(|v| v.as_ref().map(|v| v.failed.iter().copied().collect()))
            .unwrap_or_default()
    }

    /// A node that joined: waits (at most `within`) until node 0 ends the job (its `Dsm`
    /// is dropped); returns whether it did.
    pub fn wait_dismissed(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self
                .engine
                .members
                .dismissed
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                return true;
            }
            if self.engine.error().is_some() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }
}

impl Dsm {
    /// The shared regions this node has mapped, by first page.
    pub fn regions(&self) -> Vec<SharedRegion> {
        self.engine
            .regions
            .read()
            .map(|m| {
                m.values()
                    .map(|r| SharedRegion {
                        base: r.base,
                        len: r.pages as usize * PAGE,
                        first_page: r.first_page,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Dsm {
    /// Node 0: join requests waiting for [`Dsm::admit`].
    pub fn pending_joins(&self) -> usize {
        self.engine.pending_joins()
    }
}
