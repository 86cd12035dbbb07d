//! Integration tests of the network-namespace cluster. They need root (CI runs as root) and
//! fail loudly otherwise. Every network loop is bounded in count and time.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cluster_tests::{host_routes_for, kill_process, list_netns, NetnsCluster, NodeProcess};

const PROBE: &str = env!("CARGO_BIN_EXE_krun-netns-probe");

fn cluster(n: usize) -> NetnsCluster {
    if let Err(e) = cluster_tests::require_root() {
        panic!("\n\n*** {e} ***\n\n");
    }
    NetnsCluster::create(n, None).expect("creating the namespace cluster")
}

/// Starts the echo server in `node` and waits for its "listening" line.
fn start_server(c: &NetnsCluster, node: usize, port: u16, conns: u32) -> (NodeProcess, SocketAddr) {
    let n = c.node(node).unwrap();
    let addr = SocketAddr::from((n.ip(), port));
    let mut p = n
        .spawn(
            Command::new(PROBE)
                .args(["serve", &addr.to_string(), &conns.to_string(), "60"])
                .stdout(Stdio::piped()),
        )
        .expect("spawning the probe server");
    let mut line = String::new();
    BufReader::new(p.stdout().unwrap())
        .read_line(&mut line)
        .expect("reading the server's first line");
    assert_eq!(
        line.trim(),
        format!("listening {addr}"),
        "server did not start"
    );
    (p, addr)
}

fn echo(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    writeln!(s, "{msg}")?;
    let mut buf = [0u8; 256];
    let mut got = Vec::new();
    while !got.ends_with(b"\n") {
        let k = s.read(&mut buf)?;
        if k == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..k]);
    }
    Ok(String::from_utf8_lossy(&got).trim_end().to_string())
}

