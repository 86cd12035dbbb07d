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
//!   ([`Proposal`](crate::view::Proposal)); at its place in the log it is refused if that node is out of the
//!   configuration by then (a `leave` asked at a cut-off supervisor evicted meanwhile). A
//!   member ignores what a node declared failed asks of it (requests, observations,
//!   proposals, probes) and tells it that it failed.
//! - **Eviction**: a node that learns an agreed change saying it failed stops at once
//!   ([`Node::evicted`]); its driver may come back as a new member
//!   ([`Node::rejoin_config`]).
//! - **Supervisor replacement** (`supervisors.rs`): when the view declares a supervisor
//!   failed, the Raft group's leader removes it and adds a live member (also one demoted
//!   before) by Raft configuration changes, agreed in the log as [`Change::Demote`] and
//!   [`Change::Promote`] (no entry moves: such an epoch ends at once); a group left short
//!   is refilled when a node joins. A supervisor asked to leave hands its vote to a live
//!   member first. The Raft log is compacted behind a snapshot of the agreed changes,
//!   from which a new supervisor catches up.
//!
//! Where each part lives: `agreed.rs` (proposals, Raft's committed changes, the agreed
//! log), `migration.rs` (the four steps and the failure scan), `receive.rs` (what each
//! message does), `requests.rs` (serving, forwarding and delaying requests), `losses.rs`
//! (lost entries, eviction notices), `supervisors.rs` (the Raft group's changes).
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::agreement::{Agreement, AgreementConfig, Ballot};
use crate::error::{AdaptError, Result};
use crate::locator::{CellTreeLocator, LocatorConfig, Scope};
use crate::membership::{Membership, MembershipConfig, MembershipOutput};
use crate::service::{RequestId, Service, ServiceId};
use crate::view::{Change, EntryId, Epoch, NodeId};
use crate::wire::{Msg, Request};

mod agreed;
mod losses;
mod migration;
mod receive;
mod requests;
mod supervisors;

