//! The node state machine of the adaptation layer (sans-IO: events in, actions out).
//!
//! Every node keeps the agreed log of configuration changes; the view of epoch `e` is the
//! genesis view with the first `e` changes applied, and every node derives the same locator
//! from it. Changes are processed one at a time, in log order:
//!
//! 1. **before migration**: the services learn which entries leave this node; the node stops
//!    serving requests (they are delayed) and sends `Prepared` to every participant.
//! 2. **send out**: once all participants are prepared, each entry whose manager changes is
//!    sent to its new manager; after a failure, each service also scans its local state for
//!    orphan entries (managed by the failed node) and sends what it knows to their new
//!    managers. Then `Sent` (with the counts per service) goes to every participant.
//! 3. **receive**: entries arrive (links are FIFO, so all of a sender's entries precede its
//!    `Sent`) and are merged by the services.
//! 4. **after migration**: with every participant's `Sent` in and the counts checked, the
//!    node installs the new view, returns to the stable state, and delivers the delayed
//!    requests to their new managers.
//!
//! A participant that fails during a change is not waited for once its failure is in the
//! log; what it held or was about to receive is rebuilt by the next change's scan.
//!
//! Faults beyond one crash:
//! - **Lost entries** (`losses.rs`): with `f` witnesses per entry (f + 1 copies) entries
//!   survive any `f` failures at once. When a failed node's manager and every witness of it
//!   failed together, the repair cannot know the newest copy: its buckets are marked lost
//!   (at every member, and told to joiners), what is left of them is forgotten, and a
//!   request for an entry there that nobody holds gets the service's "lost" answer
//!   ([`Service::lost`]), never an empty entry.
//! - **Fencing**: a change travels through Raft with the node that asked for it
//!   ([`Proposal`]); at its place in the log it is refused if that node is out of the
//!   configuration by then (a `leave` asked at a cut-off supervisor evicted meanwhile). A
//!   member ignores what a node declared failed asks of it (requests, observations,
//!   proposals, probes) and tells it that it failed.
//! - **Eviction**: a node that learns an agreed change saying it failed stops at once
//!   ([`Node::evicted`]); its driver may come back as a new member
//!   ([`Node::rejoin_config`]).
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::agreement::{Agreement, AgreementConfig, AgreementOutput};
use crate::error::{AdaptError, Result};
use crate::locator::{CellTreeLocator, LocatorConfig, Scope};
use crate::membership::{Membership, MembershipConfig, MembershipEvent, MembershipOutput};
use crate::service::{RequestId, Service, ServiceId};
use crate::view::{Change, EntryId, Epoch, NodeId, Proposal};
use crate::wire::{Msg, Request};

mod losses;

/// Locators kept for failure repair: changes agreed while a failed node was still
/// undetected, each waiting for it, may pile up behind its failure.
pub const LOCATOR_HISTORY: usize = 16;

/// A node evicted while alive (cut off, declared failed) comes back as a new member: its
/// id plus this (ids are never reused, so requests of the evicted incarnation stay fenced).
pub const REJOIN_STRIDE: NodeId = 1 << 20;

/// How a node is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub me: NodeId,
    /// The members of epoch 0, known to every node of the job (also to later joiners).
    pub genesis: Vec<NodeId>,
    /// The Raft group that agrees on changes: a few members of `genesis`.
    pub supervisors: Vec<NodeId>,
    /// `Some(address)` for a node that is not in `genesis` and announces itself.
    pub joining: Option<String>,
    pub locator: LocatorConfig,
    pub membership: MembershipConfig,
    pub agreement: AgreementConfig,
    /// Seeds this node's random choices (failure detector probes).
    pub seed: u64,
    /// Seeds the supervisors' election timeouts; the same on every node, so that the
    /// supervisors derive distinct timeouts from it (equal ones could split every vote).
    pub group_seed: u64,
    /// Ticks before a request without answer, or a proposal not yet agreed, is sent again.
    pub retry_ticks: u64,
    /// Ticks between two "which views do I know" reports to a supervisor.
    pub status_ticks: u64,
    /// Ticks a supervisor waits for a suspected node to answer a direct ping before it
    /// proposes the node's failure (a node that answers is not evicted).
    pub confirm_ticks: u64,
}

impl NodeConfig {
    pub fn new(me: NodeId, genesis: Vec<NodeId>, supervisors: Vec<NodeId>) -> NodeConfig {
        NodeConfig {
            me,
            genesis,
            supervisors,
            joining: None,
            locator: LocatorConfig::default(),
            membership: MembershipConfig::default(),
            agreement: AgreementConfig::default(),
            seed: u64::from(me),
            group_seed: 0,
            retry_ticks: 100,
            status_ticks: 50,
            confirm_ticks: 30,
        }
    }
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send {
        to: NodeId,
        msg: Msg,
    },
    /// The answer to a request submitted at this node (each request is answered once).
    Response {
        id: RequestId,
        payload: Vec<u8>,
    },
    /// This node finished the change to `epoch` and is stable.
    Stable {
        epoch: Epoch,
    },
    /// A step of the change to `epoch` ended here: "agreed" (the change is in the log),
    /// "prepared" (step 1 acknowledged by all), "sent" (steps 2-3 done here), "received"
    /// (every participant's entries are in).
    Phase {
        epoch: Epoch,
        phase: &'static str,
    },
    /// This node is out of the configuration (it left, or the view says it failed): stop.
    Stopped {
        reason: String,
    },
    /// Something worth a log line.
    Log(String),
}

/// A request submitted here, waiting for its answer.
struct Pending {
    request: Request,
    sent_at: u64,
}

/// Acknowledgements and entries received for one epoch (they may arrive before this node
/// starts that change).
#[derive(Default)]
struct EpochAcks {
    prepared: BTreeSet<NodeId>,
    sent: BTreeMap<NodeId, Vec<u32>>,
    /// Distinct entries received per sender (a message delivered twice counts once).
    received: BTreeMap<NodeId, BTreeSet<(ServiceId, EntryId)>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Step 1 done here; waiting for every participant's `Prepared`.
    Prepared,
    /// Steps 2 and 3 done here; waiting for every participant's `Sent` and entries.
    Sent,
}

/// The change this node is processing.
struct Migration {
    epoch: Epoch,
    change: Change,
    participants: BTreeSet<NodeId>,
    members: BTreeSet<NodeId>,
    locator: CellTreeLocator,
    step: Step,
}

/// A response waiting for its witnesses.
struct Witnessed {
    request: Request,
    payload: Vec<u8>,
    waiting: BTreeSet<NodeId>,
}

