//! Real processes: 8 `krun-adapt` daemons on loopback with the toy key-value service.
//! While clients keep issuing requests, 2 nodes join, 1 is evicted and 1 is SIGKILLed;
//! afterwards every key reads back its last written value. A node with the wrong secret
//! never gets in; garbage, forged, replayed, truncated and oversized frames on a daemon's port
//! are logged and survived.
//!
//! Every daemon is killed by PID and reaped when its guard drops, also when a test fails.
use adaptation::wire::Msg;
use cluster_tests::kv::{spawn_daemon, Clients, KvCluster, KvSpec, TEST_SECRET as SECRET, WAIT};
use cluster_tests::ClusterError;
use std::io::Write;
use std::time::{Duration, Instant};

type Result<T = ()> = std::result::Result<T, ClusterError>;

fn spec() -> KvSpec {
    KvSpec::new(env!("CARGO_BIN_EXE_krun-adapt").into())
}

/// `n` daemons with the default spec.
fn start(n: u32) -> Result<KvCluster> {
    let c = KvCluster::start(&spec(), n)?;
    println!("{n} daemons ready");
    Ok(c)
}

/// How [`remove_in_turn`] takes a node out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Removal {
    /// SIGKILL by PID.
    Kill,
    /// `leave NODE` asked at another live daemon (which must answer `ok leave NODE`).
    Leave,
}

/// The supervisor group a set of `members` heals to: as many as configured (3), fewer and
/// odd with fewer members, all of them members.
fn healed_group(group: &[u32], members: &[u32]) -> bool {
    let want = match members.len().min(3) {
        n if n % 2 == 0 => n - 1,
        n => n,
    };
    group.len() == want && group.iter().all(|s| members.contains(s))
}

/// Takes `count` nodes out one after another while the clients keep issuing adds: each
/// time `pick` chooses the node among the `members` left, `how` takes it out, and every
/// live daemon must end stable with the members left and a healed supervisor group.
/// Returns the group after each removal.
fn remove_in_turn(
    cluster: &mut KvCluster,
    clients: &mut Clients,
    members: &mut Vec<u32>,
    count: usize,
    how: Removal,
    pick: impl Fn(&KvCluster, &[u32]) -> u32,
) -> Result<Vec<Vec<u32>>> {
    let mut groups = Vec::new();
    for _ in 0..count {
        clients.run_for(cluster, Duration::from_millis(500))?;
        let victim = pick(cluster, members);
        assert!(members.contains(&victim), "node {victim} is not a member");
        members.retain(|&m| m != victim);
        match how {
            Removal::Kill => cluster.kill_and_remove(&[victim])?,
            Removal::Leave => {
                let via = members[0];
                cluster.send(via, &format!("leave {victim}"))?;
                let reply = format!("ok leave {victim}");
                clients.run_until(cluster, &format!("node {via}'s reply"), |c| {
                    let seen = c.daemons[&via].seen();
                    assert!(
                        seen.replies.iter().all(|r| !r.starts_with("err")),
                        "node {via}: {:?}",
                        seen.replies
                    );
                    seen.replies.contains(&reply)
                })?;
            }
        }
        let members_now = members.clone();
        let took = clients.run_until(
            cluster,
            &format!("a healed group without node {victim}"),
            |c| {
                c.daemons.values().filter(|d| d.alive()).all(|d| {
                    let s = d.seen();
                    s.members == members_now && healed_group(&s.supervisors, &members_now)
                }) && (how == Removal::Kill || !c.daemons[&victim].alive())
            },
        )?;
        let group = cluster.group();
        println!("node {victim} out: group {group:?} after {took:.2} s");
        groups.push(group);
    }
    Ok(groups)
}

#[test]
fn eight_daemons_survive_joins_an_eviction_and_a_kill_under_load() -> Result {
    let mut cluster = start(8)?;
    let mut clients = Clients::new();
    clients.run_for(&cluster, Duration::from_secs(1))?;

    // Two nodes join.
    for id in [8u32, 9] {
        cluster.join(id)?;
    }
    let all: Vec<u32> = (0..10).collect();
    let took = clients.run_until(&cluster, "the joins", |c| c.settled(2, &all))?;
    println!("2 joins settled in {took:.2} s");

    // A planned eviction.
    cluster.send(0, "leave 5")?;
    let without5: Vec<u32> = all.iter().copied().filter(|&n| n != 5).collect();
    let took = clients.run_until(&cluster, "the eviction", |c| {
        c.settled(3, &without5) && c.daemons[&5].seen().stopped
    })?;
    println!("eviction settled in {took:.2} s");

    // A crash.
    cluster.kill(&[6])?;
    let survivors: Vec<u32> = without5.iter().copied().filter(|&n| n != 6).collect();
    let took = clients.run_until(&cluster, "the failure's repair", |c| {
        c.settled(4, &survivors)
    })?;
    println!("SIGKILL repaired in {took:.2} s");
    clients.run_for(&cluster, Duration::from_secs(1))?;

    // Every request gets its answer, and every key holds its last written value.
    clients.check_sums(&cluster, &survivors)?;
    assert!(clients.answered > 50, "only {} answers", clients.answered);
    println!(
        "{} answers checked, {} keys read back",
        clients.answered,
        clients.sums.len()
    );
    Ok(())
}

