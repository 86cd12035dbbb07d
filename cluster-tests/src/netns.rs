//! Several "hosts" on one machine: one network namespace per node, joined by a bridge.
//!
//! Layout of a cluster with id `ID` (`<pid>x<seq>`, unique per process and per cluster):
//!
//! ```text
//!  host netns:  route "unreachable 10.200.X.0/24"  (guard; no address, no bridge here)
//!  krun-tID-br:     br0 ── v0 ── v1 ── ... (bridge side of each veth)
//!  krun-tID-node0:  lo, eth0 10.200.X.1/24   (peer of v0)
//!  krun-tID-node1:  lo, eth0 10.200.X.2/24   (peer of v1)
//! ```
//!
//! Network rule (DESIGN.md): traffic goes only to loopback or to addresses inside namespaces
//! the test created. The node namespaces have no default route, so the kernel refuses any
//! destination outside the /24; the host namespace has no 10.200.X address and gets the
//! `unreachable` route *before* any namespace exists, so a client run on the host by mistake
//! fails locally instead of reaching the default gateway. The route doubles as a lock: two
//! clusters (even in different processes) cannot both add it, so they never share a subnet.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{ClusterError, Result};
use crate::process::{kill_process, registry_lock, NodeProcess, Registry};

/// Prefix of every namespace this harness creates.
pub const NETNS_PREFIX: &str = "krun-t";
/// Where each live cluster leaves a note (its subnet) so a later run can clean up after a
/// test process that was killed before its `Drop` ran.
pub const STATE_DIR: &str = "/run/krun-cluster-tests";

static NEXT_SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails with [`ClusterError::NotRoot`] unless we run as root.
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(ClusterError::NotRoot { euid })
    }
}

/// Runs `ip ARGS...`, returning stdout; a non-zero exit becomes [`ClusterError::CommandFailed`].
pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<String> {
    let cmd = format!("{prog} {}", args.join(" "));
    let out =
        Command::new(prog)
            .args(args)
            .output()
            .map_err(|source| ClusterError::CommandStart {
                cmd: cmd.clone(),
                source,
            })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ClusterError::CommandFailed {
            cmd,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Names of all network namespaces (`ip netns list`, first column).
pub fn list_netns() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect())
}

/// Host routes (main table) that cover `subnet`, other than the default route.
pub fn host_routes_for(subnet: &str) -> Result<Vec<String>> {
    Ok(ip(&["-4", "route", "show", "to", "match", subnet])?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("default"))
        .map(str::to_string)
        .collect())
}