/// One node of the adaptation layer.
pub struct Node {
    cfg: NodeConfig,
    services: Vec<Box<dyn Service>>,
    scopes: Vec<Scope>,
    now: u64,
    /// The agreed changes: epoch `i + 1` applies `log[i]`.
    log: Vec<Change>,
    early_log: BTreeMap<Epoch, Change>,
    /// Members after the whole known log, every node ever admitted, and every node the log
    /// says failed (a participant in that set is not waited for).
    log_members: BTreeSet<NodeId>,
    log_ever: BTreeSet<NodeId>,
    log_failed: BTreeSet<NodeId>,
    /// The last change processed here, its view, and the locators of the last
    /// [`LOCATOR_HISTORY`] epochs (a failed node may have stopped processing changes several
    /// epochs before its failure was agreed, still holding entries of an older view).
    epoch: Epoch,
    members: BTreeSet<NodeId>,
    locators: VecDeque<CellTreeLocator>,
    migration: Option<Migration>,
    acks: BTreeMap<Epoch, EpochAcks>,
    /// Entries that arrived during the current change (they need witness copies).
    arrived: BTreeSet<(ServiceId, EntryId)>,
    stopped: bool,
    delayed: Vec<Request>,
    pending: BTreeMap<RequestId, Pending>,
    witnessed: BTreeMap<RequestId, Witnessed>,
    membership: Membership,
    agreement: Option<Agreement>,
    /// Changes this node wants agreed, with the tick of the last attempt.
    proposals: BTreeMap<Change, u64>,
    next_supervisor: usize,
    /// Supervisors: suspected nodes pinged directly, with the nonce and the deadline, and
    /// when each node last answered a ping.
    confirming: BTreeMap<NodeId, (u64, u64)>,
    answered_at: BTreeMap<NodeId, u64>,
    /// Nodes whose process the driver found gone ([`Node::peer_closed`]): their failure is
    /// proposed without waiting for the detector or a direct ping.
    closed: BTreeSet<NodeId>,
    /// Per service, the buckets whose entries were lost (a manager and every witness of
    /// it failed together): a request for an entry there that no node holds is answered
    /// by [`Service::lost`], never served as a new, empty entry.
    lost: Vec<BTreeSet<usize>>,
    /// The tick at which each agreed change was learned here (`learned_at[i]`: epoch i+1);
    /// `None` for the changes a joiner replays from before it joined.
    learned_at: Vec<Option<u64>>,
    /// Nodes out of the configuration that sent something, and when they were last told.
    told_evicted: BTreeMap<NodeId, u64>,
    /// The epoch whose agreed change says this node failed, once it learned it.
    evicted: Option<Epoch>,
    next_nonce: u64,
    /// Supervisors: the last epoch each node reported as processed.
    done_by: BTreeMap<NodeId, Epoch>,
    out: Vec<Output>,
}

impl Node {
    /// A node running `services` (every node registers the same ones, in the same order).
    pub fn new(cfg: NodeConfig, services: Vec<Box<dyn Service>>) -> Result<Node> {
        if cfg.genesis.is_empty() {
            return Err(AdaptError::Config {
                what: "genesis".into(),
                reason: "no initial member".into(),
            });
        }
        if cfg.supervisors.is_empty() || cfg.supervisors.iter().any(|s| !cfg.genesis.contains(s)) {
            return Err(AdaptError::Config {
                what: "supervisors".into(),
                reason: format!(
                    "{:?} must be a non-empty subset of the initial members {:?}",
                    cfg.supervisors, cfg.genesis
                ),
            });
        }
        let in_genesis = cfg.genesis.contains(&cfg.me);
        if in_genesis == cfg.joining.is_some() {
            return Err(AdaptError::Config {
                what: "joining".into(),
                reason: format!(
                    "node {} {} the initial members but {} an address to announce",
                    cfg.me,
                    if in_genesis {
                        "is one of"
                    } else {
                        "is not one of"
                    },
                    if in_genesis { "has" } else { "has no" }
                ),
            });
        }
        let genesis: BTreeSet<NodeId> = cfg.genesis.iter().copied().collect();
        let sorted: Vec<NodeId> = genesis.iter().copied().collect();
        let locator = CellTreeLocator::new(cfg.locator.clone(), &sorted);
        let lost = vec![BTreeSet::new(); services.len()];
        let scopes = services
            .iter()
            .map(|s| match s.size_hint() {
                Some(n) => locator.scope_for(n),
                None => locator.root_scope(),
            })
            .collect();
        let agreement = if cfg.supervisors.contains(&cfg.me) {
            Some(Agreement::new(
                cfg.me,
                &cfg.supervisors,
                cfg.group_seed,
                cfg.agreement.clone(),
            )?)
        } else {
            None
        };
        let mut membership = Membership::new(cfg.me, cfg.seed, cfg.membership.clone());
        let mut out = Vec::new();
        if in_genesis {
            for &n in genesis.iter().filter(|&&n| n != cfg.me) {
                push_membership(&mut out, membership.add_member(n, 0));
            }
        }
        let mut proposals = BTreeMap::new();
        if let Some(addr) = &cfg.joining {
            proposals.insert(
                Change::Join {
                    node: cfg.me,
                    addr: addr.clone(),
                },
                0,
            );
        }
        // A joiner starts from the same view as everybody (without itself) and replays the
        // log to reach the current one.
        let members = genesis.clone();
        Ok(Node {
            cfg,
            services,
            scopes,
            now: 0,
            log: Vec::new(),
            early_log: BTreeMap::new(),
            log_members: genesis.clone(),
            log_ever: genesis,
            log_failed: BTreeSet::new(),
            epoch: 0,
            members,
            locators: VecDeque::from([locator]),
            migration: None,
            acks: BTreeMap::new(),
            arrived: BTreeSet::new(),
            stopped: false,
            delayed: Vec::new(),
            pending: BTreeMap::new(),
            witnessed: BTreeMap::new(),
            membership,
            agreement,
            proposals,
            next_supervisor: 0,
            confirming: BTreeMap::new(),
            answered_at: BTreeMap::new(),
            closed: BTreeSet::new(),
            lost,
            learned_at: Vec::new(),
            told_evicted: BTreeMap::new(),
            evicted: None,
            next_nonce: 1,
            done_by: BTreeMap::new(),
            out,
        })
    }

