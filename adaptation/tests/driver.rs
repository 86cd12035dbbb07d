//! The TCP driver as a library: three nodes in one process, a request through a handle, a
//! joiner, and a planned leave seen as events.
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use adaptation::daemon::{DaemonConfig, Driver, DriverEvent, ViewSnapshot};
use adaptation::kv::{parse_answer, KvOp, KvService};
use adaptation::service::RequestId;
use adaptation::Change;
use fabric::secret::ClusterSecret;

fn config(id: u32, listen: &str, peers: BTreeMap<u32, String>, join: bool) -> DaemonConfig {
    DaemonConfig {
        id,
        listen: listen.to_string(),
        peers,
        supervisors: Vec::new(),
        join,
        tick: Duration::from_millis(10),
        seed: u64::from(id),
        failure_timeout: None,
    }
}

/// Waits (bounded) for an event of `d` that `pick` accepts.
fn wait_event<T>(d: &Driver, what: &str, mut pick: impl FnMut(DriverEvent) -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if let Ok(e) = d.events().recv_timeout(left) {
            if let Some(t) = pick(e) {
                return t;
            }
        }
    }
    panic!("node {}: no {what} within 30 s", d.id());
}

fn stable(d: &Driver, members: &[u32]) -> ViewSnapshot {
    wait_event(d, &format!("stable view with {members:?}"), |e| match e {
        DriverEvent::Stable(v) if v.members == members => Some(v),
        _ => None,
    })
}

#[test]
fn drivers_answer_requests_and_report_views_as_nodes_join_and_leave() {
    let secret = ClusterSecret::random().unwrap();
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    let mut drivers = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let peers = (0..3u32)
            .filter(|&p| p as usize != i)
            .map(|p| (p, addrs[p as usize].clone()))
            .collect();
        let cfg = config(i as u32, &addrs[i], peers, false);
        drivers
            .push(Driver::start(cfg, l, secret.clone(), vec![Box::new(KvService::new())]).unwrap());
    }
    let v = drivers[1].handle().view().unwrap();
    assert_eq!((v.epoch, v.members.clone()), (0, vec![0, 1, 2]));
    assert_eq!(v.supervisors, [0, 1, 2]);
    assert_eq!(v.cells.concat(), [0, 1, 2]);

    // A write through node 2, a read through node 0: the answers come back as events.
    let id = |client, seq| RequestId {
        origin: 0,
        client,
        seq,
    };
    drivers[2]
        .handle()
        .submit(id(7, 1), 0, 42, KvOp::Put(b"hello".to_vec()).encode())
        .unwrap();
    let put = wait_event(&drivers[2], "answer to the put", |e| match e {
        DriverEvent::Response { id: r, payload } if r == id(7, 1) => parse_answer(&payload),
        _ => None,
    });
    assert!(put.ok);
    drivers[0]
        .handle()
        .submit(id(8, 1), 0, 42, KvOp::Get.encode())
        .unwrap();
    let get = wait_event(&drivers[0], "answer to the get", |e| match e {
        DriverEvent::Response { id: r, payload } if r == id(8, 1) => parse_answer(&payload),
        _ => None,
    });
    assert_eq!((get.ok, get.value), (true, b"hello".to_vec()));
    // A request to a service the node does not have is refused at once.
    assert!(drivers[0]
        .handle()
        .submit(id(9, 1), 5, 1, Vec::new())
        .is_err());

    // Node 3 announces itself to the members; every member reports the view of epoch 1.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let contact: BTreeMap<u32, String> =
        (0..3u32).map(|p| (p, addrs[p as usize].clone())).collect();
    let joiner = Driver::start(
        config(3, &addr, contact, true),
        l,
        secret.clone(),
        vec![Box::new(KvService::new())],
    )
    .unwrap();
    for d in &drivers {
        let v = stable(d, &[0, 1, 2, 3]);
        assert_eq!(v.epoch, 1);
        assert!(matches!(&v.changes[0], Change::Join { node: 3, .. }));
    }
    stable(&joiner, &[0, 1, 2, 3]);

    // A node that is not a member cannot leave; the joiner can: it stops, the others see
    // epoch 2.
    assert!(drivers[1].handle().request_leave(9).is_err());
    drivers[1].handle().request_leave(3).unwrap();
    let reason = wait_event(&joiner, "stop", |e| match e {
        DriverEvent::Stopped { reason } => Some(reason),
        _ => None,
    });
    assert!(!reason.is_empty());
    assert!(joiner.join().is_ok());
    for d in &drivers {
        assert_eq!(stable(d, &[0, 1, 2]).epoch, 2);
    }
    // The key is still there after two migrations.
    drivers[1]
        .handle()
        .submit(id(8, 2), 0, 42, KvOp::Get.encode())
        .unwrap();
    let get = wait_event(&drivers[1], "answer after the leave", |e| match e {
        DriverEvent::Response { id: r, payload } if r == id(8, 2) => parse_answer(&payload),
        _ => None,
    });
    assert_eq!(get.value, b"hello".to_vec());
}
