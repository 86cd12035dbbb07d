//! The coordinator's side of a view change (node 0): a join asked by a newcomer or
//! admitted by the application, a leave, each run in the seed's phases (start, physical,
//! setting, logical, end; `PHASES`), and the pull of a leaving node's pages.
use super::*;

impl Engine {
    /// Node 0: join requests not run yet.
    pub fn pending_joins(&self) -> usize {
        self.members
            .requests
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(_, c)| matches!(c, Ctl::Join { .. }))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Node 0: waits (at most `within`) for a join request and runs it.
    pub fn admit(&self, within: Duration) -> Result<ChangeReport> {
        let start = Instant::now();
        let deadline = start + within;
        let (from, ctl) = loop {
            let mut r = self.members.requests.lock().map_err(|_| poisoned())?;
            if let Some(i) = r.iter().position(|(_, c)| matches!(c, Ctl::Join { .. })) {
                break r.remove(i).expect("listed");
            }
            if Instant::now() >= deadline {
                return Err(timeout("waiting for a node to ask to join".into(), start));
            }
            drop(
                self.members
                    .requested
                    .wait_timeout(r, Duration::from_millis(20))
                    .map_err(|_| poisoned())?,
            );
        };
        self.run_request(from, ctl, within)
    }

    pub(crate) fn run_request(
        &self,
        from: NodeId,
        ctl: Ctl,
        within: Duration,
    ) -> Result<ChangeReport> {
        let report = match ctl {
            Ctl::Join { addr } => self.run_join(&addr, within)?,
            Ctl::Leave { owned } => self.run_leave(from, &owned, within)?,
            Ctl::Failed { node } => self.run_fail(node, within)?,
            other => {
                return Err(DsmError::Config {
                    what: "membership request".into(),
                    reason: format!("{other:?}"),
                })
            }
        };
        if let Ok(mut r) = self.members.reports.lock() {
            r.push(report.clone());
        }
        Ok(report)
    }

