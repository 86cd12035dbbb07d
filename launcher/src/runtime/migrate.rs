//! Moving a rank between nodes (`krun node drain`): the node it leaves captures it with
//! ghost's checkpointer and ends it; the node it goes to starts it again from that image.
//!
//! Two kinds of ranks move this way (ranks of the rank library, which use the fabric, move
//! through the checkpoint policy instead: `runtime/drain.rs`):
//! - ranks that run ghost's native checkpointer (libghost): their images are files under
//!   `KRUN_GHOST_DIR/<owner>` (the owner is stable per rank under krun, see
//!   [`crate::ranks::ghost_owner`]) and a rank started with `KRUN_GHOST_RESTORE=latest`
//!   continues from the newest;
//! - plain programs, through CRIU (ghost's CRIU checkpointer): the leaving node dumps the
//!   rank's process tree into one image file ([`move_image`]); the adopting node restores it
//!   with CRIU's `rst_sibling`, so the restored root is a child of the adopting krund, which
//!   then waits for it, signals and ends it like its own ranks
//!   ([`crate::ranks::RankCommand::Watch`]). The image is read from `KRUN_GHOST_DIR`, which
//!   must be shared by the two nodes (one machine, or a shared filesystem). CRIU restores
//!   the rank's PID: it must be free on the adopting host. The rank's standard output and
//!   error (pipes to its old node) are not reconnected: a moved plain program keeps running
//!   but what it prints is lost.
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
/// or libfabric or the rank library (`libkrun.so`, mapped at start, before the rank
/// initializes it) is mapped in its process.
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
    if maps.contains("libkrun") {
        return Some("runs the rank library (libkrun)");
    }
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
    let criu = match ghost::checkpointer::native_settings(pid) {
        Ok(Some(_)) => None,
        Ok(None) => Some(ghost::criu::CriuCheckpointer::locate().map_err(|e| {
            format!(
                "rank {rank} (pid {pid}) does not run ghost's native checkpointer \
                     (libghost), and moving a plain program needs CRIU: {e}"
            )
        })?),
        Err(e) => return Err(format!("rank {rank} (pid {pid}): {e}")),
    };
    if dry_run {
        return Ok(format!("rank {rank} can move"));
    }
    if let Some(criu) = criu {
        return out_with_criu(table, &tx, &criu, rank, row.pid);
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

/// Where a plain program's CRIU image waits between the two nodes of a move.
pub fn move_image(rank: u64) -> std::path::PathBuf {
    let (dir, owner) = super::recovery::rank_images(rank as u32);
    dir.join(owner).join("criu-move.kgi")
}

/// Move images this node wrote (a node whose image directory the adopting node does not
/// share keeps them until it leaves: [`remove_move_images`]).
static MOVED_OUT: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes the move images this node wrote (it leaves after a drain; the adopting nodes have
/// read or consumed them).
pub fn remove_move_images() {
    if let Ok(mut files) = MOVED_OUT.lock() {
        for f in files.drain(..) {
            let _ = std::fs::remove_file(&f);
            let _ = std::fs::remove_file(pipes_file(&f));
        }
    }
}

/// Beside a move image: which of the rank's output descriptors were pipes, and their names.
fn pipes_file(image: &std::path::Path) -> std::path::PathBuf {
    image.with_extension("pipes")
}

/// `pid` and its descendants (from `/proc/PID/task/TID/children`).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() && all.len() < 100_000 {
        let p = all[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                all.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    all
}

/// Dumps a plain program's rank with CRIU (which ends it) into [`move_image`].
fn out_with_criu(
    table: &TableClient,
    tx: &mpsc::Sender<RankCommand>,
    criu: &ghost::criu::CriuCheckpointer,
    rank: u64,
    pid: u32,
) -> Result<String, String> {
    table.shared.drained.store(true, Ordering::SeqCst);
    let _ = table.request(
        rank,
        &TableOp::SetState(RankState::Migrating),
        Duration::from_secs(10),
    );
    let released = ask(tx, |reply| RankCommand::Release {
        rank: rank as usize,
        reply,
    })?;
    if released != pid {
        return Err(format!(
            "rank {rank}: the table says pid {pid}, the node runs pid {released}"
        ));
    }
    let image = move_image(rank);
    if let Some(parent) = image.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    // Its output pipes lead to this node, which stays behind: the adopting node plugs its
    // own in their place (CRIU's inherit-fd), named as the dump will know them.
    let pipes: String = [1, 2]
        .iter()
        .filter_map(|fd| {
            let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
            let target = target.to_string_lossy().into_owned();
            target
                .starts_with("pipe:[")
                .then(|| format!("{fd} {target}\n"))
        })
        .collect();
    std::fs::write(pipes_file(&image), pipes)
        .map_err(|e| format!("writing {}: {e}", pipes_file(&image).display()))?;
    let tree = process_tree(pid);
    if let Ok(mut files) = MOVED_OUT.lock() {
        files.push(image.clone());
    }
    let opts = CaptureOptions {
        leave_running: false,
        ..CaptureOptions::default()
    };
    let captured = criu
        .capture(pid as i32, &image, &opts)
        .map_err(|e| format!("capturing rank {rank} (pid {pid}) with CRIU: {e}"))?;
    // CRIU restores the same pids: the old processes must be gone (reaped) first.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tree
        .iter()
        .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(format!(
        "rank {rank} captured with CRIU ({} bytes in {:.3} s)",
        captured.image_bytes, captured.seconds
    ))
}

/// Restores a plain program's rank from [`move_image`] with CRIU; it becomes a child of
/// this process, watched by the node's runner.
fn adopt_with_criu(
    tx: &mpsc::Sender<RankCommand>,
    me: NodeId,
    rank: u64,
    image: &std::path::Path,
) -> Result<String, String> {
    let criu = ghost::criu::CriuCheckpointer::locate().map_err(|e| e.to_string())?;
    let path = image.to_path_buf();
    let pipes = std::fs::read_to_string(pipes_file(image)).unwrap_or_default();
    let start = crate::ranks::StartFn(Box::new(move |mine: crate::ranks::RankPipes| {
        let inherit: Vec<(String, i32)> = pipes
            .lines()
            .filter_map(|l| {
                let (fd, key) = l.split_once(' ')?;
                let to = match fd {
                    "1" => mine.stdout,
                    "2" => mine.stderr,
                    _ => return None,
                };
                Some((key.to_string(), to))
            })
            .collect();
        let restored = criu
            .restore_inheriting(
                &path,
                &ghost::checkpointer::RestoreOptions::default(),
                &inherit,
            )
            .map_err(|e| format!("restoring rank {rank} with CRIU: {e}"));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(pipes_file(&path));
        Ok(restored?.pid as u32)
    }));
    let pid = ask(tx, |reply| RankCommand::Watch {
        rank: rank as usize,
        start,
        reply,
    })?;
    Ok(format!(
        "rank {rank} runs on node {me} as pid {pid} (restored by CRIU)"
    ))
}

/// Starts `rank` on this node from its newest checkpoint (a plain program: from its CRIU
/// image of the move).
pub fn adopt(table: &TableClient, me: NodeId, rank: u64) -> Result<String, String> {
    let tx = runner(table)?;
    let image = move_image(rank);
    if image.exists() {
        return adopt_with_criu(&tx, me, rank, &image);
    }
    let pid = ask(&tx, |reply| RankCommand::Adopt {
        rank: rank as usize,
        env: vec![("KRUN_GHOST_RESTORE".into(), "latest".into())],
        reply,
    })?;
    Ok(format!("rank {rank} runs on node {me} as pid {pid}"))
}

/// Serves [`super::control::ControlRequest::ReadMoveFile`]: a chunk of this node's move
/// image of `rank` (or of its pipes note).
pub fn serve_move_file(rank: u64, pipes: bool, offset: u64) -> super::control::ControlReply {
    use super::control::{ControlReply, IMAGE_CHUNK};
    let image = move_image(rank);
    let path = if pipes { pipes_file(&image) } else { image };
    let read = (|| -> std::io::Result<(u64, Vec<u8>)> {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&path)?;
        let total = f.metadata()?.len();
        f.seek(std::io::SeekFrom::Start(offset.min(total)))?;
        let mut bytes = Vec::new();
        f.take(IMAGE_CHUNK as u64).read_to_end(&mut bytes)?;
        Ok((total, bytes))
    })();
    match read {
        Ok((total, bytes)) => ControlReply::Image { total, bytes },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            ControlReply::Refused(NO_MOVE_IMAGE.to_string())
        }
        Err(e) => ControlReply::Refused(format!("{}: {e}", path.display())),
    }
}