    pub fn id(&self) -> NodeId {
        self.cfg.me
    }
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }
    /// The last epoch whose change finished here.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// The number of agreed changes this node knows of.
    pub fn known_epoch(&self) -> Epoch {
        self.log.len() as Epoch
    }
    /// Stable: no change in progress and every known change processed.
    pub fn is_stable(&self) -> bool {
        self.migration.is_none() && self.epoch == self.known_epoch()
    }
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }
    /// `Some(epoch)` once this node learned that the agreed view of `epoch` declared it
    /// failed (it was cut off or too slow, and stopped): its driver may come back as a new
    /// member with [`Node::rejoin_config`].
    pub fn evicted(&self) -> Option<Epoch> {
        self.evicted
    }
    /// The configuration of this node's next incarnation after an eviction: a new id
    /// ([`REJOIN_STRIDE`] above this one), announcing itself at `addr`.
    pub fn rejoin_config(&self, addr: String) -> Result<NodeConfig> {
        let me = self
            .cfg
            .me
            .checked_add(REJOIN_STRIDE)
            .ok_or_else(|| AdaptError::Config {
                what: "node id".into(),
                reason: format!("{} has no id left to rejoin with", self.cfg.me),
            })?;
        let mut cfg = self.cfg.clone();
        cfg.me = me;
        cfg.joining = Some(addr);
        cfg.seed ^= u64::from(me) << 32;
        Ok(cfg)
    }
    /// How many buckets of `service` hold entries that were lost.
    pub fn lost_buckets(&self, service: ServiceId) -> usize {
        self.lost.get(service as usize).map_or(0, |l| l.len())
    }
    /// The view of [`Node::epoch`].
    pub fn members(&self) -> &BTreeSet<NodeId> {
        &self.members
    }
    pub fn is_member(&self) -> bool {
        self.members.contains(&self.cfg.me)
    }
    pub fn locator(&self) -> &CellTreeLocator {
        &self.locators[0]
    }
    pub fn scope(&self, service: ServiceId) -> Option<&Scope> {
        self.scopes.get(service as usize)
    }
    pub fn service(&self, service: ServiceId) -> Option<&dyn Service> {
        self.services.get(service as usize).map(|s| s.as_ref())
    }
    pub fn service_mut(&mut self, service: ServiceId) -> Option<&mut (dyn Service + 'static)> {
        self.services.get_mut(service as usize).map(|s| s.as_mut())
    }
    pub fn log(&self) -> &[Change] {
        &self.log
    }
    /// The Raft leader this node knows of (supervisors only).
    /// The supervisors: the members of the Raft group that agrees on changes.
    pub fn supervisors(&self) -> &[NodeId] {
        &self.cfg.supervisors
    }

    pub fn leader(&self) -> Option<NodeId> {
        self.agreement.as_ref().and_then(|a| a.leader())
    }
    /// Requests submitted here that have no answer yet.
    pub fn pending_requests(&self) -> usize {
        self.pending.len()
    }
    /// The manager of `entry` of `service` in this node's current view.
    pub fn manager_of(&self, service: ServiceId, entry: EntryId) -> Option<NodeId> {
        let scope = self.scopes.get(service as usize)?;
        Some(self.locators[0].manager_in(scope, entry))
    }
    /// The actions produced since the last call.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Submits a client request at this node; its answer comes back as
    /// [`Output::Response`]. A client retrying through another node keeps the `id`.
    pub fn submit(
        &mut self,
        id: RequestId,
        service: ServiceId,
        entry: EntryId,
        payload: Vec<u8>,
    ) -> Result<()> {
        if service as usize >= self.services.len() {
            return Err(AdaptError::UnknownService(format!("#{service}")));
        }
        let request = Request {
            id,
            reply_to: self.cfg.me,
            service,
            entry,
            payload,
        };
        self.pending.insert(
            id,
            Pending {
                request: request.clone(),
                sent_at: self.now,
            },
        );
        self.route(request);
        Ok(())
    }

    /// Loads entries this node manages into `service` (bulk loading) and sends their
    /// copies to the entries' witnesses, as a write would: a loaded entry survives the
    /// failure of this node. Entries this node does not manage are refused by id.
    pub fn load(&mut self, service: ServiceId, entries: Vec<(EntryId, Vec<u8>)>) -> Result<()> {
        if service as usize >= self.services.len() {
            return Err(AdaptError::UnknownService(format!("#{service}")));
        }
        let me = self.cfg.me;
        if let Some((e, _)) = entries
            .iter()
            .find(|(e, _)| self.manager_of(service, *e) != Some(me))
        {
            return Err(AdaptError::Locator(format!(
                "entry {e} of service #{service} is not managed by node {me}"
            )));
        }
        let svc = &mut self.services[service as usize];
        let witnesses = witnesses_in(&self.members, me, svc.witnesses());
        let mut sends = Vec::new();
        for (entry, state) in entries {
            svc.receive(entry, state);
            if let Some(copy) = svc.witness_copy(entry) {
                for &w in &witnesses {
                    sends.push((w, service, entry, copy.clone()));
                }
            }
        }
        for (to, service, entries) in batches(sends) {
            self.send(to, Msg::Copies { service, entries });
        }
        Ok(())
    }

    /// Asks for `node` to be evicted (a planned departure: it hands its entries over first).
    /// The driver's evidence that `node`'s process is gone: a link from it closed (a killed
    /// process's sockets close at once) and its listening address refused a new connection
    /// (nothing listens there any more). A slow or partitioned node gives neither (its
    /// sockets stay open, a connection to it times out instead of being refused), so this
    /// never replaces the detector: it only skips the waits (the suspicion timeout, and a
    /// supervisor's direct ping) for a node that cannot answer anyway.
    pub fn peer_closed(&mut self, node: NodeId) {
        if node == self.cfg.me
            || !self.log_members.contains(&node)
            || self.log_failed.contains(&node)
        {
            return;
        }
        if self.closed.insert(node) {
            self.note(format!(
                "node {node} closed its links and refuses connections: proposing its failure"
            ));
        }
        let change = Change::Fail { node };
        if self.agreement.is_some() {
            // A supervisor proposes it at once, even when it was already waiting for it.
            self.proposals.insert(change.clone(), self.now);
            self.supervise(change, self.cfg.me);
        } else {
            self.proposals.remove(&change);
            self.want(change);
        }
    }

    pub fn request_leave(&mut self, node: NodeId) -> Result<()> {
        if self.cfg.supervisors.contains(&node) {
            return Err(AdaptError::ChangeRefused(format!(
                "node {node} is a supervisor (a member of the Raft group) and cannot leave"
            )));
        }
        if !self.log_members.contains(&node) {
            return Err(AdaptError::UnknownNode(node));
        }
        if self.log_members.len() == 1 {
            return Err(AdaptError::ChangeRefused(format!(
                "node {node} is the last member"
            )));
        }
        self.want(Change::Leave { node });
        Ok(())
    }

    /// One tick of the logical clock.
    pub fn tick(&mut self) {
        if self.stopped {
            return;
        }
        self.now += 1;
        let m = self.membership.tick(self.now);
        self.on_membership(m);
        if let Some(a) = self.agreement.as_mut() {
            let o = a.tick();
            self.on_agreement(o);
        }
        self.retry_proposals();
        self.confirm_failures();
        if self.now.is_multiple_of(self.cfg.status_ticks.max(1)) {
            let status = Msg::Status {
                epoch: self.known_epoch(),
                done: self.epoch,
            };
            let supervisors: Vec<NodeId> = self
                .cfg
                .supervisors
                .iter()
                .copied()
                .filter(|s| *s != self.cfg.me && !self.log_failed.contains(s))
                .collect();
            for s in supervisors {
                self.send(s, status.clone());
            }
        }
        if self.migration.is_none() {
            let due: Vec<Request> = self
                .pending
                .values_mut()
                .filter(|p| self.now.saturating_sub(p.sent_at) >= self.cfg.retry_ticks)
                .map(|p| {
                    p.sent_at = self.now;
                    p.request.clone()
                })
                .collect();
            for r in due {
                self.route(r);
            }
        }
    }

    /// A message from `from` (already authenticated by the driver).
    pub fn receive(&mut self, from: NodeId, msg: Msg) {
        if self.stopped {
            return;
        }
        if from != self.cfg.me && self.log_failed.contains(&from) {
            // A node the log declared failed is out: it is told so (at its first exchange
            // with a member after a cut, so that it rejoins as a new member at once), and
            // what it asks for is refused: above all a witness never observes a write it
            // still serves in its old view (that write would be acknowledged, then lost
            // with the entries rebuilt from copies elsewhere). What it sent before it was
            // cut off (entries, acknowledgements of older changes, Raft) is still taken.
            self.tell_evicted(from);
            if matches!(
                msg,
                Msg::Swim(_)
                    | Msg::Propose(_)
                    | Msg::Request(_)
                    | Msg::Observe { .. }
                    | Msg::Status { .. }
                    | Msg::Ping { .. }
            ) {
                return;
            }
        }
        match msg {
            Msg::Swim(bytes) => match self.membership.handle(from, &bytes, self.now) {
                Ok(o) => self.on_membership(o),
                Err(e) => self.note(format!("dropped failure-detector message from {from}: {e}")),
            },
            Msg::Raft(bytes) => {
                let Some(a) = self.agreement.as_mut() else {
                    self.note(format!("raft message from {from}, but not a supervisor"));
                    return;
                };
                match a.handle(from, &bytes) {
                    Ok(o) => self.on_agreement(o),
                    Err(e) => self.note(format!("dropped raft message from {from}: {e}")),
                }
            }
            Msg::Propose(change) => {
                if self.agreement.is_some()
                    && !is_done(&change, &self.log_members, &self.log_ever, &self.log_failed)
                {
                    self.supervise(change, from);
                }
            }
            Msg::Lost { service, buckets } => {
                let range = self
                    .scopes
                    .get(service as usize)
                    .map(|sc| sc.first_bucket..sc.first_bucket + sc.buckets);
                match (self.lost.get_mut(service as usize), range) {
                    (Some(lost), Some(range)) => {
                        lost.extend(
                            buckets
                                .into_iter()
                                .map(|b| b as usize)
                                .filter(|b| range.contains(b)),
                        );
                    }
                    _ => self.note(format!(
                        "lost buckets from {from} for unknown service #{service}"
                    )),
                }
            }
            Msg::Ping { nonce } => self.send(from, Msg::Pong { nonce }),
            Msg::Pong { nonce } => {
                if self.confirming.get(&from).is_some_and(|(n, _)| *n == nonce) {
                    self.confirming.remove(&from);
                    self.answered_at.insert(from, self.now);
                    self.note(format!(
                        "node {from} is suspected but answers: its failure is not proposed"
                    ));
                }
            }
            Msg::ViewChange { epoch, change } => self.learn(epoch, change),
            Msg::Status { epoch, done } => {
                if self.agreement.is_some() {
                    self.done_by.insert(from, done);
                    let first = epoch as usize;
                    let changes: Vec<(Epoch, Change)> = self
                        .log
                        .iter()
                        .enumerate()
                        .skip(first)
                        .take(64)
                        .map(|(i, c)| (i as Epoch + 1, c.clone()))
                        .collect();
                    for (epoch, change) in changes {
                        self.send(from, Msg::ViewChange { epoch, change });
                    }
                }
            }
            Msg::Prepared { epoch } => {
                self.acks.entry(epoch).or_default().prepared.insert(from);
                self.advance();
            }
            Msg::EntryData {
                epoch,
                service,
                entries,
            } => {
                if epoch <= self.epoch {
                    // Only a sender the change did not wait for (it was declared failed)
                    // sends after the change ended here; the repair rebuilt its entries
                    // from copies, and they may have moved on since.
                    self.note(format!(
                        "{} entries from node {from} for epoch {epoch}, which ended here: dropped",
                        entries.len()
                    ));
                    return;
                }
                let Some(svc) = self.services.get_mut(service as usize) else {
                    self.note(format!(
                        "{} entries from {from} for unknown service #{service}",
                        entries.len()
                    ));
                    return;
                };
                let received = self
                    .acks
                    .entry(epoch)
                    .or_default()
                    .received
                    .entry(from)
                    .or_default();
                for (entry, state) in entries {
                    svc.receive(entry, state);
                    self.arrived.insert((service, entry));
                    received.insert((service, entry));
                }
            }
            Msg::Copies { service, entries } => {
                if let Some(svc) = self.services.get_mut(service as usize) {
                    for (entry, payload) in entries {
                        svc.observe_response(entry, &payload);
                    }
                }
            }
            Msg::Sent { epoch, counts } => {
                self.acks
                    .entry(epoch)
                    .or_default()
                    .sent
                    .insert(from, counts);
                self.advance();
            }
            Msg::Request(r) => self.route(r),
            Msg::Response {
                id,
                service,
                entry,
                payload,
            } => self.deliver(id, service, entry, payload),
            Msg::Observe {
                id,
                service,
                entry,
                payload,
            } => {
                if let Some(svc) = self.services.get_mut(service as usize) {
                    svc.observe_response(entry, &payload);
                }
                self.send(from, Msg::Observed { id });
            }
            Msg::Observed { id } => {
                let done = match self.witnessed.get_mut(&id) {
                    Some(w) => {
                        w.waiting.remove(&from);
                        w.waiting.is_empty()
                    }
                    None => false,
                };
                if done {
                    if let Some(w) = self.witnessed.remove(&id) {
                        self.respond(w.request, w.payload);
                    }
                }
            }
        }
    }

    fn note(&mut self, line: String) {
        self.out.push(Output::Log(line));
    }

    fn send(&mut self, to: NodeId, msg: Msg) {
        self.out.push(Output::Send { to, msg });
    }

    fn on_membership(&mut self, o: MembershipOutput) {
        for (to, bytes) in o.messages {
            self.send(to, Msg::Swim(bytes));
        }
        for e in o.events {
            if let MembershipEvent::Down(node) = e {
                if self.log_ever.contains(&node) && !self.log_failed.contains(&node) {
                    self.note(format!("node {node} is down: proposing its failure"));
                    self.want(Change::Fail { node });
                }
            }
        }
    }

    fn on_agreement(&mut self, o: AgreementOutput) {
        for (to, bytes) in o.messages {
            self.send(to, Msg::Raft(bytes));
        }
        for ((_, change), (by, asked_at)) in o.committed.into_iter().zip(o.requested_by) {
            // Only changes that still make sense at their place in the log become epochs;
            // every supervisor judges the same log the same way.
            if is_done(&change, &self.log_members, &self.log_ever, &self.log_failed)
                || !self.allowed(&change)
            {
                continue;
            }
            // Fenced: asked for by a node that is out of the configuration at this point of
            // the log (declared failed, or gone), in an epoch before it went out.
            if self.log_ever.contains(&by) && !self.log_members.contains(&by) {
                let out_at = self
                    .log
                    .iter()
                    .position(|c| c.node() == by && !matches!(c, Change::Join { .. }))
                    .map_or(0, |i| i as Epoch + 1);
                self.note(format!(
                    "refused {change:?}: asked by node {by} at epoch {asked_at}, which is out \
                     of the configuration since epoch {out_at}"
                ));
                continue;
            }
            let epoch = self.known_epoch() + 1;
            self.learn(epoch, change.clone());
            let mut to: BTreeSet<NodeId> = self.log_members.clone();
            to.insert(change.node());
            to.remove(&self.cfg.me);
            for n in to {
                self.send(
                    n,
                    Msg::ViewChange {
                        epoch,
                        change: change.clone(),
                    },
                );
            }
        }
    }

    /// Whether the log may take `change` now (it is not already done).
    fn allowed(&self, change: &Change) -> bool {
        match change {
            Change::Join { .. } => true,
            Change::Leave { node } => {
                self.log_members.len() > 1 && !self.cfg.supervisors.contains(node)
            }
            Change::Fail { .. } => self.log_members.len() > 1,
        }
    }

    fn want(&mut self, change: Change) {
        if !self.proposals.contains_key(&change) {
            self.proposals.insert(change.clone(), self.now);
            self.propose_now(change);
        }
    }

    fn propose_now(&mut self, change: Change) {
        if self.agreement.is_some() {
            self.supervise(change, self.cfg.me);
        } else if let Some(s) = self.pick_supervisor() {
            self.send(s, Msg::Propose(change));
        }
    }

    /// A supervisor puts a change to Raft; a failure only once the node failed to answer a
    /// direct ping (a false suspicion must not evict a node that can still answer).
    fn supervise(&mut self, change: Change, by: NodeId) {
        if let Change::Fail { node } = change {
            if node == self.cfg.me {
                return;
            }
            // A node that left is gone, not failed, once every member reports its leave
            // complete. Until then it may have stopped before every member had its last
            // messages, and its failure must be agreed for them to move on.
            let left_at = self
                .log
                .iter()
                .position(|c| *c == Change::Leave { node })
                .map(|i| i as Epoch + 1);
            if let Some(e) = left_at {
                let me = self.cfg.me;
                let all_done = self.log_members.iter().all(|m| {
                    let done = if *m == me {
                        self.epoch
                    } else {
                        self.done_by.get(m).copied().unwrap_or(0)
                    };
                    done >= e
                });
                if all_done {
                    return;
                }
            }
            if self.closed.contains(&node) {
                // Its process is gone (see `peer_closed`): no ping can be answered.
                self.confirming.remove(&node);
                self.put_to_raft(change, by);
                return;
            }
            let recently = self
                .answered_at
                .get(&node)
                .is_some_and(|&t| self.now.saturating_sub(t) < self.cfg.retry_ticks);
            if recently || self.confirming.contains_key(&node) {
                return;
            }
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            self.confirming
                .insert(node, (nonce, self.now + self.cfg.confirm_ticks));
            self.send(node, Msg::Ping { nonce });
            return;
        }
        self.put_to_raft(change, by);
    }

    /// Proposes `change` to Raft, asked by `by` in this node's known epoch.
    fn put_to_raft(&mut self, change: Change, by: NodeId) {
        let proposal = Proposal {
            change,
            by,
            epoch: self.known_epoch(),
        };
        if let Some(a) = self.agreement.as_mut() {
            let o = a.propose_by(&proposal);
            self.on_agreement(o);
        }
    }

    /// Suspected nodes that did not answer in time: their failure goes to Raft.
    fn confirm_failures(&mut self) {
        let now = self.now;
        // The ping goes again a few times before the deadline: one lost message must not
        // evict a node that answers.
        let step = (self.cfg.confirm_ticks / 3).max(1);
        let again: Vec<(NodeId, u64)> = self
            .confirming
            .iter()
            .filter(|(_, (_, deadline))| now < *deadline && (*deadline - now).is_multiple_of(step))
            .map(|(n, (nonce, _))| (*n, *nonce))
            .collect();
        for (node, nonce) in again {
            self.send(node, Msg::Ping { nonce });
        }
        let silent: Vec<NodeId> = self
            .confirming
            .iter()
            .filter(|(_, (_, deadline))| now >= *deadline)
            .map(|(n, _)| *n)
            .collect();
        for node in silent {
            self.confirming.remove(&node);
            let change = Change::Fail { node };
            if is_done(&change, &self.log_members, &self.log_ever, &self.log_failed) {
                continue;
            }
            self.note(format!(
                "node {node} did not answer a direct ping: proposing its failure"
            ));
            self.put_to_raft(change, self.cfg.me);
        }
    }

    fn retry_proposals(&mut self) {
        let (members, ever, failed) = (&self.log_members, &self.log_ever, &self.log_failed);
        self.proposals
            .retain(|c, _| !is_done(c, members, ever, failed));
        let due: Vec<Change> = self
            .proposals
            .iter_mut()
            // `at == 0`: a join announced at creation, not sent yet.
            .filter(|(_, at)| {
                **at == 0 || self.now.saturating_sub(**at) >= self.cfg.retry_ticks / 2
            })
            .map(|(c, at)| {
                *at = self.now;
                c.clone()
            })
            .collect();
        for c in due {
            self.propose_now(c);
        }
    }

    /// A supervisor that is not known to have failed, rotating.
    fn pick_supervisor(&mut self) -> Option<NodeId> {
        let alive: Vec<NodeId> = self
            .cfg
            .supervisors
            .iter()
            .copied()
            .filter(|s| !self.log_failed.contains(s) && *s != self.cfg.me)
            .collect();
        if alive.is_empty() {
            return None;
        }
        self.next_supervisor = self.next_supervisor.wrapping_add(1);
        Some(alive[self.next_supervisor % alive.len()])
    }

    /// Records the agreed change of `epoch` and processes what can be processed.
    fn learn(&mut self, epoch: Epoch, change: Change) {
        let known = self.known_epoch();
        if epoch <= known {
            return;
        }
        if change == (Change::Fail { node: self.cfg.me }) {
            // Evicted (cut off, or too slow): out at once, without replaying the changes
            // before it (their participants moved on and would never answer).
            self.evicted = Some(epoch);
            self.stop(format!(
                "evicted: the agreed view of epoch {epoch} says this node failed"
            ));
            return;
        }
        self.early_log.insert(epoch, change);
        while let Some(change) = self.early_log.remove(&(self.known_epoch() + 1)) {
            let replayed = self.cfg.joining.is_some() && !self.log_ever.contains(&self.cfg.me);
            match &change {
                Change::Join { node, .. } => {
                    self.log_members.insert(*node);
                    self.log_ever.insert(*node);
                }
                Change::Leave { node } => {
                    self.log_members.remove(node);
                }
                Change::Fail { node } => {
                    self.log_members.remove(node);
                    self.log_failed.insert(*node);
                }
            }
            self.log.push(change);
            self.learned_at.push((!replayed).then_some(self.now));
            self.out.push(Output::Phase {
                epoch: self.log.len() as Epoch,
                phase: "agreed",
            });
        }
        self.advance();
    }

    /// Starts and finishes changes for as long as their acknowledgements are in.
    fn advance(&mut self) {
        loop {
            if self.stopped {
                return;
            }
            if self.migration.is_some() {
                if !self.try_finish() {
                    return;
                }
                continue;
            }
            if self.epoch >= self.known_epoch() {
                return;
            }
            self.start(self.epoch + 1);
        }
    }

    fn start(&mut self, epoch: Epoch) {
        let change = self.log[(epoch - 1) as usize].clone();
        let me = self.cfg.me;
        let mut members = self.members.clone();
        let mut locator = self.locators[0].clone();
        let mut participants = self.members.clone();
        match &change {
            Change::Join { node, .. } => {
                members.insert(*node);
                participants.insert(*node);
                locator.add_node(*node);
            }
            Change::Leave { node } => {
                members.remove(node);
                locator.remove_node(*node);
            }
            Change::Fail { node } => {
                members.remove(node);
                participants.remove(node);
                locator.remove_node(*node);
            }
        }
        // Failure detection follows the view.
        let now = self.now;
        match &change {
            Change::Join { node, .. } if *node == me => {
                for &n in members.iter().filter(|&&n| n != me) {
                    let o = self.membership.add_member(n, now);
                    self.on_membership(o);
                }
            }
            Change::Join { node, .. } if participants.contains(&me) => {
                let o = self.membership.add_member(*node, now);
                self.on_membership(o);
            }
            // A leaving node stays watched until its change is over: if it crashes meanwhile,
            // its failure must be detected.
            Change::Fail { node } if *node != me => {
                let o = self.membership.remove_member(*node, now);
                self.on_membership(o);
            }
            _ => {}
        }
        if let Change::Fail { node } = &change {
            if *node == me {
                self.stop(format!(
                    "the agreed view of epoch {epoch} says this node failed"
                ));
                return;
            }
        }
        if !participants.contains(&me) {
            // A change from before this node joined: replayed to get the same locator.
            self.install(epoch, members, locator);
            return;
        }
        // Step 1: before migration.
        for (s, svc) in self.services.iter_mut().enumerate() {
            let scope = &self.scopes[s];
            let leaving: Vec<EntryId> = svc
                .managed()
                .into_iter()
                .filter(|&e| locator.manager_in(scope, e) != me)
                .collect();
            svc.before_migration(epoch, &leaving);
        }
        for &p in participants.iter().filter(|&&p| p != me) {
            self.send(p, Msg::Prepared { epoch });
        }
        self.migration = Some(Migration {
            epoch,
            change,
            participants,
            members,
            locator,
            step: Step::Prepared,
        });
    }

    /// The participants this node still waits for in `m`: not itself, not failed.
    fn awaited(&self, m: &Migration) -> Vec<NodeId> {
        m.participants
            .iter()
            .copied()
            .filter(|p| *p != self.cfg.me && !self.log_failed.contains(p))
            .collect()
    }

    /// Moves the current change on; true when it finished.
    fn try_finish(&mut self) -> bool {
        let Some(m) = self.migration.as_ref() else {
            return true;
        };
        let epoch = m.epoch;
        let awaited = self.awaited(m);
        let acks = self.acks.entry(epoch).or_default();
        if m.step == Step::Prepared {
            if !awaited.iter().all(|p| acks.prepared.contains(p)) {
                return false;
            }
            self.out.push(Output::Phase {
                epoch,
                phase: "prepared",
            });
            self.send_out();
            self.out.push(Output::Phase {
                epoch,
                phase: "sent",
            });
        }
        let Some(m) = self.migration.as_ref() else {
            return true;
        };
        let acks = self.acks.entry(epoch).or_default();
        if !awaited.iter().all(|p| acks.sent.contains_key(p)) {
            return false;
        }
        let n = self.services.len();
        let mut problems = Vec::new();
        for p in &awaited {
            let want = acks.sent.get(p).cloned().unwrap_or_default();
            let mut got = vec![0u32; n];
            for (s, _) in acks.received.get(p).into_iter().flatten() {
                if let Some(c) = got.get_mut(*s as usize) {
                    *c += 1;
                }
            }
            if want != got {
                problems.push(format!(
                    "epoch {epoch}: node {p} sent {want:?} entries per service, {got:?} arrived"
                ));
            }
        }
        let _ = m;
        for p in problems {
            self.note(p);
        }
        self.out.push(Output::Phase {
            epoch,
            phase: "received",
        });
        // Step 4: after migration.
        let Some(m) = self.migration.take() else {
            return true;
        };
        for svc in self.services.iter_mut() {
            svc.after_migration(epoch);
        }
        let leaving = matches!(m.change, Change::Leave { node } if node == self.cfg.me);
        if let Change::Leave { node } = m.change {
            if node != self.cfg.me {
                let o = self.membership.remove_member(node, self.now);
                self.on_membership(o);
            }
        }
        self.mark_losses(&m, epoch);
        let old_members = std::mem::replace(&mut self.members, m.members.clone());
        self.install(epoch, m.members, m.locator);
        if !leaving {
            self.refresh_witnesses(&old_members);
        }
        self.acks.retain(|&e, _| e > epoch);
        self.out.push(Output::Stable { epoch });
        // Responses held for witnesses are not sent blindly (an `Observe` may have been
        // lost, or its witness failed): the requests go again, with the delayed ones, to
        // their managers in the new view, which answer them from the entry's client table
        // once its witnesses there have observed the answer.
        let held: Vec<Witnessed> = std::mem::take(&mut self.witnessed).into_values().collect();
        self.delayed
            .splice(0..0, held.into_iter().map(|w| w.request));
        for r in std::mem::take(&mut self.delayed) {
            if leaving {
                // Not a member any more: hand the request to its manager in the new view.
                if let Some(m) = self.manager_of(r.service, r.entry) {
                    self.send(m, Msg::Request(r));
                }
            } else {
                self.route(r);
            }
        }
        if leaving {
            self.stop(format!("left the configuration at epoch {epoch}"));
        } else {
            // Requests submitted here go again to their (possibly new) managers.
            let again: Vec<Request> = self
                .pending
                .values_mut()
                .map(|p| {
                    p.sent_at = self.now;
                    p.request.clone()
                })
                .collect();
            for r in again {
                self.route(r);
            }
        }
        true
    }

    /// Sends witness copies of the entries managed here that arrived in the change just
    /// finished, or whose witnesses changed with the view.
    fn refresh_witnesses(&mut self, old_members: &BTreeSet<NodeId>) {
        let arrived = std::mem::take(&mut self.arrived);
        let me = self.cfg.me;
        let mut sends = Vec::new();
        for (s, svc) in self.services.iter().enumerate() {
            let k = svc.witnesses();
            if k == 0 {
                continue;
            }
            let now = witnesses_in(&self.members, me, k);
            let before = witnesses_in(old_members, me, k);
            for entry in svc.managed() {
                let moved = arrived.contains(&(s as ServiceId, entry));
                let targets: Vec<NodeId> = if moved {
                    now.clone()
                } else {
                    now.iter()
                        .copied()
                        .filter(|w| !before.contains(w))
                        .collect()
                };
                if targets.is_empty() {
                    continue;
                }
                if let Some(copy) = svc.witness_copy(entry) {
                    for &w in &targets {
                        sends.push((w, s as ServiceId, entry, copy.clone()));
                    }
                }
            }
        }
        for (to, service, entries) in batches(sends) {
            self.send(to, Msg::Copies { service, entries });
        }
    }

    /// Steps 2 and 3: entries and orphans out to their new managers, then `Sent` to all.
    fn send_out(&mut self) {
        let Some(m) = self.migration.as_mut() else {
            return;
        };
        m.step = Step::Sent;
        let me = self.cfg.me;
        let epoch = m.epoch;
        let n = self.services.len();
        let failed = match m.change {
            Change::Fail { node } => Some(node),
            _ => None,
        };
        let mut counts: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        // Counted once per (receiver, entry): the receiver counts distinct entries.
        let mut counted: BTreeSet<(NodeId, ServiceId, EntryId)> = BTreeSet::new();
        let mut sends = Vec::new();
        // An entry for a node that is failing stays here until the next change places it;
        // a node that is leaving hands such entries to a member that stays.
        let leaving = matches!(m.change, Change::Leave { node } if node == me);
        let keeper = if leaving {
            m.members
                .iter()
                .copied()
                .find(|n| *n != me && !self.log_failed.contains(n))
        } else {
            Some(me)
        };
        for (s, svc) in self.services.iter_mut().enumerate() {
            let scope = &self.scopes[s];
            for entry in svc.managed() {
                let mut to = m.locator.manager_in(scope, entry);
                if self.log_failed.contains(&to) {
                    to = keeper.unwrap_or(me);
                }
                if to == me {
                    continue;
                }
                // The previous manager keeps a copy: if the new one fails before its witness
                // has one, the failure scan still finds the entry (here, or at the member a
                // leaving node hands its copies to).
                let copy = (svc.witnesses() > 0)
                    .then(|| svc.witness_copy(entry))
                    .flatten();
                if let Some(state) = svc.send_out(entry) {
                    if counted.insert((to, s as ServiceId, entry)) {
                        counts.entry(to).or_insert_with(|| vec![0; n])[s] += 1;
                    }
                    sends.push((to, s as ServiceId, entry, state));
                    if let Some(copy) = copy {
                        svc.observe_response(entry, &copy);
                    }
                }
            }
            if let Some(failed) = failed {
                // Failure repair: the failed node managed these under one of the recent views
                // (it may have stopped before sending them on). Copies of entries it had
                // already handed over are merged away by version at their managers.
                let previous: Vec<&CellTreeLocator> = self.locators.iter().collect();
                let orphan = |e: EntryId| previous.iter().any(|l| l.manager_in(scope, e) == failed);
                for (entry, state) in svc.scan(&orphan) {
                    let to = m.locator.manager_in(scope, entry);
                    if to == me || self.log_failed.contains(&to) {
                        svc.receive(entry, state);
                        self.arrived.insert((s as ServiceId, entry));
                    } else {
                        if counted.insert((to, s as ServiceId, entry)) {
                            counts.entry(to).or_insert_with(|| vec![0; n])[s] += 1;
                        }
                        sends.push((to, s as ServiceId, entry, state));
                    }
                }
            }
        }
        // A leaving node's copies (for failure repair, including those of the entries it
        // just handed over) go to the entry's next two witnesses in the new view, never its
        // new manager: the leave removes one copy, so one failure during it must not take
        // the others.
        let mut copies = Vec::new();
        if let (true, Some(keeper)) = (leaving, keeper) {
            for (s, svc) in self.services.iter_mut().enumerate() {
                let scope = &self.scopes[s];
                for (entry, payload) in svc.handover_copies() {
                    let manager = m.locator.manager_in(scope, entry);
                    let mut targets: Vec<NodeId> =
                        witnesses_in(&m.members, manager, m.members.len())
                            .into_iter()
                            .filter(|w| *w != me && !self.log_failed.contains(w))
                            .take(2)
                            .collect();
                    if targets.is_empty() {
                        targets.push(keeper);
                    }
                    for to in targets {
                        copies.push((to, s as ServiceId, entry, payload.clone()));
                    }
                }
            }
        }
        let joiner = match m.change {
            Change::Join { node, .. } if node != me => Some(node),
            _ => None,
        };
        let participants: Vec<NodeId> = m
            .participants
            .iter()
            .copied()
            .filter(|&p| p != me)
            .collect();
        for (to, service, entries) in batches(sends) {
            self.send(
                to,
                Msg::EntryData {
                    epoch,
                    service,
                    entries,
                },
            );
        }
        for (to, service, entries) in batches(copies) {
            self.send(to, Msg::Copies { service, entries });
        }
        // A joiner learns which buckets were lost, as every member knows.
        if let Some(node) = joiner {
            let lost: Vec<(ServiceId, Vec<u32>)> = self
                .lost
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(s, l)| (s as ServiceId, l.iter().map(|&b| b as u32).collect()))
                .collect();
            for (service, buckets) in lost {
                self.send(node, Msg::Lost { service, buckets });
            }
        }
        for p in participants {
            let c = counts.remove(&p).unwrap_or_else(|| vec![0; n]);
            self.send(p, Msg::Sent { epoch, counts: c });
        }
    }

    fn install(&mut self, epoch: Epoch, members: BTreeSet<NodeId>, locator: CellTreeLocator) {
        self.epoch = epoch;
        self.members = members;
        self.locators.push_front(locator);
        self.locators.truncate(LOCATOR_HISTORY);
    }

    fn stop(&mut self, reason: String) {
        self.stopped = true;
        self.migration = None;
        self.out.push(Output::Stopped { reason });
    }

    /// Executes a request here if this node manages its entry, else forwards it to the
    /// manager of this node's view (also from a node that is not a member yet); delays it
    /// until every agreed change is processed here.
    fn route(&mut self, r: Request) {
        if self.stopped {
            return;
        }
        // During a change, and while a further agreed change is still to be processed (a
        // participant may have failed without sending its entries), nothing is served here.
        if self.migration.is_some() || self.epoch < self.known_epoch() {
            self.delayed.push(r);
            return;
        }
        let Some(manager) = self.manager_of(r.service, r.entry) else {
            self.note(format!(
                "request {:?} for unknown service #{}",
                r.id, r.service
            ));
            return;
        };
        if manager != self.cfg.me {
            self.send(manager, Msg::Request(r));
            return;
        }
        let lost = self.lost.get(r.service as usize).is_some_and(|l| {
            !l.is_empty()
                && l.contains(&CellTreeLocator::bucket_in(
                    &self.scopes[r.service as usize],
                    r.entry,
                ))
        });
        let Some(svc) = self.services.get_mut(r.service as usize) else {
            return;
        };
        if lost && !svc.holds(r.entry) {
            if let Some(answer) = svc.lost(r.entry, r.id, &r.payload) {
                self.respond(r, answer);
                return;
            }
        }
        let payload = svc.handle(r.entry, r.id, &r.payload);
        let want = svc.witnesses();
        let witnesses = self.witnesses_of(want);
        if witnesses.is_empty() {
            self.respond(r, payload);
            return;
        }
        for &w in &witnesses {
            self.send(
                w,
                Msg::Observe {
                    id: r.id,
                    service: r.service,
                    entry: r.entry,
                    payload: payload.clone(),
                },
            );
        }
        self.witnessed.insert(
            r.id,
            Witnessed {
                request: r,
                payload,
                waiting: witnesses.into_iter().collect(),
            },
        );
    }

    /// The `k` members following this node in the view (its witnesses).
    fn witnesses_of(&self, k: usize) -> Vec<NodeId> {
        witnesses_in(&self.members, self.cfg.me, k)
    }

    fn respond(&mut self, r: Request, payload: Vec<u8>) {
        if r.reply_to == self.cfg.me {
            self.deliver(r.id, r.service, r.entry, payload);
        } else {
            self.send(
                r.reply_to,
                Msg::Response {
                    id: r.id,
                    service: r.service,
                    entry: r.entry,
                    payload,
                },
            );
        }
    }

    /// An answer for a request submitted here: given to the client once.
    fn deliver(&mut self, id: RequestId, service: ServiceId, entry: EntryId, payload: Vec<u8>) {
        if self.pending.remove(&id).is_none() {
            return;
        }
        if let Some(svc) = self.services.get_mut(service as usize) {
            svc.observe_response(entry, &payload);
        }
        self.out.push(Output::Response { id, payload });
    }
}

