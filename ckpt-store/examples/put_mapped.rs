//! Bytes copied and time to L1 / L2 for one image file put three ways, on two store nodes in
//! this process (libfabric tcp by default):
//! - `read+put`: read the file into a buffer, then `Store::put` (what a caller did before);
//! - `mmap+put`: map the file, then `Store::put` (one copy, into store memory);
//! - `put_file`: `Store::put_file` (the mapped file is L1; L2 RMA writes read it).
//!
//! ```text
//! cargo run --release -p ckpt-store --example put_mapped -- [MIB] [ROUNDS] [tcp|shm|loopback]
//! ```
//! Rounds are interleaved; the table shows medians. The image lives in /dev/shm (where the
//! native checkpointer writes L1 images).
use ckpt_store::{Level, NodeInfo, Store, StoreConfig};
use fabric::secret::ClusterSecret;
use fabric::{open, FabricConfig, Provider};
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(Ok(256), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let provider = match args.next() {
        None => Provider::Tcp,
        Some(a) => Provider::all()
            .into_iter()
            .find(|p| p.name() == a)
            .ok_or_else(|| format!("unknown provider {a:?}"))?,
    };
    let len = mib << 20;
    let secret = ClusterSecret::random()?;
    let eps: Vec<_> = (0..2)
        .map(|_| open(&FabricConfig::with_provider(provider)))
        .collect::<Result<_, _>>()?;
    let nodes: Vec<NodeInfo> = eps
        .iter()
        .enumerate()
        .map(|(i, e)| NodeInfo {
            address: e.address(),
            group: i as u32,
        })
        .collect();
    let mut stores = Vec::new();
    for (i, ep) in eps.into_iter().enumerate() {
        stores.push(Store::start(
            ep,
            StoreConfig {
                node: i,
                nodes: nodes.clone(),
                arena_bytes: 3 * len,
                disk: None,
                keep: 1,
                parity_set: 0,
                secret: secret.clone(),
                request_timeout: Duration::from_secs(30),
            },
        )?);
    }
    let path = std::path::PathBuf::from(format!("/dev/shm/krun-put-mapped-{}", std::process::id()));
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + (i >> 13)) as u8).collect();
    std::fs::write(&path, &data)?;
    drop(data);
    let store = &stores[0];
    let methods = ["read+put", "mmap+put", "put_file"];
    let mut results: Vec<Vec<(f64, f64, u64)>> = vec![Vec::new(); 3];
    let mut version = 0;
    for _ in 0..rounds {
        for (m, name) in methods.iter().enumerate() {
            version += 1;
            let copied_before = store.copied_bytes();
            let start = Instant::now();
            let user_copies = match *name {
                "read+put" => {
                    let bytes = std::fs::read(&path)?;
                    store.put("img", version, &bytes)?;
                    bytes.len() as u64
                }
                "mmap+put" => {
                    let f = std::fs::File::open(&path)?;
                    // SAFETY: this program owns the file and does not change it meanwhile.
                    let r = unsafe { fabric::Region::map_file(&f, len) }?;
                    // SAFETY: nothing writes the private mapping.
                    store.put("img", version, unsafe { r.as_slice() })?;
                    0
                }
                _ => {
                    // SAFETY: this program never changes the file while the store runs.
                    unsafe { store.put_file("img", version, &path) }?;
                    0
                }
            };
            let l1 = start.elapsed();
            store.wait_safe("img", version, Level::L2, Duration::from_secs(120))?;
            let l2 = start.elapsed();
            let copied = user_copies + store.copied_bytes() - copied_before;
            results[m].push((l1.as_secs_f64(), l2.as_secs_f64(), copied));
        }
    }
    let _ = std::fs::remove_file(&path);
    println!(
        "{} MiB image in /dev/shm, provider {}, {rounds} rounds (medians)",
        mib,
        provider.name()
    );
    println!(
        "{:<10} {:>14} {:>10} {:>10} {:>12}",
        "method", "bytes copied", "to L1 ms", "to L2 ms", "L1 GB/s"
    );
    for (m, name) in methods.iter().enumerate() {
        let mut r = results[m].clone();
        let med = |f: &dyn Fn(&(f64, f64, u64)) -> f64, r: &mut Vec<(f64, f64, u64)>| {
            r.sort_by(|a, b| f(a).total_cmp(&f(b)));
            f(&r[r.len() / 2])
        };
        let l1 = med(&|x| x.0, &mut r);
        let l2 = med(&|x| x.1, &mut r);
        let copied = r[0].2;
        println!(
            "{:<10} {:>14} {:>10.1} {:>10.1} {:>12.2}",
            name,
            copied,
            l1 * 1e3,
            l2 * 1e3,
            len as f64 / l1 / 1e9
        );
    }
    Ok(())
}