/// The refusal of [`serve_move_file`] when the node holds no such file (the rank did not
/// move through CRIU).
const NO_MOVE_IMAGE: &str = "no CRIU move image of this rank here";

/// Copies a move file of `rank` from the node at `from` (control TCP) to `to`; false when
/// that node has none.
fn copy_move_file(
    rank: u64,
    from: &str,
    pipes: bool,
    to: &std::path::Path,
) -> Result<bool, String> {
    use super::control::{self, ControlReply, ControlRequest, ControlTarget};
    let secret = fabric::secret::ClusterSecret::from_env()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "no cluster secret to reach the leaving node".to_string())?;
    let mut data = Vec::new();
    loop {
        let req = ControlRequest::ReadMoveFile {
            rank,
            pipes,
            offset: data.len() as u64,
        };
        match control::call::<_, ControlReply>(
            &ControlTarget::Tcp(from.to_string()),
            &secret,
            &req,
            Duration::from_secs(30),
        ) {
            Ok(ControlReply::Image { total, bytes }) => {
                if data.len() as u64 + bytes.len() as u64 > total
                    || (bytes.is_empty() && (data.len() as u64) < total)
                {
                    return Err(format!(
                        "{from} sent a bad chunk of rank {rank}'s move image"
                    ));
                }
                data.extend_from_slice(&bytes);
                if data.len() as u64 == total {
                    break;
                }
            }
            Ok(ControlReply::Refused(why)) if why == NO_MOVE_IMAGE => return Ok(false),
            Ok(ControlReply::Refused(why)) => return Err(format!("{from}: {why}")),
            Ok(other) => return Err(format!("{from}: unexpected answer {other:?}")),
            Err(e) => return Err(format!("{from}: {e}")),
        }
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    ghost::native::write_atomically(to, &data)
        .map_err(|e| format!("writing {}: {e}", to.display()))?;
    Ok(true)
}

/// `Adopt` of a rank leaving the node at `from`: a plain program's CRIU image this node does
/// not see (no shared `KRUN_GHOST_DIR`) is copied from there first.
pub fn adopt_from(
    table: &TableClient,
    me: NodeId,
    rank: u64,
    from: &str,
) -> Result<String, String> {
    let image = move_image(rank);
    if !image.exists() {
        // Only a CRIU move leaves an image behind; a native rank's own files are used as
        // they are.
        if copy_move_file(rank, from, false, &image)? {
            copy_move_file(rank, from, true, &pipes_file(&image))?;
        }
    }
    adopt(table, me, rank)
}
