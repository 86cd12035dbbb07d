//! What `krun status` shows: one node's answer (its agreed view and the process table's rows)
//! and the job around it.
use adaptation::NodeId;
use serde::{Deserialize, Serialize};

use super::table::RankRecord;

/// One agreed change of the membership.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeInfo {
    /// The epoch this change leads to.
    pub epoch: u64,
    /// "join", "leave" or "fail".
    pub kind: String,
    pub node: NodeId,
}

/// Store use at one level on the node that answered (filled by the checkpoint store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelUse {
    pub level: u8,
    pub bytes: u64,
}

/// The newest checkpoint version safe at one level, over all ranks (filled by the store).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SafeCheckpoint {
    pub level: u8,
    pub version: u64,
}

/// A node's answer to [`super::control::ControlRequest::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node that answered.
    pub node: NodeId,
    pub pid: u32,
    pub host: String,
    pub epoch: u64,
    pub stable: bool,
    pub members: Vec<NodeId>,
    pub cells: Vec<Vec<NodeId>>,
    pub supervisors: Vec<NodeId>,
    pub changes: Vec<ChangeInfo>,
    /// The process table's row of every rank of the job that answered.
    pub ranks: Vec<RankRecord>,
    /// Ranks whose row did not answer in time (or has none yet).
    pub unanswered: Vec<u64>,
    /// Store use per level (empty until the store fills it).
    pub store: Vec<LevelUse>,
    /// Newest checkpoint safe per level (empty until the store fills it).
    pub newest_safe: Vec<SafeCheckpoint>,
    /// The answering node's ranks use MPI: its MPI servers saw a rank initialise (PMI-1
    /// `init` or a PMIx client), `runtime/mpi_recovery.rs`.
    #[serde(default)]
    pub mpi: bool,
    /// The answering node's ranks that said hello through the rank library (the policy can
    /// checkpoint them).
    #[serde(default)]
    pub linked: Vec<u64>,
}

/// `krun status --json`: the job and the answer of the first node that gave one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: String,
    pub mode: String,
    /// Nodes the job started or added, with the addresses they registered.
    pub nodes: Vec<super::control::NodeAddresses>,
    /// Nodes that did not answer (with why), before one did.
    pub unreachable: Vec<(NodeId, String)>,
    pub status: NodeStatus,
}