fn netns_pids(ns: &str) -> Vec<u32> {
    ip(&["netns", "pids", ns])
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Kills (SIGKILL, by PID) whatever still runs in `ns`, waits up to 2 s for it to go, then
/// deletes the namespace.
fn kill_and_delete_netns(ns: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let pids = netns_pids(ns);
        if pids.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids {
            let _ = kill_process(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
    ip(&["netns", "del", ns]).map(|_| ())
}

/// Deletes namespaces and guard routes left behind by test processes that died without
/// running `Drop` (their PID, encoded in the name, no longer exists). Returns what it removed.
pub fn reap_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let stale_owner = |id: &str| -> bool {
        id.split('x')
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .is_some_and(|pid| pid != std::process::id() && !pid_alive(pid))
    };
    for ns in list_netns()? {
        let Some(rest) = ns.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some((id, _)) = rest.split_once('-') else {
            continue;
        };
        if stale_owner(id) && kill_and_delete_netns(&ns).is_ok() {
            removed.push(format!("netns {ns}"));
        }
    }
    if let Ok(entries) = fs::read_dir(STATE_DIR) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !stale_owner(&id) {
                continue;
            }
            if let Ok(subnet) = fs::read_to_string(e.path()) {
                let subnet = subnet.trim();
                if !subnet.is_empty() && ip(&["route", "del", "unreachable", subnet]).is_ok() {
                    removed.push(format!("route unreachable {subnet}"));
                }
            }
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(removed)
}

/// One node of a [`NetnsCluster`]: index, namespace name and address.
#[derive(Debug, Clone)]
struct NodeInfo {
    netns: String,
    ip: Ipv4Addr,
    veth: String,
}

/// `n` network namespaces joined by a bridge, with the host-side route guard. See the module
/// docs for the layout. Dropping it kills what it started and removes everything it created.
#[derive(Debug)]
pub struct NetnsCluster {
    id: String,
    subnet: [u8; 3],
    bridge_ns: String,
    bridge_ns_created: bool,
    route_added: bool,
    state_file: Option<PathBuf>,
    nodes: Vec<NodeInfo>,
    registry: Registry,
}

impl NetnsCluster {
    /// Creates `n` nodes (1..=253). `subnet_octets`: the first three octets of the /24 to use
    /// (must be in 10.0.0.0/8 and not routed on the host), or `None` to pick a free
    /// 10.200.x.0/24 derived from the cluster id. Node `i` gets `<subnet>.(i+1)`.
    pub fn create(n: usize, subnet_octets: Option<[u8; 3]>) -> Result<Self> {
        require_root()?;
        if !(1..=253).contains(&n) {
            return Err(ClusterError::InvalidNodeCount { n });
        }
        let _ = reap_stale();
        let pid = std::process::id();
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}x{seq}");
        let mut c = NetnsCluster {
            bridge_ns: format!("{NETNS_PREFIX}{id}-br"),
            id,
            subnet: [0; 3],
            bridge_ns_created: false,
            route_added: false,
            state_file: None,
            nodes: Vec::with_capacity(n),
            registry: Registry::default(),
        };
        // From here on, an error drops `c`, which removes whatever was created so far.
        c.claim_subnet(subnet_octets, pid, seq)?;
        c.build(n)?;
        Ok(c)
    }

    /// The guard route is both the safety net and the lock on the subnet: `ip route add`
    /// fails with "File exists" if another cluster holds it.
    fn claim_subnet(&mut self, wanted: Option<[u8; 3]>, pid: u32, seq: u32) -> Result<()> {
        let candidates: Vec<[u8; 3]> = match wanted {
            Some(o) => {
                if o[0] != 10 {
                    return Err(ClusterError::SubnetUnavailable {
                        subnet: fmt_subnet(o),
                        reason: "test subnets must be inside 10.0.0.0/8".into(),
                    });
                }
                vec![o]
            }
            None => {
                let start = (pid.wrapping_mul(31).wrapping_add(seq.wrapping_mul(7))) % 254;
                (0..254u32)
                    .map(|k| [10, 200, ((start + k) % 254 + 1) as u8])
                    .collect()
            }
        };
        let tried = candidates.len();
        for o in candidates {
            let subnet = fmt_subnet(o);
            let existing = host_routes_for(&subnet)?;
            if !existing.is_empty() {
                if wanted.is_some() {
                    return Err(ClusterError::SubnetUnavailable {
                        subnet,
                        reason: format!("host already routes it: {}", existing.join("; ")),
                    });
                }
                continue;
            }
            match ip(&["route", "add", "unreachable", &subnet]) {
                Ok(_) => {
                    self.route_added = true;
                    self.subnet = o;
                    let _ = fs::create_dir_all(STATE_DIR);
                    let f = Path::new(STATE_DIR).join(&self.id);
                    if fs::write(&f, &subnet).is_ok() {
                        self.state_file = Some(f);
                    }
                    return Ok(());
                }
                Err(e) if wanted.is_some() => {
                    return Err(ClusterError::SubnetUnavailable {
                        subnet,
                        reason: e.to_string(),
                    })
                }
                Err(_) => continue, // lost a race for this subnet: try the next one
            }
        }
        Err(ClusterError::NoFreeSubnet { tried })
    }

    fn build(&mut self, n: usize) -> Result<()> {
        let br = self.bridge_ns.clone();
        ip(&["netns", "add", &br])?;
        self.bridge_ns_created = true;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &br,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{NETNS_PREFIX}{}-node{i}", self.id);
            let veth = format!("v{i}");
            let addr = Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], i as u8 + 1);
            ip(&["netns", "add", &ns])?;
            self.nodes.push(NodeInfo {
                netns: ns.clone(),
                ip: addr,
                veth: veth.clone(),
            });
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &br, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// The cluster id (`<pid>x<seq>`), part of every namespace name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false for a created cluster (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The cluster's subnet, e.g. `10.200.17.0/24`.
    pub fn subnet(&self) -> String {
        fmt_subnet(self.subnet)
    }

    /// Name of the namespace holding the bridge.
    pub fn bridge_netns(&self) -> &str {
        &self.bridge_ns
    }

    /// Every namespace of this cluster (bridge first).
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.bridge_ns.clone())
            .chain(self.nodes.iter().map(|n| n.netns.clone()))
            .collect()
    }

    /// Node `i` (0-based).
    pub fn node(&self, i: usize) -> Result<Node<'_>> {
        if i < self.nodes.len() {
            Ok(Node {
                cluster: self,
                index: i,
            })
        } else {
            Err(ClusterError::NoSuchNode {
                cluster: self.id.clone(),
                index: i,
                len: self.nodes.len(),
            })
        }
    }

    /// All nodes in index order.
    pub fn nodes(&self) -> impl Iterator<Item = Node<'_>> {
        (0..self.nodes.len()).map(move |index| Node {
            cluster: self,
            index,
        })
    }

    /// PIDs started through [`Node::spawn`] that have not been reaped yet.
    pub fn live_pids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = registry_lock(&self.registry).iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Cuts node `i` off the bridge: the bridge side of its veth goes down, so the node's
    /// `eth0` loses carrier and every frame to or from the node is dropped silently (sends
    /// time out; nothing is refused). Address and routes stay; established TCP connections
    /// stall and resume after [`NetnsCluster::restore_link`] if they have not timed out.
    pub fn cut_link(&self, i: usize) -> Result<()> {
        let veth = &self.node(i).map(|n| n.info().veth.clone())?;
        ip(&["-n", &self.bridge_ns, "link", "set", veth, "down"]).map(|_| ())
    }

    /// Reconnects node `i` to the bridge (undoes [`NetnsCluster::cut_link`]).
    pub fn restore_link(&self, i: usize) -> Result<()> {
        let veth = &self.node(i).map(|n| n.info().veth.clone())?;
        ip(&["-n", &self.bridge_ns, "link", "set", veth, "up"]).map(|_| ())
    }

    /// True while node `i`'s link to the bridge is up.
    pub fn link_is_up(&self, i: usize) -> Result<bool> {
        let veth = &self.node(i).map(|n| n.info().veth.clone())?;
        let out = ip(&["-n", &self.bridge_ns, "-o", "link", "show", veth])?;
        Ok(out.contains("state UP") || out.contains(",UP"))
    }
}

