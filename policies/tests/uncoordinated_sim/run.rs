//! The simulated job and runtime: starting it, each event (deliveries, captures, crashes),
//! the policy's actions carried out, and the checks made as it runs.
use super::*;

impl Sim {
    /// A job whose ranks are past their `krun_init` from the start (no exchange modelled).
    pub(super) fn new(seed: u64) -> Sim {
        Sim::build(seed, false)
    }

    /// A job that starts with its address exchange: each rank enters it after a random
    /// delay, and none computes before every rank entered it; a node crashing meanwhile
    /// breaks it for the others, which wait (for ever) for a recovery's order. Crashes are
    /// drawn early, so many land in that window.
    pub(super) fn starting(seed: u64) -> Sim {
        Sim::build(seed, true)
    }

    fn build(seed: u64, exchange: bool) -> Sim {
        let mut rng = SmallRng::seed_from_u64(seed);
        let n = rng.gen_range(3..=5usize);
        let spares = rng.gen_range(1..=2u32);
        let nodes = n as u32 + spares;
        let mut cfg = Config {
            interval: IntervalChoice::Fixed { ms: 60 },
            logging: true,
            ..Config::default()
        };
        for r in 0..n as Rank {
            cfg.rank_intervals.insert(r, rng.gen_range(25..90));
        }
        let layout = Layout {
            ranks: (0..n as u32).collect(),
            spares: (n as u32..nodes).collect(),
        };
        let policy =
            Uncoordinated::new(cfg, 0, &layout, AgreedView::new(1, (0..nodes).collect()), 0)
                .unwrap();
        let procs = (0..n)
            .map(|r| Proc {
                st: RankState::fresh(r as Rank, n),
                inc: 0,
                node: r as NodeId,
                alive: true,
                held: false,
                exited: false,
                scheduled: false,
                inbox: BTreeMap::new(),
                replay: VecDeque::new(),
                wired: !exchange,
                joined: false,
                broken: false,
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BTreeMap::new(),
            n,
            nodes,
            procs,
            policy,
            idx: Index::default(),
            dead: BTreeSet::new(),
            epoch: 1,
            determinants: vec![BTreeMap::new(); n],
            ckpts: BTreeMap::new(),
            history: BTreeMap::new(),
            stamp: 0,
            repeated: 0,
            dups: 0,
            lost_ranks: BTreeSet::new(),
            restarts: Vec::new(),
            rollbacks: 0,
            ended: None,
            rewiring: false,
            window_hit: false,
        };
        for r in 0..n as Rank {
            if exchange {
                sim.after(0, 80, Ev::Join(r, 0));
            } else {
                sim.wake(r, 0);
                // Past its `krun_init` (no start-up exchange modelled).
                sim.at(0, Ev::Policy(Event::RankReady { rank: r }));
            }
        }
        let crashes = sim.rng.gen_range(1..=2);
        let window = if exchange { 0..150 } else { 40..400 };
        for _ in 0..crashes {
            let at = sim.rng.gen_range(window.clone());
            let node = sim.rng.gen_range(0..n as u32);
            sim.at(at, Ev::Crash(node));
        }
        sim
    }

    fn at(&mut self, t: Millis, ev: Ev) {
        self.seq += 1;
        self.queue.insert((t, self.seq), ev);
    }

    fn after(&mut self, lo: Millis, hi: Millis, ev: Ev) {
        let d = self.rng.gen_range(lo..=hi);
        self.at(self.now + d, ev);
    }

    fn wake(&mut self, r: Rank, delay: Millis) {
        let p = &mut self.procs[r as usize];
        if !p.scheduled {
            p.scheduled = true;
            self.at(self.now + delay, Ev::Run(r));
        }
    }

    fn report(&mut self, e: LoggedEvent) {
        self.after(0, 5, Ev::Policy(Event::Logged { events: vec![e] }));
    }

    fn feed(&mut self, ev: Event) {
        let actions = self.policy.on_event(self.now, ev, &self.idx);
        for a in actions {
            self.act(a);
        }
    }

    fn act(&mut self, a: Action) {
        match a {
            Action::CaptureRank {
                op, rank, version, ..
            } => {
                let inc = self.procs[rank as usize].inc;
                self.after(1, 10, Ev::Capture(rank, inc, op, version));
            }
            Action::Restart(d) => {
                if let DecisionKind::Restart { rank, .. } = d.kind {
                    self.restarts.push(rank);
                }
                self.after(5, 30, Ev::Restart(d));
            }
            Action::Replay { rank, .. } => self.replay_to(rank),
            Action::Release { ranks } => {
                for r in ranks {
                    self.procs[r as usize].held = false;
                    self.wake(r, 0);
                }
            }
            Action::TrimLog { rank, version } => self.trim(rank, version),
            Action::Rollback { .. } => self.rollbacks += 1,
            Action::Record(d) => {
                if let DecisionKind::RecoveryLine { rewire, .. } = d.kind {
                    self.rewiring = rewire;
                    if rewire {
                        // Every rank re-executes from its start, in a new order: the
                        // original run's states and determinants no longer apply.
                        self.history.clear();
                        for d in &mut self.determinants {
                            d.clear();
                        }
                    }
                }
            }
            Action::EndJob { error } => self.ended = Some(error.map(|e| e.to_string())),
            Action::Synchronize { .. } => panic!("the uncoordinated policy synchronized"),
            _ => {}
        }
    }

    /// Senders drop what `rank` delivered before its checkpoint `version`; its buddy the
    /// determinants.
    fn trim(&mut self, rank: Rank, version: Version) {
        let Some(c) = self.ckpts.get(&(rank, version)).cloned() else {
            return;
        };
        for (s, p) in self.procs.iter_mut().enumerate() {
            let upto = c.delivered_from[s];
            p.st.log.retain(|&(d, q), _| d != rank || q >= upto);
        }
        self.determinants[rank as usize].retain(|&o, _| o >= c.order);
    }

    /// Survivors resend to the restarted `rank` what they logged for it after its restored
    /// state.
    fn replay_to(&mut self, rank: Rank) {
        let dst_inc = self.procs[rank as usize].inc;
        let mut sends = Vec::new();
        for (s, p) in self.procs.iter().enumerate() {
            if s == rank as usize || !p.alive {
                continue;
            }
            let from = self.procs[rank as usize].st.delivered_from[s];
            for (&(d, q), &(payload, interval)) in &p.st.log {
                if d == rank && q >= from {
                    sends.push((s as Rank, p.inc, q, payload, interval));
                }
            }
        }
        for (src, src_inc, seq, payload, interval) in sends {
            self.after(
                1,
                20,
                Ev::Arrive {
                    src,
                    src_inc,
                    dst: rank,
                    dst_inc,
                    seq,
                    payload,
                    interval,
                },
            );
        }
    }

    /// What `d` holds from `r` without a gap (delivered, then waiting in sequence): `r`'s
    /// sends below it are suppressed.
    fn has_from(&self, d: usize, r: Rank) -> u64 {
        let p = &self.procs[d];
        let mut next = p.st.delivered_from[r as usize];
        while p.inbox.contains_key(&(r, next)) {
            next += 1;
        }
        next
    }

    fn send(&mut self, r: Rank, d: Rank, seq: u64, payload: u64, interval: Version) {
        let (src_inc, dst_inc) = (self.procs[r as usize].inc, self.procs[d as usize].inc);
        self.after(
            1,
            20,
            Ev::Arrive {
                src: r,
                src_inc,
                dst: d,
                dst_inc,
                seq,
                payload,
                interval,
            },
        );
    }

    fn run(&mut self, r: Rank) {
        let n = self.n;
        let p = &mut self.procs[r as usize];
        p.scheduled = false;
        if !p.alive || p.held || p.exited || !p.wired {
            return;
        }
        if p.st.step == STEPS {
            p.exited = true;
            let node = p.node;
            self.after(
                1,
                5,
                Ev::Policy(Event::RankExited {
                    rank: r,
                    node,
                    code: 0,
                }),
            );
            return;
        }
        if !p.st.sent {
            p.st.sent = true;
            let mut out = Vec::new();
            for d in (0..n as Rank).filter(|&d| d != r) {
                let seq = p.st.send_seq[d as usize];
                p.st.send_seq[d as usize] += 1;
                let payload = mix(p.st.state, mix(p.st.step, u64::from(d)));
                p.st.log.insert((d, seq), (payload, p.st.interval));
                out.push((d, seq, payload, p.st.interval));
            }
            for (d, seq, payload, interval) in out {
                // What a live receiver already has (it says so when this rank restarts, and
                // again when it restarts itself) is not sent again.
                let suppressed = self.procs[d as usize].alive && seq < self.has_from(d as usize, r);
                self.report(LoggedEvent::Message {
                    from: r,
                    to: d,
                    seq,
                    bytes: 8,
                });
                if !suppressed {
                    self.send(r, d, seq, payload, interval);
                }
            }
            let d = self.rng.gen_range(1..=4);
            self.wake(r, d);
            return;
        }
        // Receive: the recorded order while replaying, else any source in arrival order.
        let pick = match p.replay.front().copied() {
            Some(k) => p.inbox.contains_key(&k).then_some(k),
            None => p
                .inbox
                .iter()
                .filter(|(k, _)| k.1 == p.st.delivered_from[k.0 as usize])
                .min_by_key(|(_, v)| v.2)
                .map(|(k, _)| *k),
        };
        let Some((src, seq)) = pick else {
            return; // waits for an arrival
        };
        if p.replay.front() == Some(&(src, seq)) {
            p.replay.pop_front();
        }
        let (payload, from_interval, _) = p.inbox.remove(&(src, seq)).expect("picked");
        assert_eq!(seq, p.st.delivered_from[src as usize], "per-source order");
        let order = p.st.order;
        // Pessimistic: the determinant is durable before the delivery.
        self.determinants[r as usize].insert(order, (src, seq));
        let p = &mut self.procs[r as usize];
        p.st.state = mix(p.st.state, mix(u64::from(src) << 32 | seq, payload));
        p.st.delivered_from[src as usize] += 1;
        p.st.order += 1;
        p.st.got += 1;
        if p.st.got == n as u32 - 1 {
            p.st.got = 0;
            p.st.sent = false;
            p.st.step += 1;
        }
        let (state, to_interval) = (p.st.state, p.st.interval);
        match self.history.get(&(r, order)) {
            Some(&s) => {
                assert_eq!(
                    s, state,
                    "rank {r}'s state after delivery {order} differs from the original run's"
                );
                self.repeated += 1;
            }
            None => {
                self.history.insert((r, order), state);
            }
        }
        self.report(LoggedEvent::Delivered {
            from: src,
            to: r,
            seq,
            order,
            from_interval,
            to_interval,
            bytes: 8,
        });
        let d = self.rng.gen_range(1..=3);
        self.wake(r, d);
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Run(r) => self.run(r),
            Ev::Arrive {
                src,
                src_inc,
                dst,
                dst_inc,
                seq,
                payload,
                interval,
            } => {
                let s = &self.procs[src as usize];
                // A sender's node that died takes what it had on the wire with it.
                if !s.alive || s.inc != src_inc {
                    return;
                }
                let d = &self.procs[dst as usize];
                if !d.alive || d.inc != dst_inc || d.exited {
                    return;
                }
                if seq < d.st.delivered_from[src as usize] || d.inbox.contains_key(&(src, seq)) {
                    self.dups += 1;
                    return;
                }
                self.stamp += 1;
                let stamp = self.stamp;
                self.procs[dst as usize]
                    .inbox
                    .insert((src, seq), (payload, interval, stamp));
                self.wake(dst, 0);
            }
            Ev::Policy(e) => self.feed(e),
            Ev::Capture(r, inc, op, version) => {
                let p = &mut self.procs[r as usize];
                if !p.alive || p.inc != inc || p.exited {
                    return;
                }
                if !p.wired {
                    // Its library takes the order at its first safepoint, after `krun_init`.
                    self.after(5, 20, Ev::Capture(r, inc, op, version));
                    return;
                }
                let p = &mut self.procs[r as usize];
                p.st.interval = version;
                self.ckpts.insert((r, version), p.st.clone());
                self.after(
                    1,
                    5,
                    Ev::Policy(Event::CaptureDone {
                        op,
                        rank: r,
                        version,
                        bytes: 64,
                        seconds: 0.001,
                    }),
                );
                // L2 at a buddy: survives the rank's node.
                self.idx.0.insert(
                    (r, version),
                    vec![ImageCopy {
                        level: Level::L2,
                        node: None,
                        bytes: 64,
                    }],
                );
                self.after(
                    6,
                    20,
                    Ev::Policy(Event::LevelSafe {
                        rank: r,
                        version,
                        level: Level::L2,
                    }),
                );
            }
            Ev::Restart(d) => {
                let DecisionKind::Restart {
                    rank,
                    incarnation,
                    node,
                    version,
                    ..
                } = d.kind
                else {
                    return;
                };
                if self.dead.contains(&node) {
                    return; // the failure of that node replans it
                }
                let st = match version {
                    Some(v) => self.ckpts[&(rank, v)].clone(),
                    None => RankState::fresh(rank, self.n),
                };
                let replay: VecDeque<(Rank, u64)> = self.determinants[rank as usize]
                    .range(st.order..)
                    .map(|(_, &k)| k)
                    .collect();
                let suppress: Vec<u64> = (0..self.n)
                    .map(|x| {
                        if self.procs[x].alive {
                            self.has_from(x, rank)
                        } else {
                            u64::MAX
                        }
                    })
                    .collect();
                let p = &mut self.procs[rank as usize];
                p.st = st;
                p.inc = incarnation;
                p.node = node;
                p.alive = true;
                p.held = true;
                p.exited = false;
                p.inbox.clear();
                p.replay = replay;
                // A re-wiring: the new process swaps addresses with the others first.
                p.wired = !self.rewiring;
                p.joined = false;
                p.broken = false;
                // What the restored log holds that a receiver lacks goes out again.
                let mut again = Vec::new();
                for (&(dd, q), &(payload, interval)) in &p.st.log {
                    if q >= suppress[dd as usize] && q < p.st.send_seq[dd as usize] {
                        again.push((dd, q, payload, interval));
                    }
                }
                for (dd, q, payload, interval) in again {
                    self.send(rank, dd, q, payload, interval);
                }
                if self.rewiring {
                    self.after(1, 30, Ev::Join(rank, incarnation));
                }
                self.after(
                    1,
                    5,
                    Ev::Policy(Event::RestartDone {
                        decision: d.id,
                        rank,
                        node,
                        seconds: 0.01,
                    }),
                );
            }
            Ev::Crash(node) => {
                if self.dead.contains(&node) {
                    return;
                }
                let on: Vec<Rank> = (0..self.n as Rank)
                    .filter(|&r| self.procs[r as usize].node == node)
                    .collect();
                if on.iter().all(|&r| self.procs[r as usize].exited) {
                    return;
                }
                self.dead.insert(node);
                if self.procs.iter().any(|p| !p.wired) {
                    // The exchange breaks under the ranks waiting in it: they wait for the
                    // recovery's order.
                    self.window_hit = true;
                    for p in &mut self.procs {
                        if !p.wired {
                            p.joined = false;
                            p.broken = true;
                        }
                    }
                }
                for r in on {
                    let p = &mut self.procs[r as usize];
                    if !p.exited {
                        p.alive = false;
                        p.inbox.clear();
                        self.lost_ranks.insert(r);
                    }
                }
                self.after(10, 30, Ev::Agree(node));
            }
            Ev::Join(r, inc) => {
                let p = &mut self.procs[r as usize];
                if !p.alive || p.inc != inc || p.wired || p.broken {
                    return;
                }
                // A peer not running yet (its restart is under way): wait in the exchange.
                if self.procs.iter().any(|q| !q.alive) {
                    self.after(5, 20, Ev::Join(r, inc));
                    return;
                }
                self.procs[r as usize].joined = true;
                if self.procs.iter().all(|q| q.joined || q.wired) {
                    for r in 0..self.n as Rank {
                        let p = &mut self.procs[r as usize];
                        if p.joined {
                            p.joined = false;
                            p.wired = true;
                            self.after(1, 5, Ev::Policy(Event::RankReady { rank: r }));
                            self.wake(r, 0);
                        }
                    }
                }
            }
            Ev::Agree(node) => {
                self.epoch += 1;
                let view = AgreedView::new(
                    self.epoch,
                    (0..self.nodes).filter(|x| !self.dead.contains(x)).collect(),
                );
                self.feed(Event::FailureAgreed {
                    epoch: self.epoch,
                    failed: vec![node],
                    view,
                });
            }
        }
    }

    pub(super) fn run_all(&mut self) {
        let mut events = 0;
        while self.ended.is_none() {
            if let Some(t) = self.policy.next_deadline() {
                if self.queue.keys().next().is_none_or(|k| k.0 > t) && t >= self.now {
                    self.now = t;
                    self.feed(Event::Tick);
                    continue;
                }
            }
            let Some(((t, _), ev)) = self.queue.pop_first() else {
                break;
            };
            self.now = self.now.max(t);
            self.step(ev);
            events += 1;
            if events >= 2_000_000 || self.now > 1_000_000 {
                let ranks: Vec<String> = self
                    .procs
                    .iter()
                    .map(|p| {
                        format!(
                            "step {} alive {} held {} exited {} inc {} replay {:?} inbox {:?} got {} from {:?}",
                            p.st.step, p.alive, p.held, p.exited, p.inc,
                            p.replay.iter().take(3).collect::<Vec<_>>(),
                            p.inbox.keys().take(5).collect::<Vec<_>>(), p.st.got, p.st.delivered_from
                        )
                    })
                    .collect();
                panic!("runaway simulation at {}: {ranks:#?}", self.now);
            }
        }
    }
}
