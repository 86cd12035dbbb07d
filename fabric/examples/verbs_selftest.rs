//! Runs the fabric's semantic checks between two endpoints of one provider and prints one
//! `VERBS_TEST <name> PASS|FAIL` line per check; exits non-zero if any failed.
//!
//! The soft-RoCE lane (cluster-tests/softroce/run.sh) runs it inside a QEMU guest between
//! rxe0 and rxe1 (`SOFTROCE_DEV0/1`, `SOFTROCE_GID0/1`); on any host it runs over another
//! provider with `KRUN_FABRIC_PROVIDER=tcp` (what `fabric/tests/selftest.rs` does).
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fabric::{
    Endpoint, FabricConfig, FabricError, PeerId, Provider, ProviderChoice, Region, RemoteRegion,
};

type Check = Result<String, String>;

fn endpoint(index: usize) -> Result<Box<dyn Endpoint>, String> {
    let mut config = FabricConfig::default()
        .with_env()
        .map_err(|e| e.to_string())?;
    if config.provider == ProviderChoice::Auto {
        config.provider = ProviderChoice::Exactly(Provider::Verbs);
    }
    config.op_timeout = Duration::from_secs(10);
    if let Ok(dev) = std::env::var(format!("SOFTROCE_DEV{index}")) {
        config.verbs_device = Some(dev);
    }
    if let Ok(gid) = std::env::var(format!("SOFTROCE_GID{index}")) {
        config.verbs_gid_index = gid.parse().ok();
    }
    fabric::open(&config).map_err(|e| format!("opening endpoint {index}: {e}"))
}