#[test]
fn a_node_without_the_secret_stays_out_and_garbage_is_survived() -> Result {
    use fabric::secret::ClusterSecret;
    use fabric::wire::Session;
    use std::net::TcpStream;

    let cluster = start(3)?;
    let node0 = cluster.daemon(0)?;
    // Garbage instead of a handshake on node 0's port.
    {
        let mut s = TcpStream::connect(&node0.addr).unwrap();
        s.write_all(
            b"GET / HTTP/1.0\r\n\r\nxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        )
        .unwrap();
    }
    cluster.wait("the garbage logged", WAIT, |c| {
        c.daemons[&0].stderr().contains("KRW1 magic")
    })?;
    // A node with another secret is refused in the handshake, and told why.
    let wrong = "00112233445566778899aabbccddeeff00112233";
    let intruder = spawn_daemon(
        &KvSpec {
            secret: wrong.into(),
            ..spec()
        },
        20,
        &cluster.addrs,
        true,
    )?;
    cluster.wait("the intruder refused", WAIT, |c| {
        c.daemons
            .values()
            .any(|d| d.stderr().contains("failed authentication"))
            && intruder.stderr().contains("wrong cluster secret")
    })?;
    // 8 connections announce 64 MiB frames before authenticating and stall: the daemon
    // holds a fixed-size handshake for each, nothing more.
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    };
    let before = rss(node0.pid());
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut s = TcpStream::connect(&node0.addr).unwrap();
            let mut header = b"KRA1\x01\x00\x00\x00\x00".to_vec();
            header.extend_from_slice(&(64u32 << 20).to_le_bytes());
            s.write_all(&header).unwrap();
            s
        })
        .collect();
    // Frames from a holder of the secret that are forged, replayed, cut or too long.
    let secret = ClusterSecret::from_hex(SECRET).unwrap();
    let link = || {
        let mut s = TcpStream::connect(&node0.addr).unwrap();
        let mut session = Session::client(&mut s, &secret, adaptation::wire::PROTOCOL).unwrap();
        session
            .tx
            .send(&mut s, &adaptation::wire::LinkHello { node: 77 })
            .unwrap();
        (s, session)
    };
    let (mut s, mut session) = link();
    let mut f = session.tx.seal(&Msg::Ping { nonce: 1 }).unwrap();
    let last = f.len() - 1;
    f[last] ^= 1;
    s.write_all(&f).unwrap();
    let (mut s, mut session) = link();
    let f = session.tx.seal(&Msg::Ping { nonce: 2 }).unwrap();
    s.write_all(&f).unwrap();
    s.write_all(&f).unwrap();
    let (mut s, mut session) = link();
    let f = session.tx.seal(&Msg::Ping { nonce: 3 }).unwrap();
    s.write_all(&f[..f.len() / 2]).unwrap();
    drop(s);
    let (mut s, mut session) = link();
    let mut f = session.tx.seal(&Msg::Ping { nonce: 4 }).unwrap();
    f[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    s.write_all(&f[..28]).unwrap();
    for (what, line) in [
        ("a bad tag", "failed authentication"),
        ("a replayed frame", "replayed or out of order"),
        ("a truncated frame", "truncated frame"),
        ("a huge length", "exceeds the limit"),
    ] {
        cluster.wait(&format!("{what} refused by name"), WAIT, |c| {
            c.daemons[&0]
                .stderr()
                .lines()
                .any(|l| l.contains("from node 77") && l.contains(line))
        })?;
    }
    let grown = rss(node0.pid()).saturating_sub(before);
    println!("8 stalled 64 MiB headers: krun-adapt resident memory grew by {grown} KiB");
    assert!(grown < 32 * 1024, "the daemon grew by {grown} KiB");
    drop(stalled);
    // The cluster still works and never admitted the intruder.
    cluster.send(0, "req 1 1 42 add 5")?;
    cluster.wait("an answer after the garbage", WAIT, |c| {
        c.daemons[&0]
            .seen()
            .answers
            .get(&(1, 1))
            .is_some_and(|l| l.contains(" ok ") && l.ends_with(" 5"))
    })?;
    std::thread::sleep(Duration::from_secs(1));
    for d in cluster.daemons.values() {
        assert_eq!(
            d.seen().stable,
            0,
            "a change happened:\n{}",
            cluster.describe()
        );
        assert!(d.alive());
    }
    drop(intruder);
    Ok(())
}