    /// Node 0 runs a join (phases in the module doc).
    pub(crate) fn run_join(&self, addr: &[u8], within: Duration) -> Result<ChangeReport> {
        let _one = self.members.changing.lock().map_err(|_| poisoned())?;
        let t0 = Instant::now();
        let deadline = t0 + within;
        let me = self.me;
        // Start.
        let peer = self.ep.connect(&EndpointAddress::from_bytes(addr)?)?;
        let dead = self.dead_nodes();
        let (id, epoch, old, welcome) = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(me))?;
            let id = v.next_id;
            let regions = self
                .regions
                .read()
                .map_err(|_| poisoned())?
                .values()
                .map(|r| RegionDesc {
                    first_page: r.first_page,
                    pages: r.pages,
                    base: r.base,
                    export: (0..id as usize)
                        .map(|n| {
                            r.remote_export
                                .get(n)
                                .map(|x| x.to_bytes().to_vec())
                                .unwrap_or_default()
                        })
                        .collect(),
                    words: (0..id as usize)
                        .map(|n| {
                            r.remote_words
                                .get(n)
                                .map(|x| x.to_bytes().to_vec())
                                .unwrap_or_default()
                        })
                        .collect(),
                })
                .collect();
            let gone: BTreeSet<NodeId> = v.gone.union(&dead).copied().collect();
            let welcome = Welcome {
                id,
                epoch: v.epoch + 1,
                dynamic: v.kind == LocatorKind::CellTree,
                initial: v.initial,
                history: v.history.clone(),
                // Nodes below `id` only: a joiner whose join a dead coordinator left and
                // the next one dropped may have left its old address (the same id).
                addrs: v
                    .addrs
                    .iter()
                    .filter(|(n, _)| !gone.contains(n) && **n < id)
                    .map(|(&n, a)| (n, a.clone()))
                    .collect(),
                gone: gone.iter().copied().collect(),
                regions,
            };
            let old: BTreeSet<NodeId> = v.members().difference(&dead).copied().collect();
            (id, v.epoch + 1, old, welcome)
        };
        self.add_peer(id, peer)?;
        send_raw(&*self.ep, peer, me, &Ctl::Welcome(Box::new(welcome)))?;
        let t_start = t0.elapsed().as_secs_f64();
        // Physical: the newcomer connects, maps and registers.
        let t = Instant::now();
        let ready = self.wait_replies(
            "physical",
            &[id].into_iter().collect(),
            |c| matches!(c, Ctl::Ready { .. }),
            deadline,
        )?;
        let regions = match ready.into_values().next() {
            Some(Ctl::Ready { regions }) => regions,
            _ => Vec::new(),
        };
        let t_physical = t.elapsed().as_secs_f64();
        let change = ViewChange::Join(id);
        let all: BTreeSet<NodeId> = old.iter().copied().chain([id]).collect();
        let (phases, lost) =
            self.run_change(epoch, change, addr, &regions, &old, &all, deadline)?;
        Ok(ChangeReport {
            change,
            epoch,
            phases: [t_start, t_physical, phases[0], phases[1], phases[2]],
            lost,
        })
    }

    /// Setting, logical and end phases (seconds each), and the pages the members report
    /// lost.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_change(
        &self,
        epoch: u64,
        change: ViewChange,
        addr: &[u8],
        regions: &Descriptors,
        old: &BTreeSet<NodeId>,
        all: &BTreeSet<NodeId>,
        deadline: Instant,
    ) -> Result<([f64; 3], Vec<PageId>)> {
        let me = self.me;
        // Setting: the members connect to the newcomer and prepare the next view.
        let t = Instant::now();
        for &m in old {
            self.ctl_to(
                m,
                Ctl::Install {
                    epoch,
                    change,
                    addr: addr.to_vec(),
                    regions: regions.clone(),
                },
            )?;
        }
        self.wait_replies(
            "setting",
            old,
            |c| matches!(c, Ctl::Installed { epoch: e } if *e == epoch),
            deadline,
        )?;
        let t_setting = t.elapsed().as_secs_f64();
        self.pause_injected(change, "setting");
        // Logical: everyone switches; entries migrate.
        let t = Instant::now();
        if self.members.hold {
            self.migrate_held(epoch)?;
        } else {
            self.ctl_to(me, Ctl::Migrate { epoch })?;
        }
        for &m in all {
            if m != me {
                self.ctl_to(m, Ctl::Migrate { epoch })?;
            }
        }
        let migrated = self.wait_replies(
            "logical",
            all,
            |c| matches!(c, Ctl::Migrated { epoch: e, .. } if *e == epoch),
            deadline,
        )?;
        let lost: BTreeSet<PageId> = migrated
            .into_values()
            .flat_map(|c| match c {
                Ctl::Migrated { lost, .. } => lost,
                _ => Vec::new(),
            })
            .collect();
        if let Ok(mut l) = self.members.lost.lock() {
            l.extend(lost.iter().copied());
        }
        let t_logical = t.elapsed().as_secs_f64();
        self.pause_injected(change, "logical");
        // End: the view is committed everywhere.
        let t = Instant::now();
        // Node 0 last: committing a failure asks again what it waits for, and an answer
        // "lost" may end this process; the others must have their commit first.
        for &m in all.iter().filter(|&&m| m != me).chain(all.get(&me)) {
            self.ctl_to(m, Ctl::Commit { epoch })?;
        }
        // A leaving node is dropped at each commit (like a dead one): its own answer is
        // not awaited (it waits for `Left`, sent after every other member committed).
        let mut committing = all.clone();
        if let ViewChange::Leave(n) = change {
            committing.remove(&n);
        }
        self.wait_replies(
            "end",
            &committing,
            |c| matches!(c, Ctl::Committed { epoch: e } if *e == epoch),
            deadline,
        )?;
        Ok((
            [t_setting, t_logical, t.elapsed().as_secs_f64()],
            lost.into_iter().collect(),
        ))
    }

    /// Node 0 runs `node`'s failure: the survivors drop it and rebuild its entries from the
    /// copies they hold (phases in the module doc; physical is empty).
    pub(crate) fn run_fail(&self, node: NodeId, within: Duration) -> Result<ChangeReport> {
        let _one = self.members.changing.lock().map_err(|_| poisoned())?;
        if let Some(path) = &self.members.fail_hold {
            let until = Instant::now() + Duration::from_secs(60);
            while !path.exists() && Instant::now() < until && !self.stopped() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let t0 = Instant::now();
        let deadline = t0 + within;
        let me = self.me;
        self.drop_dead(&[node])?;
        if node < me {
            // The dead node coordinated before this one: first finish (or drop) the change
            // it may have left half-done.
            self.finish_half_done(deadline)?;
        }
        let dead = self.dead_nodes();
        let (epoch, old) = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(self.me))?;
            if !v.members().contains(&node) || node == me {
                return Err(DsmError::Config {
                    what: "failure".into(),
                    reason: format!("node {node} is not a member whose failure can be handled"),
                });
            }
            let old: BTreeSet<NodeId> = v.members().difference(&dead).copied().collect();
            (v.epoch + 1, old)
        };
        let t_start = t0.elapsed().as_secs_f64();
        let change = ViewChange::Fail(node);
        let (phases, lost) =
            self.run_change(epoch, change, &[], &Vec::new(), &old, &old, deadline)?;
        if !lost.is_empty() {
            eprintln!(
                "krun dsm: node {node} died; pages {lost:?} lost every copy (restore them from \
                 a checkpoint); every other page was rebuilt from the survivors' copies"
            );
        }
        // Committed everywhere: what the dead node held outside the pages (its DSM locks)
        // goes to the survivors.
        self.members.failure_handled(node);
        Ok(ChangeReport {
            change,
            epoch,
            phases: [t_start, 0.0, phases[0], phases[1], phases[2]],
            lost,
        })
    }

    /// Node 0 runs `node`'s leave; `owned`: the pages it owned when it asked.
    pub(crate) fn run_leave(
        &self,
        node: NodeId,
        owned: &[PageId],
        within: Duration,
    ) -> Result<ChangeReport> {
        let _one = self.members.changing.lock().map_err(|_| poisoned())?;
        let t0 = Instant::now();
        let deadline = t0 + within;
        let dead = self.dead_nodes();
        let (epoch, old) = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(self.me))?;
            let old: BTreeSet<NodeId> = v.members().difference(&dead).copied().collect();
            (v.epoch + 1, old)
        };
        if node == self.coordinator() || !old.contains(&node) {
            return Err(DsmError::Config {
                what: "leave".into(),
                reason: format!("node {node} is not a member that may leave"),
            });
        }
        let t_start = t0.elapsed().as_secs_f64();
        // Physical: the leaving node's pages move here.
        let t = Instant::now();
        self.pull(owned, deadline)?;
        let t_physical = t.elapsed().as_secs_f64();
        let change = ViewChange::Leave(node);
        let (phases, lost) =
            self.run_change(epoch, change, &[], &Vec::new(), &old, &old, deadline)?;
        self.ctl_to(node, Ctl::Left)?;
        Ok(ChangeReport {
            change,
            epoch,
            phases: [t_start, t_physical, phases[0], phases[1], phases[2]],
            lost,
        })
    }

    /// Takes the pages for writing here (a leaving node's pages: the protocol moves the
    /// bytes and invalidates the other copies); returns once every request was served.
    pub(crate) fn pull(&self, pages: &[PageId], deadline: Instant) -> Result<()> {
        let start = Instant::now();
        let mut remote = Vec::new();
        {
            let mut node = self.node.lock().map_err(|_| poisoned())?;
            for &p in pages {
                if region_of(&self.regions, p).is_none() {
                    continue;
                }
                self.track_fault(p, Access::Write, true);
                let actions = node.fault(p, Access::Write);
                self.execute(&mut node, actions, Data::None, &mut remote)?;
            }
        }
        if !remote.is_empty() {
            self.run_remote(remote)?;
        }
        loop {
            let missing: Vec<PageId> = {
                let node = self.node.lock().map_err(|_| poisoned())?;
                pages
                    .iter()
                    .copied()
                    .filter(|&p| region_of(&self.regions, p).is_some() && node.waiting(p).is_some())
                    .collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(timeout(
                    format!("taking over a leaving node's pages {missing:?}"),
                    start,
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// This node leaves the DSM (not node 0): once its own accesses are over, its pages
    /// move to node 0 and its directory entries to their new managers. Returns when the
    /// others no longer need it.
    pub fn leave(&self, within: Duration) -> Result<()> {
        let start = Instant::now();
        if self.me == self.coordinator() {
            return Err(DsmError::Config {
                what: "leave".into(),
                reason: format!(
                    "node {} coordinates the DSM's membership and barriers: it cannot leave",
                    self.me
                ),
            });
        }
        let deadline = start + within;
        let owned = loop {
            {
                let node = self.node.lock().map_err(|_| poisoned())?;
                if node.idle() {
                    break node
                        .holdings()
                        .into_iter()
                        .filter(|h| h.owner)
                        .map(|h| h.page)
                        .collect::<Vec<_>>();
                }
            }
            if Instant::now() >= deadline {
                return Err(timeout(
                    "leave: waiting for this node's accesses".into(),
                    start,
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let mut told = self.coordinator();
        self.ctl_to(
            told,
            Ctl::Leave {
                owned: owned.clone(),
            },
        )?;
        while !self.members.left.load(Ordering::SeqCst) {
            let coordinator = self.coordinator();
            if coordinator != told {
                // The coordinator died: the next one finishes the leave it left half-done
                // (and tells this node), or dropped it; asking again covers both (a leave
                // already committed is answered `Left` again).
                told = coordinator;
                if coordinator == self.me {
                    return Err(DsmError::Config {
                        what: "leave".into(),
                        reason: format!(
                            "node {} became the coordinator while leaving: it cannot leave",
                            self.me
                        ),
                    });
                }
                self.ctl_to(
                    told,
                    Ctl::Leave {
                        owned: owned.clone(),
                    },
                )?;
            }
            if let Some(e) = self.error() {
                return Err(DsmError::Collective {
                    what: "leave".into(),
                    reason: e,
                });
            }
            if Instant::now() >= deadline {
                return Err(timeout("leave: waiting for node 0".into(), start));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(LEAVE_GRACE);
        Ok(())
    }
}

impl Engine {
    /// Waits until every node of `from` answered with a message `is` accepts.
    pub(super) fn wait_replies(
        &self,
        what: &str,
        from: &BTreeSet<NodeId>,
        is: impl Fn(&Ctl) -> bool,
        deadline: Instant,
    ) -> Result<BTreeMap<NodeId, Ctl>> {
        let start = Instant::now();
        let mut got = BTreeMap::new();
        let mut r = self.members.replies.lock().map_err(|_| poisoned())?;
        loop {
            let mut i = 0;
            while i < r.len() {
                if from.contains(&r[i].0) && is(&r[i].1) {
                    let (n, c) = r.remove(i);
                    got.insert(n, c);
                } else {
                    i += 1;
                }
            }
            let missing: Vec<NodeId> = from
                .iter()
                .copied()
                .filter(|n| !got.contains_key(n))
                .collect();
            if missing.is_empty() {
                return Ok(got);
            }
            let dead = self.dead_nodes();
            if let Some(n) = missing.iter().find(|n| dead.contains(n)) {
                return Err(DsmError::Collective {
                    what: "membership change".into(),
                    reason: format!("node {n} died during the {what} phase"),
                });
            }
            if Instant::now() >= deadline || self.stopped() {
                return Err(timeout(
                    format!("membership change ({what}: no answer from nodes {missing:?})"),
                    start,
                ));
            }
            r = self
                .members
                .replied
                .wait_timeout(r, Duration::from_millis(50))
                .map_err(|_| poisoned())?
                .0;
        }
    }

    /// Node 0's membership thread: runs leave requests, and join requests when joins are
    /// admitted automatically.
    pub(in crate::fault) fn members_loop(&self) {
        const CHANGE_LIMIT: Duration = Duration::from_secs(120);
        while !self.stopped() {
            if self.me != self.coordinator() {
                // Every node runs this thread; only the coordinator runs changes (a node
                // becomes it when the ones before died).
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let next = {
                let Ok(mut r) = self.members.requests.lock() else {
                    return;
                };
                let auto = self.members.auto_admit.load(Ordering::SeqCst);
                match r
                    .iter()
                    .position(|(_, c)| matches!(c, Ctl::Failed { .. }))
                    .or_else(|| {
                        r.iter()
                            .position(|(_, c)| auto || matches!(c, Ctl::Leave { .. }))
                    }) {
                    Some(i) => r.remove(i),
                    None => {
                        let _ = self
                            .members
                            .requested
                            .wait_timeout(r, Duration::from_millis(50));
                        None
                    }
                }
            };
            if let Some((from, ctl)) = next {
                if matches!(ctl, Ctl::Leave { .. }) && self.members.settled(from) {
                    // Asked again of a new coordinator after the old one's leave of it
                    // committed (finished by the takeover): it may go.
                    let _ = self.ctl_to(from, Ctl::Left);
                    continue;
                }
                if let Err(e) = self.run_request(from, ctl, CHANGE_LIMIT) {
                    self.fail(format!("membership change: {e}"));
                }
            }
        }
    }

    /// A new coordinator (the one before died): asks every live member what the old
    /// coordinator's last change left, and finishes it when some member switched to it
    /// (its entries moved: the others switch, then all commit) or committed it (the
    /// others commit). A change nobody switched to is dropped: the next change, prepared
    /// with the same epoch, replaces it everywhere.
    pub(super) fn finish_half_done(&self, deadline: Instant) -> Result<()> {
        let dead = self.dead_nodes();
        let live: BTreeSet<NodeId> = {
            let v = self.members.view.lock().map_err(|_| poisoned())?;
            let v = v.as_ref().ok_or_else(|| no_view(self.me))?;
            v.members().difference(&dead).copied().collect()
        };
        for &m in &live {
            self.ctl_to(m, Ctl::StateQuery)?;
        }
        let states = self.wait_replies(
            "takeover",
            &live,
            |c| matches!(c, Ctl::State { .. }),
            deadline,
        )?;
        let mut last: Option<(u64, ViewChange)> = None;
        for s in states.values() {
            if let Ctl::State {
                pending: Some(p), ..
            } = s
            {
                if last.is_none_or(|l| p.0 > l.0) {
                    last = Some(*p);
                }
            }
        }
        let Some((epoch, change)) = last else {
            return Ok(());
        };
        // A join: the joining node prepared the change too (at its welcome) and is not yet
        // a member of any view here; it is asked as well, and switches and commits with
        // the others (else it would wait for ever, its entries never switched).
        let mut states = states;
        if let ViewChange::Join(n) = change {
            if !live.contains(&n) && !dead.contains(&n) {
                self.ctl_to(n, Ctl::StateQuery)?;
                states.extend(self.wait_replies(
                    "takeover (the joining node)",
                    &[n].into_iter().collect(),
                    |c| matches!(c, Ctl::State { .. }),
                    deadline,
                )?);
            }
        }
        let mut holding = BTreeSet::new();
        let mut to_migrate = BTreeSet::new();
        let (mut switched, mut committed) = (false, false);
        let mut lost = BTreeSet::new();
        for (&m, s) in &states {
            let Ctl::State {
                epoch: e,
                pending,
                switched: sw,
                migrated,
            } = s
            else {
                continue;
            };
            committed |= *e >= epoch;
            switched |= *sw;
            if pending.is_some_and(|p| p.0 == epoch) {
                holding.insert(m);
                match migrated {
                    Some(l) => lost.extend(l.iter().copied()),
                    None => {
                        to_migrate.insert(m);
                    }
                }
            }
        }
        if !switched && !committed {
            eprintln!(
                "krun dsm: node {}: the change {change:?} (epoch {epoch}) the dead coordinator \
                 left before any member switched is dropped",
                self.me
            );
            if let ViewChange::Join(n) = change {
                // The joining node asks again, here: its join runs after node 0's failure.
                let contact = self.ep.address().to_bytes();
                if let Err(e) = self.ctl_to(n, Ctl::JoinDropped { contact }) {
                    eprintln!(
                        "krun dsm: node {}: cannot tell node {n} its join was dropped: {e}",
                        self.me
                    );
                }
            }
            return Ok(());
        }
        eprintln!(
            "krun dsm: node {}: finishing the change {change:?} (epoch {epoch}) the dead \
             coordinator left half-done",
            self.me
        );
        if !committed {
            for &m in &to_migrate {
                self.ctl_to(m, Ctl::Migrate { epoch })?;
            }
            let migrated = self.wait_replies(
                "logical (takeover)",
                &to_migrate,
                |c| matches!(c, Ctl::Migrated { epoch: e, .. } if *e == epoch),
                deadline,
            )?;
            for c in migrated.into_values() {
                if let Ctl::Migrated { lost: l, .. } = c {
                    lost.extend(l);
                }
            }
            if let Ok(mut l) = self.members.lost.lock() {
                l.extend(lost.iter().copied());
            }
        }
        let me = self.me;
        for &m in holding.iter().filter(|&&m| m != me).chain(holding.get(&me)) {
            self.ctl_to(m, Ctl::Commit { epoch })?;
        }
        // As in `run_change`: a leaving node is dropped at each commit, its answer is not
        // awaited; it is told it may go once the others committed.
        let mut committing = holding.clone();
        if let ViewChange::Leave(n) = change {
            committing.remove(&n);
        }
        self.wait_replies(
            "end (takeover)",
            &committing,
            |c| matches!(c, Ctl::Committed { epoch: e } if *e == epoch),
            deadline,
        )?;
        match change {
            ViewChange::Fail(n) => self.members.failure_handled(n),
            ViewChange::Leave(n) => self.ctl_to(n, Ctl::Left)?,
            ViewChange::Join(_) => {}
        }
        Ok(())
    }
}

impl Engine {
    /// Test injection (`KRUN_DSM_CHANGE_PAUSE=<phase>:<file>`): node 0, running a join or a
    /// leave, stops once `phase` (`setting` or `logical`) is done, before the next step:
    /// it creates `file` and waits to be killed (at most 120 s), so that the change is
    /// left half-done for the next coordinator.
    fn pause_injected(&self, change: ViewChange, phase: &str) {
        if self.me != 0 || matches!(change, ViewChange::Fail(_)) {
            return;
        }
        let Some(spec) = std::env::var_os("KRUN_DSM_CHANGE_PAUSE") else {
            return;
        };
        let spec = spec.to_string_lossy().into_owned();
        let Some((at, file)) = spec
            .split_once(':')
            .filter(|(at, _)| ["setting", "logical"].contains(at))
        else {
            eprintln!(
                "krun dsm: KRUN_DSM_CHANGE_PAUSE={spec:?} ignored: expected \
                 setting:<file> or logical:<file>"
            );
            return;
        };
        if at != phase {
            return;
        }
        eprintln!("krun dsm: node 0: pausing {change:?} after its {phase} phase (test)");
        let _ = std::fs::write(file, phase);
        let until = Instant::now() + Duration::from_secs(120);
        while Instant::now() < until && !self.stopped() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