fn pattern(offset: usize) -> u8 {
    ((offset as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}

fn bulk(a: &dyn Endpoint, peer: PeerId, target: &fabric::MemoryRegion) -> Check {
    const LEN: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let local = a
        .register(Region::new(LEN).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let data: Vec<u8> = (0..LEN).map(pattern).collect();
    local.write_bytes(0, &data).map_err(|e| e.to_string())?;
    let start = Instant::now();
    let posted: Vec<_> = (0..LEN / CHUNK)
        // SAFETY: distinct chunks, untouched until the completions resolve.
        .map(|i| unsafe {
            a.post_write(
                peer,
                &local,
                i * CHUNK,
                CHUNK,
                &target.remote(),
                (i * CHUNK) as u64,
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    fabric::wait_all(posted).map_err(|e| e.to_string())?;
    let wrote = start.elapsed();
    let mut seen = vec![0u8; LEN];
    target.read_bytes(0, &mut seen).map_err(|e| e.to_string())?;
    if seen != data {
        return Err("the target's memory differs from what was written".into());
    }
    local.fill(0, LEN, 0).map_err(|e| e.to_string())?;
    // SAFETY: as above.
    unsafe { a.read(peer, &local, 0, LEN, &target.remote(), 0) }.map_err(|e| e.to_string())?;
    local.read_bytes(0, &mut seen).map_err(|e| e.to_string())?;
    if seen != data {
        return Err("read back differs".into());
    }
    Ok(format!(
        "64 MiB written in {:.0} ms and read back, byte for byte",
        wrote.as_secs_f64() * 1e3
    ))
}

fn fetch_add(
    a: Arc<dyn Endpoint>,
    peer: PeerId,
    remote: RemoteRegion,
    target: &fabric::MemoryRegion,
) -> Check {
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            std::thread::spawn(move || {
                (0..1000).try_for_each(|_| a.fetch_add(peer, &remote, 0, 1).map(drop))
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| "a thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
    }
    let v = target
        .atomic_u64(0)
        .map_err(|e| e.to_string())?
        .load(Ordering::SeqCst);
    if v == 4000 {
        Ok("4 x 1000 fetch-adds: counter 4000".into())
    } else {
        Err(format!("counter is {v}, expected 4000"))
    }
}

fn cas_lock(
    a: Arc<dyn Endpoint>,
    peer: PeerId,
    remote: RemoteRegion,
    target: &fabric::MemoryRegion,
) -> Check {
    // Word 8 is the lock; words 16 and 24 a record that must stay equal.
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || -> Result<(), FabricError> {
                let scratch = a.register(Region::new(4096)?)?;
                for _ in 0..100 {
                    while a.compare_swap(peer, &remote, 8, 0, t + 1)? != 0 {}
                    // SAFETY: the lock gives this thread the record; scratch is private.
                    unsafe { a.read(peer, &scratch, 0, 16, &remote, 16)? };
                    let x = u64::from_le_bytes(
                        scratch.atomic_u64(0)?.load(Ordering::SeqCst).to_le_bytes(),
                    );
                    scratch.atomic_u64(0)?.store(x + 1, Ordering::SeqCst);
                    scratch.atomic_u64(8)?.store(x + 1, Ordering::SeqCst);
                    unsafe { a.write(peer, &scratch, 0, 16, &remote, 16)? };
                    if a.compare_swap(peer, &remote, 8, t + 1, 0)? != t + 1 {
                        return Err(FabricError::Bootstrap("lost the lock".into()));
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| "a thread panicked".to_string())?
            .map_err(|e| e.to_string())?;
    }
    let a16 = target
        .atomic_u64(16)
        .map_err(|e| e.to_string())?
        .load(Ordering::SeqCst);
    let a24 = target
        .atomic_u64(24)
        .map_err(|e| e.to_string())?
        .load(Ordering::SeqCst);
    if a16 == 300 && a24 == 300 {
        Ok("3 x 100 locked increments: record 300/300".into())
    } else {
        Err(format!("record is {a16}/{a24}, expected 300/300"))
    }
}

fn errors(a: &dyn Endpoint, peer: PeerId, remote: RemoteRegion) -> Check {
    let local = a
        .register(Region::new(4096).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    // SAFETY: rejected or private buffers only.
    let oob = unsafe { a.write(peer, &local, 0, 64, &remote, remote.len - 8) };
    if !matches!(oob, Err(FabricError::OutOfBounds { .. })) {
        return Err(format!("out-of-bounds write gave {oob:?}"));
    }
    let forged = RemoteRegion {
        key: remote.key ^ 0x00ab_cd00,
        ..remote
    };
    let start = Instant::now();
    let bad = a.fetch_add(peer, &forged, 0, 1);
    match bad {
        Err(
            FabricError::RemoteAccess { .. }
            | FabricError::Remote { .. }
            | FabricError::Timeout { .. },
        ) => Ok(format!(
            "out of bounds refused locally; bad key refused in {:?}: {}",
            start.elapsed(),
            bad.unwrap_err()
        )),
        other => Err(format!("a forged key gave {other:?}")),
    }
}

fn messages(a: &dyn Endpoint, b: &dyn Endpoint, ab: PeerId, ba: PeerId) -> Check {
    a.send(ab, 7, b"ping").map_err(|e| e.to_string())?;
    let m = b
        .recv(7, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    if m.data != b"ping" || m.peer != Some(ba) {
        return Err(format!("b got {m:?}"));
    }
    b.send(ba, 8, b"pong").map_err(|e| e.to_string())?;
    let m = a
        .recv(8, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    if m.data != b"pong" || m.peer != Some(ab) {
        return Err(format!("a got {m:?}"));
    }
    Ok("tagged messages both ways, senders named".into())
}

/// Child mode: serve a 64 MiB region on endpoint 1 until killed; prints address and region.
fn serve_target() {
    let b = endpoint(1).unwrap_or_else(|e| {
        println!("error {e}");
        std::process::exit(1)
    });
    let region = b
        .register(Region::new(64 << 20).expect("region"))
        .expect("register");
    println!(
        "{} {}",
        b.address().to_hex(),
        hex(&region.remote().to_bytes())
    );
    std::thread::sleep(Duration::from_secs(120));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

/// A peer process killed with SIGKILL while writes stream into it: the writer gets an error
/// naming the peer within a bounded time.
fn killed_peer(a: &dyn Endpoint) -> Check {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .arg("serve-target")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("piped"))
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let mut parts = line.split_whitespace();
    let (Some(addr), Some(region)) = (parts.next(), parts.next()) else {
        let _ = child.kill();
        return Err(format!("target said {line:?}"));
    };
    let addr = fabric::EndpointAddress::from_hex(addr).map_err(|e| e.to_string())?;
    let remote = RemoteRegion::from_bytes(&unhex(region)).map_err(|e| e.to_string())?;
    let peer = a.connect(&addr).map_err(|e| e.to_string())?;
    let local = a
        .register(Region::new(1 << 20).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let mut killed_at = None;
    let mut outcome = None;
    for i in 0..10_000u64 {
        if i == 20 {
            let _ = child.kill();
            let _ = child.wait();
            killed_at = Some(Instant::now());
        }
        // SAFETY: `local` is private; the target region is only ours to write.
        let r = unsafe { a.write(peer, &local, 0, 1 << 20, &remote, (i % 64) << 20) };
        if let Err(e) = r {
            outcome = Some(e);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    match (outcome, killed_at) {
        (Some(e), Some(t))
            if e.to_string().contains(&peer.to_string())
                && t.elapsed() < Duration::from_secs(30) =>
        {
            Ok(format!("error {:?} after the kill: {e}", t.elapsed()))
        }
        (Some(e), _) => Err(format!("unexpected error: {e}")),
        (None, _) => Err("writes kept succeeding after the peer was killed".into()),
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve-target") {
        serve_target();
        return;
    }
    let setup = || -> Result<_, String> {
        let a: Arc<dyn Endpoint> = Arc::from(endpoint(0)?);
        let b: Arc<dyn Endpoint> = Arc::from(endpoint(1)?);
        let ab = a
            .connect(&b.address())
            .map_err(|e| format!("connect a->b: {e}"))?;
        let ba = b
            .connect(&a.address())
            .map_err(|e| format!("connect b->a: {e}"))?;
        Ok((a, b, ab, ba))
    };
    let (a, b, ab, ba) = match setup() {
        Ok(x) => x,
        Err(e) => {
            println!("VERBS_TEST setup FAIL {e}");
            std::process::exit(1);
        }
    };
    println!("provider {}", a.provider());
    let target = b
        .register(Region::new(64 << 20).expect("region"))
        .expect("register");
    let counters = b
        .register(Region::new(4096).expect("region"))
        .expect("register");
    let checks: Vec<(&str, Check)> = vec![
        ("write_read_64mib", bulk(a.as_ref(), ab, &target)),
        (
            "fetch_add_4x1000",
            fetch_add(a.clone(), ab, counters.remote(), &counters),
        ),
        (
            "cas_lock",
            cas_lock(a.clone(), ab, counters.remote(), &counters),
        ),
        ("messages", messages(a.as_ref(), b.as_ref(), ab, ba)),
        // Last: on verbs a remote access error breaks the queue pair to that peer.
        ("errors", errors(a.as_ref(), ab, counters.remote())),
        ("killed_peer", killed_peer(a.as_ref())),
    ];
    let mut failed = 0;
    for (name, result) in &checks {
        match result {
            Ok(detail) => println!("VERBS_TEST {name} PASS {detail}"),
            Err(e) => {
                failed += 1;
                println!("VERBS_TEST {name} FAIL {e}");
            }
        }
    }
    println!(
        "verbs selftest: {} passed, {failed} failed",
        checks.len() - failed
    );
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