#[test]
fn a_killed_daemon_whose_links_close_and_port_refuses_is_failed_without_waiting_for_the_detector(
) -> Result {
    // A detector tolerance of 10 minutes: only the closed links (and the refused connection
    // that confirms them) can get the killed node's failure agreed before the test's bound.
    let mut cluster = KvCluster::start(
        &KvSpec {
            failure_timeout_ms: 600_000,
            ..spec()
        },
        4,
    )?;
    let victim = 2u32;
    // Requests through the victim for keys the others manage: it has used links to them.
    for seq in 1..=8u64 {
        cluster.send(victim, &format!("req 9 {seq} {seq} add 1"))?;
    }
    cluster.wait("the victim's requests answered", WAIT, |c| {
        let seen = c.daemons[&victim].seen();
        (1..=8u64).all(|seq| seen.answers.contains_key(&(9, seq)))
    })?;
    cluster.kill_and_remove(&[victim])?;
    cluster.wait("the killed node's failure agreed", WAIT, |c| {
        c.members_are(&[0, 1, 3])
    })?;
    let said: Vec<u32> = cluster
        .daemons
        .values()
        .filter(|d| {
            d.stderr()
                .contains("node 2 closed its links and refuses connections")
        })
        .map(|d| d.id)
        .collect();
    assert!(!said.is_empty(), "{}", cluster.describe());
    // The detector never got to it: nobody declared it down by silence.
    for d in cluster.daemons.values() {
        let err = d.stderr();
        assert!(
            !err.contains("did not answer a direct ping"),
            "node {}: {err}",
            d.id
        );
    }
    Ok(())
}

/// Puts `keys` keys (one client per key), SIGKILLs two daemons that follow each other in
/// the view at once, waits for the repair and reads every key back. Returns (keys answered
/// lost, keys answered with another value than the one put).
fn two_neighbours_killed(tolerate: &str, keys: u64) -> Result<(u64, u64)> {
    let mut cluster = KvCluster::start(
        &KvSpec {
            extra: vec!["--tolerate".into(), tolerate.into()],
            ..spec()
        },
        6,
    )?;
    for key in 0..keys {
        let line = cluster.ask(
            key as u32,
            1,
            &format!("req {key} 1 {key} put v{key}"),
            (key % 6) as u32,
        )?;
        assert!(line.contains(" ok "), "{line}");
    }
    // Nodes 3 and 4 follow each other in the view; neither is a supervisor.
    cluster.kill(&[3, 4])?;
    cluster.wait("the repair of two neighbours killed at once", WAIT, |c| {
        c.settled(2, &[0, 1, 2, 5])
    })?;
    let (mut lost, mut wrong) = (0, 0);
    let live = [0u32, 1, 2, 5];
    for key in 0..keys {
        let client = 10_000 + key;
        let line = cluster.ask(
            client as u32,
            1,
            &format!("req {client} 1 {key} get"),
            live[key as usize % live.len()],
        )?;
        let w: Vec<&str> = line.split_whitespace().collect();
        match (w.get(3), w.get(5)) {
            (Some(&"ok"), Some(v)) if *v == format!("v{key}") => {}
            (Some(&"err"), Some(&"lost:")) => lost += 1,
            _ => {
                eprintln!("key {key}: {line}");
                wrong += 1;
            }
        }
    }
    Ok((lost, wrong))
}

#[test]
fn two_neighbours_sigkilled_at_once_lose_no_key_with_three_copies_and_lost_keys_answer_lost(
) -> Result {
    let keys = 450;
    let (lost, wrong) = two_neighbours_killed("2", keys)?;
    println!("--tolerate 2: {lost} of {keys} keys lost, {wrong} answered wrong");
    assert_eq!((lost, wrong), (0, 0));
    let (lost, wrong) = two_neighbours_killed("1", keys)?;
    println!("--tolerate 1: {lost} of {keys} keys answered lost, {wrong} answered wrong");
    assert_eq!(wrong, 0, "a key was served empty or old");
    assert!(
        lost > 0 && lost < keys,
        "with 2 copies, two neighbours killed at once must lose some keys: {lost}"
    );
    Ok(())
}