#[test]
fn two_nodes_talk_over_tcp() {
    let c = cluster(3);
    assert_eq!(c.len(), 3);
    let sub = c.subnet();
    let prefix = sub.trim_end_matches("0/24");
    assert!(sub.starts_with("10.200."), "{sub}");
    for n in c.nodes() {
        assert_eq!(n.ip().to_string(), format!("{prefix}{}", n.index() + 1));
    }
    let (mut server, addr) = start_server(&c, 0, 47100, 1);
    let mut client = c
        .node(1)
        .unwrap()
        .spawn(
            Command::new(PROBE)
                .args(["connect", &addr.to_string(), "hello", "50", "1000"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let st = client
        .wait_timeout(Duration::from_secs(30))
        .unwrap()
        .expect("client still running after 30 s");
    let mut out = String::new();
    client.stdout().unwrap().read_to_string(&mut out).unwrap();
    assert!(st.success(), "client failed: {st} {out}");
    // The server saw node 1's address: the packets crossed the bridge between namespaces.
    assert_eq!(
        out.trim(),
        format!("echo hello from {}", c.node(1).unwrap().ip())
    );
    let st = server.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(st.is_some_and(|s| s.success()), "server: {st:?}");
}

#[test]
fn cut_link_times_out_and_restore_heals() {
    let c = cluster(2);
    let (_server, addr) = start_server(&c, 0, 47101, 20);
    let c1 = &c;
    let res = c
        .node(1)
        .unwrap()
        .in_thread(move || -> Result<(), String> {
            let t = Duration::from_millis(700);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .map_err(|e| format!("first connect: {e}"))?;
            s.set_read_timeout(Some(t)).unwrap();
            let r = echo(&mut s, "before").map_err(|e| format!("echo before: {e}"))?;
            if !r.starts_with("echo before") {
                return Err(format!("bad reply {r}"));
            }
            Ok(())
        })
        .join()
        .unwrap()
        .unwrap();
    res.unwrap();

    c1.cut_link(1).unwrap();
    assert!(!c1.link_is_up(1).unwrap());
    let cut = c
        .node(1)
        .unwrap()
        .in_thread(move || {
            let started = Instant::now();
            let r = TcpStream::connect_timeout(&addr, Duration::from_millis(1500));
            (r.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
        })
        .join()
        .unwrap()
        .unwrap();
    match cut {
        (Ok(()), _) => panic!("connected across a cut link"),
        (Err(kind), took) => {
            // Frames are dropped silently: the connect times out (or ARP fails: host
            // unreachable), it is never refused.
            assert_ne!(kind, ErrorKind::ConnectionRefused, "after {took:?}");
        }
    }
    // The other direction is cut too: node 0 cannot reach node 1.
    let ip1 = c.node(1).unwrap().ip();
    let back = c
        .node(0)
        .unwrap()
        .in_thread(move || {
            TcpStream::connect_timeout(&SocketAddr::from((ip1, 9)), Duration::from_millis(800))
                .map_err(|e| e.kind())
                .map(|_| ())
        })
        .join()
        .unwrap()
        .unwrap();
    assert!(back.is_err_and(|k| k != ErrorKind::ConnectionRefused));

    c1.restore_link(1).unwrap();
    assert!(c1.link_is_up(1).unwrap());
    let healed = c
        .node(1)
        .unwrap()
        .in_thread(move || -> Result<String, String> {
            let mut last = String::new();
            for _ in 0..50 {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                    Ok(mut s) => {
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        return echo(&mut s, "after").map_err(|e| e.to_string());
                    }
                    Err(e) => last = e.to_string(),
                }
                thread::sleep(Duration::from_millis(100));
            }
            Err(format!("no connection after restore: {last}"))
        })
        .join()
        .unwrap()
        .unwrap();
    assert!(healed.unwrap().starts_with("echo after"));
}

#[test]
fn established_connection_stalls_while_cut() {
    let c = cluster(2);
    let (_server, addr) = start_server(&c, 0, 47102, 1);
    // Connect first, then cut: the request is not answered while the link is down.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx2, rx2) = std::sync::mpsc::channel::<std::io::Result<String>>();
    let (connected_tx, connected_rx) = std::sync::mpsc::channel::<()>();
    let h = c.node(1).unwrap().in_thread(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        connected_tx.send(()).unwrap();
        rx.recv_timeout(Duration::from_secs(10)).unwrap(); // link is cut now
        tx2.send(echo(&mut s, "stalled")).unwrap();
    });
    // The cut must come after the connection is established (the CI once cut
    // the link while connect was still resolving the server: EHOSTUNREACH).
    connected_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("node 1 never connected to the server");
    c.cut_link(1).unwrap();
    tx.send(()).unwrap();
    let r = rx2.recv_timeout(Duration::from_secs(10)).unwrap();
    let e = r.expect_err("got a reply across a cut link");
    assert!(
        matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{e}"
    );
    h.join().unwrap().unwrap();
    c.restore_link(1).unwrap();
}

#[test]
fn drop_removes_everything_and_kills_processes() {
    let c = cluster(2);
    let names = c.namespaces();
    let subnet = c.subnet();
    let mut sleeper = c
        .node(1)
        .unwrap()
        .spawn(Command::new("sleep").arg("30"))
        .unwrap();
    // A grandchild we never saw: the namespace sweep on drop must stop it too.
    let mut sh = c
        .node(0)
        .unwrap()
        .spawn(
            Command::new("sh")
                .args(["-c", "sleep 31 & echo $!; wait"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut line = String::new();
    BufReader::new(sh.stdout().unwrap())
        .read_line(&mut line)
        .unwrap();
    let grandchild: u32 = line.trim().parse().unwrap();
    assert!(c.live_pids().contains(&sleeper.pid()));
    let all = list_netns().unwrap();
    for n in &names {
        assert!(all.contains(n), "{n} missing while the cluster lives");
    }
    drop(c);

    let st = sleeper
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("sleeper survived the cluster");
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(sh.wait_timeout(Duration::from_secs(5)).unwrap().is_some());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&format!("/proc/{grandchild}")).exists() {
        // A zombie of init would still show up; check its state instead.
        let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
        if stat.contains(") Z ") || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "grandchild {grandchild} still alive: {stat}"
    );
    let all = list_netns().unwrap();
    for n in &names {
        assert!(!all.contains(n), "{n} left behind");
    }
    assert!(
        host_routes_for(&subnet).unwrap().is_empty(),
        "route for {subnet} left behind"
    );
}

#[test]
fn route_guard_present_while_cluster_lives() {
    let c = cluster(2);
    let subnet = c.subnet();
    let routes = host_routes_for(&subnet).unwrap();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert!(routes[0].starts_with("unreachable "), "{routes:?}");
    // The host cannot reach a node (the kernel refuses locally, nothing goes to the gateway).
    let ip0 = c.node(0).unwrap().ip().to_string();
    let out = Command::new("ip")
        .args(["route", "get", &ip0])
        .output()
        .unwrap();
    assert!(!out.status.success(), "host routes {ip0}: {out:?}");
    // The host has no address in the subnet and the bridge is not in the host namespace.
    let addrs = Command::new("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(!addrs.contains(&format!(" {}", ip0.rsplit_once('.').unwrap().0)));
    // Nodes have no default route: anything outside the /24 is refused inside them.
    for n in c.nodes() {
        let out = Command::new("ip")
            .args(["-n", n.netns(), "route", "get", "192.0.2.1"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{} has a way out: {out:?}",
            n.netns()
        );
    }
    // And a connect from the host to a node fails at once, locally.
    let r = TcpStream::connect_timeout(
        &SocketAddr::from((c.node(0).unwrap().ip(), 47103)),
        Duration::from_millis(500),
    );
    assert!(r.is_err());
}

#[test]
fn parallel_clusters_get_distinct_subnets_and_names() {
    let a = thread::spawn(|| cluster(2));
    let b = thread::spawn(|| cluster(2));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_ne!(a.subnet(), b.subnet());
    assert_ne!(a.id(), b.id());
    for n in a.namespaces() {
        assert!(n.starts_with(&format!("krun-t{}", a.id())));
        assert!(!b.namespaces().contains(&n));
    }
}

#[test]
fn kill_process_by_pid() {
    let c = cluster(1);
    let mut p = c
        .node(0)
        .unwrap()
        .spawn(Command::new("sleep").arg("30"))
        .unwrap();
    kill_process(p.pid(), libc::SIGKILL).unwrap();
    let st = p.wait_timeout(Duration::from_secs(5)).unwrap().unwrap();
    assert_eq!(st.signal(), Some(libc::SIGKILL));
    assert!(c.live_pids().is_empty());
    assert!(
        kill_process(0, libc::SIGKILL).is_err(),
        "pid 0 must be refused"
    );
}

#[test]
fn node_sees_only_its_own_namespace() {
    let c = cluster(2);
    let mut p = c
        .node(1)
        .unwrap()
        .spawn(
            Command::new("ip")
                .args(["-4", "-o", "addr", "show", "dev", "eth0"])
                .stdout(Stdio::piped()),
        )
        .unwrap();
    let mut out = String::new();
    p.stdout().unwrap().read_to_string(&mut out).unwrap();
    assert!(p.wait().unwrap().success());
    assert!(
        out.contains(&format!("inet {}/24", c.node(1).unwrap().ip())),
        "{out}"
    );
    assert!(c.node(2).is_err());
    assert!(NetnsCluster::create(0, None).is_err());
}

#[test]
fn reap_stale_cleans_up_after_a_killed_test_process() {
    cluster_tests::require_root().unwrap_or_else(|e| panic!("\n\n*** {e} ***\n\n"));
    let mut holder = Command::new(PROBE)
        .args(["hold-cluster", "2", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut subnet = String::new();
    let mut names = Vec::new();
    let mut ready = false;
    for line in BufReader::new(holder.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(s) = line.strip_prefix("subnet ") {
            subnet = s.to_string();
        } else if let Some(n) = line.strip_prefix("netns ") {
            names.push(n.to_string());
        } else if line == "ready" {
            ready = true;
            break;
        }
    }
    assert!(
        ready && names.len() == 3,
        "holder did not come up: {names:?}"
    );
    // SIGKILL: its Drop never runs, so namespaces and the guard route stay behind.
    kill_process(holder.id(), libc::SIGKILL).unwrap();
    holder.wait().unwrap();
    assert!(
        !host_routes_for(&subnet).unwrap().is_empty() || {
            // another test's create() may already have reaped it
            !list_netns().unwrap().contains(&names[0])
        }
    );
    cluster_tests::reap_stale().unwrap();
    let all = list_netns().unwrap();
    for n in &names {
        assert!(!all.contains(n), "stale {n} not reaped");
    }
    assert!(
        host_routes_for(&subnet).unwrap().is_empty(),
        "stale route {subnet}"
    );
}
