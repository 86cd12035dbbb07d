//! `krun ghost ...`: capture, restore, roll back, migrate and inspect ghost processes through
//! the uniform checkpointer API (the backend is chosen from the process or the image).
use crate::cli::GhostAction;
use crate::error::{LauncherError, Result};
use ghost::checkpointer::{self, CaptureOptions, RestoreOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A spinner while a long operation runs (only when stderr is a terminal: the result line
/// on stdout is the same either way).
fn spinner(label: &str) -> crate::progress::Progress {
    crate::progress::Progress::spinner(crate::progress::Mode::for_stderr(), label)
}

fn usage(why: &str) -> LauncherError {
    LauncherError::Usage(why.to_string())
}

/// Runs one `krun ghost` subcommand (parsed by [`crate::cli::GhostAction`]) and returns what
/// to print.
pub fn run(action: GhostAction) -> Result<String> {
    let ghost_err = |e: ghost::GhostError| LauncherError::Ghost(e);
    match action {
        GhostAction::Run { output, program } => {
            let output = output.unwrap_or_else(|| PathBuf::from("/dev/null"));
            let (prog, prog_args) = program
                .split_first()
                .ok_or_else(|| usage("krun ghost run needs a program"))?;
            let c = ghost::criu::spawn_capturable(prog.as_ref(), prog_args, &output)?;
            let pid = c.pid;
            // The supervisor (unshare) lives on after krun exits.
            std::mem::forget(c.supervisor);
            Ok(format!("started {prog} as pid {pid}"))
        }
        GhostAction::Inspect { image } => checkpointer::inspect(&image).map_err(ghost_err),
        GhostAction::Capture {
            pid,
            image: out,
            kill,
            zstd,
        } => {
            let opts = CaptureOptions {
                leave_running: !kill,
                compress: zstd,
                ..CaptureOptions::default()
            };
            let shown = spinner(&format!("capturing pid {pid} into {}", out.display()));
            let c = checkpointer::for_process(pid)
                .and_then(|cp| cp.capture(pid, &out, &opts))
                .map_err(ghost_err)?;
            shown.finish(None);
            Ok(format!(
                "captured pid {pid} with {} into {} ({} bytes in {:.3} s, {:.2} GB/s){}",
                c.backend.name(),
                c.image.display(),
                c.image_bytes,
                c.seconds,
                c.image_bytes as f64 / c.seconds.max(1e-9) / 1e9,
                if kill { "; process ended" } else { "" }
            ))
        }
        GhostAction::Restore {
            image,
            output,
            owner,
            workdir,
        } => {
            let opts = RestoreOptions {
                output,
                owner,
                workdir,
            };
            let shown = spinner(&format!("restoring {}", image.display()));
            let r = checkpointer::for_image(&image)
                .and_then(|cp| cp.restore(&image, &opts))
                .map_err(ghost_err)?;
            shown.finish(None);
            Ok(format!(
                "restored {} with {} as pid {}",
                image.display(),
                r.backend.name(),
                r.pid
            ))
        }
        GhostAction::Rollback { pid, image } => {
            let shown = spinner(&format!("rolling pid {pid} back to {}", image.display()));
            let r = checkpointer::for_process(pid)
                .and_then(|cp| cp.rollback(pid, &image, &RestoreOptions::default()))
                .map_err(ghost_err)?;
            shown.finish(None);
            Ok(format!(
                "pid {pid} rolled back to {} with {} (now pid {})",
                image.display(),
                r.backend.name(),
                r.pid
            ))
        }
        GhostAction::Migrate {
            pid,
            image: out,
            to: Some(to),
            output,
            ..
        } => migrate_to_host(pid, &out, &to, output),
        GhostAction::Migrate {
            pid,
            image: out,
            netns,
            output,
            ..
        } => {
            let netns = netns.ok_or_else(|| usage("krun ghost migrate needs --netns or --to"))?;
            let krun = std::env::current_exe().map_err(|e| LauncherError::Io {
                context: "locating krun".into(),
                source: e,
            })?;
            let shown = spinner(&format!("migrating pid {pid} to netns {netns}"));
            let r = checkpointer::migrate(pid, &out, |image| {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", &netns])
                    .arg(&krun)
                    .args(["ghost", "restore"])
                    .arg(image);
                if let Some(o) = &output {
                    cmd.arg("--output").arg(o);
                }
                let done = cmd.output().map_err(|e| ghost::GhostError::Io {
                    path: "ip".into(),
                    what: format!("running krun in netns {netns}"),
                    source: e,
                })?;
                let text = String::from_utf8_lossy(&done.stdout).to_string();
                let pid = text
                    .rsplit("as pid ")
                    .next()
                    .and_then(|p| p.trim().parse().ok())
                    .filter(|_| done.status.success());
                match pid {
                    Some(pid) => Ok(ghost::Restored {
                        backend: ghost::Backend::Native,
                        pid,
                    }),
                    None => Err(ghost::GhostError::Invalid(format!(
                        "restore in netns {netns} failed: {}",
                        String::from_utf8_lossy(&done.stderr).trim()
                    ))),
                }
            })
            .map_err(ghost_err)?;
            shown.finish(None);
            Ok(format!(
                "migrated pid {pid} to netns {netns}: now pid {}",
                r.pid
            ))
        }
    }
}

/// `krun ghost migrate PID -o IMAGE --to HOST`: captures and ends `pid` here, sends the image
/// to `host`'s `krund --listen` daemon, which restores it under a `krund --ghost-restore`
/// process that watches and reaps it ([`restore_and_follow`]); then follows it until it
/// ends. If the destination cannot restore it, it is restored here again.
fn migrate_to_host(pid: i32, out: &Path, host: &str, output: Option<PathBuf>) -> Result<String> {
    use crate::daemon::{DaemonClient, FromDaemon, RunRequest, ToDaemon, HOST_SILENCE_LIMIT};
    let secret = fabric::secret::ClusterSecret::from_env()?;
    let mut link = None;
    let started = std::time::Instant::now();
    let moved = checkpointer::migrate(pid, out, |image| {
        let fail = |what: String| ghost::GhostError::Invalid(format!("{host}: {what}"));
        let bytes = std::fs::read(image).map_err(|e| ghost::GhostError::Io {
            path: image.to_path_buf(),
            what: "reading the image to send".into(),
            source: e,
        })?;
        let d = DaemonClient::connect(host, Duration::from_secs(10), secret.as_ref())
            .map_err(|e| fail(e.to_string()))?;
        let mut args = vec!["--ghost-restore".to_string()];
        if let Some(o) = &output {
            args.extend(["--output".to_string(), o.display().to_string()]);
        }
        let (mut control, mut lines) = d
            .start(RunRequest {
                args,
                env: Vec::new(),
            })
            .map_err(|e| fail(e.to_string()))?;
        for chunk in bytes.chunks(1 << 20) {
            control
                .send(&ToDaemon::Stdin(chunk.to_vec()))
                .map_err(|e| fail(e.to_string()))?;
        }
        control
            .send(&ToDaemon::Stdin(Vec::new()))
            .map_err(|e| fail(e.to_string()))?;
        // The supervisor's first line names the restored process, or it ends saying why.
        let mut why = String::new();
        loop {
            match lines.next(HOST_SILENCE_LIMIT) {
                Ok(FromDaemon::Stdout(l)) => {
                    let l = String::from_utf8_lossy(&l).into_owned();
                    if let Some(p) = l.trim().strip_prefix(RESTORED_AS) {
                        let new_pid = p.trim().parse().map_err(|_| fail(l.clone()))?;
                        link = Some((control, lines));
                        return Ok(ghost::Restored {
                            backend: ghost::Backend::Criu,
                            pid: new_pid,
                        });
                    }
                }
                Ok(FromDaemon::Stderr(l)) => why.push_str(&String::from_utf8_lossy(&l)),
                Ok(FromDaemon::Heartbeat) => {}
                Ok(FromDaemon::Exit(code)) => {
                    return Err(fail(format!(
                        "the restore ended with code {code}: {}",
                        why.trim()
                    )))
                }
                Ok(FromDaemon::Refused(r)) => return Err(fail(r)),
                Ok(FromDaemon::Status(_)) => {}
                Err(e) => return Err(fail(e.to_string())),
            }
        }
    })
    .map_err(LauncherError::Ghost)?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "krun: migrated pid {pid} to {host}: now pid {} there ({seconds:.2} s); following it \
         until it ends",
        moved.pid
    );
    let (_control, mut lines) = link.ok_or_else(|| usage("the destination never answered"))?;
    loop {
        match lines.next(HOST_SILENCE_LIMIT) {
            Ok(FromDaemon::Stdout(l)) => println!("{}", String::from_utf8_lossy(&l)),
            Ok(FromDaemon::Stderr(l)) => eprintln!("{}", String::from_utf8_lossy(&l)),
            Ok(FromDaemon::Exit(0)) => {
                return Ok(format!(
                    "pid {} on {host} (was pid {pid} here) ended with code 0",
                    moved.pid
                ))
            }
            Ok(FromDaemon::Exit(code)) => {
                return Err(LauncherError::Node {
                    node: 0,
                    message: format!(
                        "pid {} on {host} (was pid {pid} here) ended with code {code}",
                        moved.pid
                    ),
                })
            }
            Ok(FromDaemon::Refused(r)) => return Err(usage(&r)),
            Ok(_) => {}
            Err(e) => {
                return Err(LauncherError::Node {
                    node: 0,
                    message: format!("{host}: lost the link to the moved process: {e}"),
                })
            }
        }
    }
}

/// The line `krund --ghost-restore` prints once the image runs again.
const RESTORED_AS: &str = "restored as pid ";

/// `krund --ghost-restore [--output FILE]` (started by a host's daemon for `krun ghost
/// migrate --to`): reads an image from stdin, restores it (CRIU or native), prints
/// "restored as pid N", then waits for that process, which is its child (CRIU restores the
/// root as a child of the caller), and exits with its code.
pub fn restore_and_follow(output: Option<&Path>) -> Result<i32> {
    let output = output.map(Path::to_path_buf);
    let dir = std::env::temp_dir().join(format!("krun-ghost-in-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| LauncherError::Io {
        context: format!("creating {}", dir.display()),
        source: e,
    })?;
    let image = dir.join("image.kgi");
    let restored = (|| {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes).map_err(|e| {
            LauncherError::Io {
                context: "reading the image from stdin".into(),
                source: e,
            }
        })?;
        std::fs::write(&image, &bytes).map_err(|e| LauncherError::Io {
            context: format!("writing {}", image.display()),
            source: e,
        })?;
        let opts = RestoreOptions {
            output,
            owner: None,
            workdir: None,
        };
        checkpointer::for_image(&image)
            .and_then(|cp| cp.restore(&image, &opts))
            .map_err(LauncherError::Ghost)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let restored = restored?;
    println!("{RESTORED_AS}{}", restored.pid);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    Ok(wait_for(restored.pid))
}

/// Waits for `pid` (a child of this process, or not: then until it is gone); its exit code.
fn wait_for(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waitpid with a valid status pointer; it fails with ECHILD when `pid` is not
    // our child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    if r == pid {
        use std::os::unix::process::ExitStatusExt;
        return crate::ranks::exit_code(std::process::ExitStatus::from_raw(status));
    }
    eprintln!("krund: pid {pid} is not a child of this process: its exit code is unknown");
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    0
}