/// The three supervisors of six daemons SIGKILLed by PID one after the other (each once
/// the group healed from the previous kill): each time the failure is agreed, the leader
/// removes the dead supervisor from the Raft group and adds a live member, so that after
/// the third kill (two more than three supervisors could lose) the group is the three
/// members left, a join is still agreed, and every acknowledged add reads back.
#[test]
fn supervisors_sigkilled_one_after_another_are_replaced_and_views_keep_being_agreed() -> Result {
    let mut cluster = start(6)?;
    let mut clients = Clients::new();
    let mut members: Vec<u32> = (0..6).collect();
    let victims = [0u32, 1, 2];
    let groups = remove_in_turn(
        &mut cluster,
        &mut clients,
        &mut members,
        3,
        Removal::Kill,
        |c, members| {
            let victim = victims[6 - members.len()];
            let group = c.group();
            assert!(
                group.is_empty() || group.contains(&victim),
                "node {victim} is not a supervisor: {group:?}"
            );
            victim
        },
    )?;
    assert_eq!(groups.last().unwrap(), &vec![3, 4, 5]);
    // With none of the first supervisors left, a join is still agreed.
    // It knows the initial members (their genesis), none of which supervises any more.
    cluster.join(6)?;
    clients.run_until(&cluster, "the join after the three kills", |c| {
        c.members_are(&[3, 4, 5, 6])
    })?;
    // Every request gets its answer, and every key holds its last acknowledged sum.
    clients.check_sums(&cluster, &[3, 4, 5, 6])?;
    assert!(clients.answered > 20, "only {} answers", clients.answered);
    Ok(())
}

/// Six daemons lose nodes 3, 4 and 5, then supervisor 2 (SIGKILL, in turn): two members
/// are left, so the group shrinks to one and the other first supervisor is demoted while
/// alive. A join makes three members again: the group is refilled to three, the demoted
/// node promoted back. Then the one first supervisor still in the group is killed: its
/// failure is agreed by the two others, so the re-promoted node's Raft member votes.
#[test]
fn a_demoted_supervisor_is_promoted_again_when_a_join_refills_the_group() -> Result {
    let mut cluster = start(6)?;
    // Four kills within seconds: more failures at once than two copies survive.
    let mut clients = Clients::new();
    clients.quiet = true;
    let mut members: Vec<u32> = (0..6).collect();
    let victims = [3u32, 4, 5, 2];
    let groups = remove_in_turn(
        &mut cluster,
        &mut clients,
        &mut members,
        4,
        Removal::Kill,
        |_, members| victims[6 - members.len()],
    )?;
    let sole = groups.last().unwrap().clone();
    assert_eq!(sole.len(), 1, "two members keep one supervisor: {sole:?}");
    let kept = sole[0];
    let demoted = if kept == 0 { 1 } else { 0 };
    cluster.join(6)?;
    members.push(6);
    let took = clients.run_until(&cluster, "the group refilled after the join", |c| {
        c.daemons.values().filter(|d| d.alive()).all(|d| {
            let s = d.seen();
            s.members == [0, 1, 6] && s.supervisors == [0, 1, 6]
        })
    })?;
    println!("group refilled to [0, 1, 6] (node {demoted} promoted again) in {took:.2} s");
    let groups = remove_in_turn(
        &mut cluster,
        &mut clients,
        &mut members,
        1,
        Removal::Kill,
        move |_, _| kept,
    )?;
    assert_eq!(groups[0].len(), 1);
    let mut left = vec![demoted, 6];
    left.sort_unstable();
    clients.check_sums(&cluster, &left)?;
    Ok(())
}

/// Supervisors of six daemons leave one after another (`leave` asked at another daemon)
/// while clients keep issuing adds: each hands its vote to a live member before it goes
/// (the group stays three while a member can take the vote, then shrinks), until one
/// member is left; its own leave is refused with a clear error. Every acknowledged add
/// reads back.
#[test]
fn supervisors_leave_one_after_another_until_one_member_is_left() -> Result {
    let mut cluster = start(6)?;
    let mut clients = Clients::new();
    let mut members: Vec<u32> = (0..6).collect();
    let groups = remove_in_turn(
        &mut cluster,
        &mut clients,
        &mut members,
        5,
        Removal::Leave,
        // The lowest supervisor (before the first change no daemon reported the group: it
        // is the configured one, 0,1,2).
        |c, members| c.group().first().copied().unwrap_or(members[0]),
    )?;
    assert_eq!(groups[0].len(), 3);
    assert_eq!(groups[1].len(), 3);
    assert_eq!(groups[2], vec![3, 4, 5]);
    assert_eq!(groups[4], members);
    let last = members[0];
    // The leavers stopped after handing their entries over.
    for d in cluster.daemons.values().filter(|d| d.id != last) {
        assert!(d.seen().stopped, "node {} still runs", d.id);
    }
    clients.check_sums(&cluster, &[last])?;
    cluster.send(last, &format!("leave {last}"))?;
    let start = Instant::now();
    loop {
        let replies = cluster.daemons[&last].seen().replies.clone();
        if let Some(r) = replies.iter().find(|r| r.starts_with("err")) {
            assert!(r.contains("last member"), "{r}");
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "no reply to the last leave: {replies:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