impl JobStatus {
    /// The human-readable form.
    pub fn render(&self) -> String {
        let s = &self.status;
        let list = |v: &[NodeId]| {
            v.iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        let mut out = format!(
            "job {} ({}), answered by node {} ({})\nepoch {}{}: members {}; supervisors {}\ncells: {}\n",
            self.job,
            self.mode,
            s.node,
            s.host,
            s.epoch,
            if s.stable { "" } else { " (changing)" },
            list(&s.members),
            list(&s.supervisors),
            s.cells
                .iter()
                .map(|c| list(c))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        for c in &s.changes {
            out += &format!("epoch {}: {} node {}\n", c.epoch, c.kind, c.node);
        }
        for (n, why) in &self.unreachable {
            out += &format!("node {n}: unreachable ({why})\n");
        }
        out += "rank  node  pid      state        incarnation  checkpoint\n";
        for r in &s.ranks {
            let ck = match &r.checkpoint {
                Some(c) => format!(
                    "v{} safe at L{}",
                    c.version,
                    c.safe_levels
                        .iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join(",L")
                ),
                None => "-".into(),
            };
            out += &format!(
                "{:<5} {:<5} {:<8} {:<12} {:<12} {ck}\n",
                r.rank,
                r.node,
                r.pid,
                r.state.to_string(),
                r.incarnation
            );
            if let Some(d) = &r.decision {
                out += &format!("      rank {} {d}\n", r.rank);
            }
        }
        if !s.unanswered.is_empty() {
            out += &format!("no row for rank(s) {:?}\n", s.unanswered);
        }
        for l in &s.store {
            out += &format!("store L{}: {} bytes\n", l.level, l.bytes);
        }
        for c in &s.newest_safe {
            out += &format!("newest safe at L{}: v{}\n", c.level, c.version);
        }
        out.trim_end().to_string()
    }
}

/// `krun status`: the running job's status, from the first of its nodes that answers (the
/// Unix socket when the node is on this host, else TCP).
pub fn query(job: Option<&str>, timeout: std::time::Duration) -> crate::error::Result<JobStatus> {
    use super::control::{call, ControlReply, ControlRequest, ControlTarget};
    let found = super::jobdir::find(job)?;
    if found.info.nodes.is_empty() {
        return Err(crate::LauncherError::Usage(format!(
            "job {}: no node has registered yet (it is starting)",
            found.info.id
        )));
    }
    let mut unreachable = Vec::new();
    for n in &found.info.nodes {
        let mut targets = Vec::new();
        if std::path::Path::new(&n.control_unix).exists() {
            targets.push(ControlTarget::Unix(n.control_unix.clone()));
        }
        targets.push(ControlTarget::Tcp(n.control_tcp.clone()));
        let mut why = String::new();
        for t in targets {
            match call::<_, ControlReply>(&t, &found.secret, &ControlRequest::Status, timeout) {
                Ok(ControlReply::Status(status)) => {
                    return Ok(JobStatus {
                        job: found.info.id.clone(),
                        mode: found.info.mode.clone(),
                        nodes: found.info.nodes.clone(),
                        unreachable,
                        status: *status,
                    })
                }
                Ok(ControlReply::Refused(e)) => why = e,
                Ok(other) => why = format!("unexpected answer {other:?}"),
                Err(e) => why = e.to_string(),
            }
        }
        unreachable.push((n.node, why));
    }
    Err(crate::LauncherError::Usage(format!(
        "job {}: no node answered ({})",
        found.info.id,
        unreachable
            .iter()
            .map(|(n, w)| format!("node {n}: {w}"))
            .collect::<Vec<_>>()
            .join("; ")
    )))
}

/// `krun fetch`: reads `version` of `rank` back from the checkpoint store through node
/// `node` (or the first node that answers), as a restart would.
pub fn fetch(
    job: Option<&str>,
    node: Option<NodeId>,
    rank: u32,
    version: u64,
    timeout: std::time::Duration,
) -> crate::error::Result<super::control::FetchInfo> {
    use super::control::{call, ControlReply, ControlRequest, ControlTarget};
    let found = super::jobdir::find(job)?;
    let mut why = Vec::new();
    for n in found
        .info
        .nodes
        .iter()
        .filter(|n| node.is_none_or(|want| n.node == want))
    {
        let t = if std::path::Path::new(&n.control_unix).exists() {
            ControlTarget::Unix(n.control_unix.clone())
        } else {
            ControlTarget::Tcp(n.control_tcp.clone())
        };
        let req = ControlRequest::Fetch { rank, version };
        match call::<_, ControlReply>(&t, &found.secret, &req, timeout) {
            Ok(ControlReply::Fetched(f)) => return Ok(f),
            Ok(ControlReply::Refused(e)) => why.push(format!("node {}: {e}", n.node)),
            Ok(other) => why.push(format!("node {}: unexpected answer {other:?}", n.node)),
            Err(e) => why.push(format!("node {}: {e}", n.node)),
        }
    }
    if why.is_empty() {
        why.push(match node {
            Some(n) => format!("node {n} is not a node of the job"),
            None => "no node has registered yet".into(),
        });
    }
    Err(crate::LauncherError::Usage(format!(
        "job {}: rank {rank} v{version} could not be fetched ({})",
        found.info.id,
        why.join("; ")
    )))
}

/// `krun node add|drain`: a request to the running `krun` of the job.
pub fn ask_launcher(
    job: Option<&str>,
    req: &super::control::LauncherRequest,
) -> crate::error::Result<super::control::LauncherReply> {
    use super::control::{call, ControlTarget};
    let found = super::jobdir::find(job)?;
    let socket = found.path.join("krun.sock");
    call(
        &ControlTarget::Unix(socket.to_string_lossy().into_owned()),
        &found.secret,
        req,
        std::time::Duration::from_secs(120),
    )
}
