//! Moving a rank between nodes (`krun node drain`): the node it leaves captures it with
//! ghost's checkpointer and ends it; the node it goes to starts it again from that image.
//!
//! Today this moves ranks that run ghost's native checkpointer (libghost): their images are
//! files under `KRUN_GHOST_DIR/<owner>` (the owner is stable per rank under krun, see
//! [`crate::ranks::ghost_owner`]) and a rank started with `KRUN_GHOST_RESTORE=latest`
//! continues from the newest. Plain programs would move with CRIU, whose restored process is
//! not a child of the adopting node; that path is refused with its reason. Ranks that use
//! the fabric (the rank library) cannot be re-wired after a move yet.
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::Duration;

use adaptation::NodeId;
use ghost::checkpointer::{CaptureOptions, Checkpointer, NativeCheckpointer};

use super::membership::TableClient;
use super::table::{RankState, TableOp};
use crate::ranks::RankCommand;

fn runner(table: &TableClient) -> Result<mpsc::Sender<RankCommand>, String> {
    table
        .shared
        .rank_commands
        .lock()
        .expect("commands lock")
        .clone()
        .ok_or_else(|| "this node runs no ranks".to_string())
}

fn ask(
    tx: &mpsc::Sender<RankCommand>,
    make: impl FnOnce(mpsc::Sender<Result<u32, String>>) -> RankCommand,
) -> Result<u32, String> {
    let (reply, rx) = mpsc::channel();
    tx.send(make(reply))
        .map_err(|_| "the node's ranks have ended".to_string())?;
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| "the rank runner did not answer".to_string())?
}

/// Why `rank` counts as a fabric user, if it does: it said hello through the rank library,
/// or libfabric is mapped in its process.
fn uses_fabric(table: &TableClient, rank: u64, pid: i32) -> Option<&'static str> {
    if table
        .shared
        .linked_ranks
        .lock()
        .expect("linked lock")
        .contains(&rank)
    {
        return Some("uses the rank library");
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    maps.contains("libfabric").then_some("has libfabric loaded")
}

/// Captures `rank` (running on this node) and ends it; `dry_run` only checks it could.
pub fn out(table: &TableClient, me: NodeId, rank: u64, dry_run: bool) -> Result<String, String> {
    let tx = runner(table)?;
    let row = table
        .request(rank, &TableOp::Get, Duration::from_secs(10))
        .map_err(|e| e.to_string())?
        .record
        .ok_or_else(|| format!("rank {rank} has no row in the process table"))?;
    if row.node != me || row.state != RankState::Running {
        return Err(format!(
            "rank {rank} is {} on node {}, not running here (node {me})",
            row.state, row.node
        ));
    }
    let pid = row.pid as i32;
    if let Some(why) = uses_fabric(table, rank, pid) {
        return Err(format!(
            "rank {rank} (pid {pid}) {why}: its fabric connections cannot be re-wired after a \
             move yet"
        ));
    }
    match ghost::checkpointer::native_settings(pid) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "rank {rank} (pid {pid}) does not run ghost's native checkpointer (libghost): \
                 moving a plain program needs CRIU, which drain does not drive yet"
            ))
        }
        Err(e) => return Err(format!("rank {rank} (pid {pid}): {e}")),
    }
    if dry_run {
        return Ok(format!("rank {rank} can move"));
    }
    table.shared.drained.store(true, Ordering::SeqCst);
    let _ = table.request(
        rank,
        &TableOp::SetState(RankState::Migrating),
        Duration::from_secs(10),
    );
    let released = ask(&tx, |reply| RankCommand::Release {
        rank: rank as usize,
        reply,
    })?;
    if released != row.pid {
        return Err(format!(
            "rank {rank}: the table says pid {pid}, the node runs pid {released}"
        ));
    }
    let image =
        std::env::temp_dir().join(format!("krun-move-rank{rank}-{}.kgi", std::process::id()));
    let opts = CaptureOptions {
        leave_running: false,
        ..CaptureOptions::default()
    };
    let captured = NativeCheckpointer
        .capture(pid, &image, &opts)
        .map_err(|e| format!("capturing rank {rank} (pid {pid}): {e}"));
    // The consolidated copy is not needed: the rank restarts from its own image chain.
    let _ = std::fs::remove_file(&image);
    let captured = captured?;
    Ok(format!(
        "rank {rank} captured ({} bytes in {:.3} s)",
        captured.image_bytes, captured.seconds
    ))
}

/// Starts `rank` on this node from its newest checkpoint.
pub fn adopt(table: &TableClient, me: NodeId, rank: u64) -> Result<String, String> {
    let tx = runner(table)?;
    let pid = ask(&tx, |reply| RankCommand::Adopt {
        rank: rank as usize,
        env: vec![("KRUN_GHOST_RESTORE".into(), "latest".into())],
        reply,
    })?;
    Ok(format!("rank {rank} runs on node {me} as pid {pid}"))
}