/// Entries with their states, as one message carries them.
type EntryBatch = Vec<(EntryId, Vec<u8>)>;

/// Largest batch of entries in one message, in bytes of state.
const BATCH_BYTES: usize = 1 << 20;

/// Groups `(to, service, entry, state)` into messages per destination and service, in the
/// order given, each holding at most [`BATCH_BYTES`] of state (and at least one entry).
fn batches(
    items: Vec<(NodeId, ServiceId, EntryId, Vec<u8>)>,
) -> Vec<(NodeId, ServiceId, EntryBatch)> {
    let mut open: BTreeMap<(NodeId, ServiceId), (EntryBatch, usize)> = BTreeMap::new();
    let mut out = Vec::new();
    for (to, service, entry, state) in items {
        let (batch, bytes) = open.entry((to, service)).or_default();
        if !batch.is_empty() && *bytes + state.len() > BATCH_BYTES {
            out.push((to, service, std::mem::take(batch)));
            *bytes = 0;
        }
        *bytes += state.len() + 12;
        batch.push((entry, state));
    }
    for ((to, service), (batch, _)) in open {
        if !batch.is_empty() {
            out.push((to, service, batch));
        }
    }
    out
}

/// The `k` members following `me` in `members`, wrapping around.
fn witnesses_in(members: &BTreeSet<NodeId>, me: NodeId, k: usize) -> Vec<NodeId> {
    let after = members.range(me + 1..).copied();
    let before = members.range(..me).copied();
    after.chain(before).take(k).collect()
}

fn push_membership(out: &mut Vec<Output>, o: MembershipOutput) {
    for (to, bytes) in o.messages {
        out.push(Output::Send {
            to,
            msg: Msg::Swim(bytes),
        });
    }
}

/// Whether `change` is already reflected by the log (a retried or duplicate proposal).
/// A node that crashes while it leaves still gets its failure agreed (else the change it
/// was leaving in would wait for it forever).
fn is_done(
    change: &Change,
    members: &BTreeSet<NodeId>,
    ever: &BTreeSet<NodeId>,
    failed: &BTreeSet<NodeId>,
) -> bool {
    match change {
        Change::Join { node, .. } => ever.contains(node),
        Change::Leave { node } => !members.contains(node),
        Change::Fail { node } => failed.contains(node) || !ever.contains(node),
    }
}