impl Drop for NetnsCluster {
    fn drop(&mut self) {
        // 1. Processes we started and did not reap: SIGKILL by PID (the handle reaps later).
        for pid in self.live_pids() {
            let _ = kill_process(pid, libc::SIGKILL);
        }
        // 2. Anything else living in our namespaces descends from those processes: stop it
        //    by PID, then delete the namespaces (the veths and the bridge go with them).
        for n in self.nodes.iter().rev() {
            let _ = kill_and_delete_netns(&n.netns);
        }
        if self.bridge_ns_created {
            let _ = kill_and_delete_netns(&self.bridge_ns);
        }
        // 3. The guard route goes last, once nothing can send into the subnet any more.
        if self.route_added {
            let _ = ip(&["route", "del", "unreachable", &fmt_subnet(self.subnet)]);
        }
        if let Some(f) = &self.state_file {
            let _ = fs::remove_file(f);
        }
    }
}

/// A node of a [`NetnsCluster`], borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct Node<'a> {
    cluster: &'a NetnsCluster,
    index: usize,
}

impl<'a> Node<'a> {
    fn info(&self) -> &'a NodeInfo {
        &self.cluster.nodes[self.index]
    }

    /// The node's index in its cluster.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's address, `<subnet>.(index+1)`.
    pub fn ip(&self) -> Ipv4Addr {
        self.info().ip
    }

    /// The node's network namespace name (usable with `ip -n` / `ip netns exec`).
    pub fn netns(&self) -> &'a str {
        &self.info().netns
    }

    /// The node's namespace file under /run/netns.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(self.netns())
    }

    /// Starts `cmd` inside this node's network namespace (setns in the child between fork
    /// and exec; the mount, UTS and PID namespaces stay the host's, so binaries built on the
    /// host, files and /tmp are shared). The cluster kills it on drop if it still runs.
    pub fn spawn(&self, cmd: &mut Command) -> Result<NodeProcess> {
        let netns = self.netns();
        let path = self.netns_path();
        let f = fs::File::open(&path).map_err(|source| ClusterError::Path {
            what: "opening network namespace",
            path: path.clone(),
            source,
        })?;
        let fd = f.as_raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2),
        // which is async-signal-safe; `fd` stays open in the parent until spawn returns
        // (`f` lives to the end of this function) and is inherited by the child.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            node: self.index,
            netns: netns.to_string(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        drop(f);
        Ok(NodeProcess::new(
            child,
            self.index,
            self.cluster.registry.clone(),
        ))
    }

    /// Runs `f` on a new thread that first moves into this node's network namespace, so
    /// sockets it creates live in the node. The join result carries `f`'s return value.
    pub fn in_thread<T, F>(&self, f: F) -> thread::JoinHandle<Result<T>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let netns = self.netns().to_string();
        let path = self.netns_path();
        thread::spawn(move || {
            let file = fs::File::open(&path).map_err(|source| ClusterError::Path {
                what: "opening network namespace",
                path: path.clone(),
                source,
            })?;
            // SAFETY: setns(2) on a valid fd; CLONE_NEWNET only changes this thread's network
            // namespace, which is allowed in a multithreaded process.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(ClusterError::Setns {
                    netns,
                    source: io::Error::last_os_error(),
                });
            }
            drop(file);
            Ok(f())
        })
    }

    /// Cuts this node's link (see [`NetnsCluster::cut_link`]).
    pub fn cut_link(&self) -> Result<()> {
        self.cluster.cut_link(self.index)
    }

    /// Restores this node's link (see [`NetnsCluster::restore_link`]).
    pub fn restore_link(&self) -> Result<()> {
        self.cluster.restore_link(self.index)
    }
}

fn fmt_subnet(o: [u8; 3]) -> String {
    format!("{}.{}.{}.0/24", o[0], o[1], o[2])
}