use agreed::{is_done, ViewState};
use migration::batches;
use requests::witnesses_in;

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
    /// The configuration after the whole known log: members, every node ever admitted,
    /// every node the log says failed (a participant in that set is not waited for), and
    /// the supervisors.
    logged: ViewState,
    /// Nodes whose planned leave this node saw through (step 4 of the leave's change, with
    /// the leaver's `Sent` in: it went through its send out): their copies reached the
    /// members that stay, whatever the log says of them later (a leaver that stopped can
    /// still be declared failed by a detector that saw it go silent). A leaver that failed
    /// before its send out, and was not waited for, is not in it.
    handed_over: BTreeSet<NodeId>,
    /// Supervisors: the configuration after the changes this node's Raft member reported
    /// (`raft_epoch` of them), against which each committed change is judged; the known log
    /// may be ahead of it (changes learned from other supervisors first).
    raft_view: ViewState,
    raft_epoch: Epoch,
    /// The leader: the tick of its last change of the Raft group.
    regrouped_at: Option<u64>,
    /// Supervisors: when each node last sent its status (a candidate to replace a failed
    /// supervisor must have).
    status_at: BTreeMap<NodeId, u64>,
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
    /// The term and vote of this node's last Raft member, once it left the group (a member
    /// promoted again starts from it).
    ballot: Ballot,
    /// Supervisors: supervisors asked to leave, with the node that asked. The leader hands
    /// each one's vote to a live member first (promote the replacement, demote the leaver);
    /// its leave is agreed once it is no longer a supervisor.
    handing_over: BTreeMap<NodeId, NodeId>,
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
    /// The Raft leader this supervisor knew at its last tick: when it changes, the changes
    /// still waiting are proposed again at once (a proposal made while the old leader was
    /// dying was lost with it).
    leader_seen: Option<NodeId>,
    /// Per service, the buckets whose entries were lost (a manager and every witness of
    /// it failed together): a request for an entry there that no node holds is answered
    /// by [`Service::lost`], never served as a new, empty entry.
    lost: Vec<BTreeSet<usize>>,
    /// Per service, the buckets marked here from other members' [`Msg::Lost`] while a
    /// change was under way: forgotten again at the end of each change (see `losses.rs`).
    adopted: Vec<BTreeSet<usize>>,
    /// The tick at which each agreed change was learned here (`learned_at[i]`: epoch i+1);
    /// `None` for the changes a joiner replays from before its own join (which it stamps).
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
        let view = ViewState::genesis(&genesis, &cfg.supervisors);
        Ok(Node {
            cfg,
            services,
            scopes,
            now: 0,
            log: Vec::new(),
            early_log: BTreeMap::new(),
            logged: view.clone(),
            handed_over: BTreeSet::new(),
            raft_view: view,
            raft_epoch: 0,
            regrouped_at: None,
            status_at: BTreeMap::new(),
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
            ballot: Ballot::default(),
            handing_over: BTreeMap::new(),
            proposals,
            next_supervisor: 0,
            confirming: BTreeMap::new(),
            answered_at: BTreeMap::new(),
            closed: BTreeSet::new(),
            leader_seen: None,
            adopted: lost.clone(),
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
    /// The supervisors after the known log: the members of the Raft group that agrees on
    /// changes (the initial ones, as replaced since: [`Change::Promote`], [`Change::Demote`]).
    pub fn supervisors(&self) -> Vec<NodeId> {
        self.logged.supervisors.iter().copied().collect()
    }

    /// Whether this node is a member of the Raft group now.
    pub fn is_supervisor(&self) -> bool {
        self.agreement.is_some()
    }

    /// This node's Raft member's log: entries held, and the index of the last compacted
    /// one (supervisors only).
    pub fn raft_log_size(&self) -> Option<(usize, u64)> {
        self.agreement.as_ref().map(|a| a.log_size())
    }

    /// The Raft leader this node knows of (supervisors only).
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
            || !self.logged.members.contains(&node)
            || self.logged.failed.contains(&node)
        {
            return;
        }
        if self.closed.insert(node) {
            self.note(format!(
                "node {node} closed its links and refuses connections: proposing its failure"
            ));
        }
        let change = Change::Fail { node };
        self.campaign_if_leader_closed(node);
        if self.agreement.is_some() {
            // A supervisor proposes it at once, even when it was already waiting for it.
            self.proposals.insert(change.clone(), self.now);
            self.supervise(change, self.cfg.me);
        } else {
            self.proposals.remove(&change);
            self.want(change);
        }
    }

    /// Asks for `node` to leave (a planned eviction: it hands its entries over, then
    /// stops). A supervisor first hands its vote to a live member (see `supervisors.rs`);
    /// refused, with the reason, for the last member, and for a supervisor whose leave
    /// would leave the Raft group without a majority of live voters.
    pub fn request_leave(&mut self, node: NodeId) -> Result<()> {
        if !self.logged.members.contains(&node) {
            return Err(AdaptError::UnknownNode(node));
        }
        if self.logged.members.len() == 1 {
            return Err(AdaptError::ChangeRefused(format!(
                "node {node} is the last member"
            )));
        }
        if self.logged.supervisors.contains(&node) {
            self.check_handover(node)?;
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
        self.regroup();
        if self.now.is_multiple_of(self.cfg.status_ticks.max(1)) {
            let status = Msg::Status {
                epoch: self.known_epoch(),
                done: self.epoch,
            };
            let supervisors: Vec<NodeId> = self
                .contacts()
                .into_iter()
                .filter(|s| *s != self.cfg.me && !self.logged.failed.contains(s))
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

    pub(super) fn note(&mut self, line: String) {
        self.out.push(Output::Log(line));
    }

    pub(super) fn send(&mut self, to: NodeId, msg: Msg) {
        self.out.push(Output::Send { to, msg });
    }

    pub(super) fn stop(&mut self, reason: String) {
        self.stopped = true;
        self.migration = None;
        self.out.push(Output::Stopped { reason });
    }
}

fn push_membership(out: &mut Vec<Output>, o: MembershipOutput) {
    for (to, bytes) in o.messages {
        out.push(Output::Send {
            to,
            msg: Msg::Swim(bytes),
        });
    }
}
