//! `krun ghost ...`: capture, restore, roll back, migrate and inspect ghost processes through
//! the uniform checkpointer API (the backend is chosen from the process or the image).
use crate::error::{LauncherError, Result};
use ghost::checkpointer::{self, CaptureOptions, RestoreOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const USAGE: &str = "\
krun ghost run [--output FILE] PROGRAM ARGS... start a program CRIU can capture and restore
                                              beside itself (PID 1 of its own PID namespace)
krun ghost inspect IMAGE                      verify an image and print what it holds
krun ghost capture PID -o IMAGE [--kill] [--zstd]
                                              capture a process (kept running unless --kill)
krun ghost restore IMAGE [--output FILE] [--owner NAME] [--workdir DIR]
                                              start a new process from an image; prints its pid
                                              (native: DIR holds its images from then on)
krun ghost rollback PID IMAGE                 bring a live process back to an image
krun ghost migrate PID -o IMAGE --netns NAME  capture and end PID, restore it in network
                                              namespace NAME (a node of a namespace cluster)
krun ghost migrate PID -o IMAGE --to HOST[:PORT] [--output FILE]
                                              capture and end PID, restore it on HOST through
                                              its `krund --listen` daemon (the image travels
                                              over the authenticated link; KRUN_SECRET_FILE),
                                              which watches and reaps it; krun follows it
                                              (its output, its exit code) until it ends";

fn usage(why: &str) -> LauncherError {
    LauncherError::Usage(format!("{why}\n{USAGE}"))
}

fn pid_arg(text: &str) -> Result<i32> {
    text.parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| usage(&format!("'{text}' is not a process id")))
}

/// Runs one `krun ghost` subcommand and returns what to print.
pub fn run(args: &[String]) -> Result<String> {
    let (verb, rest) = args
        .split_first()
        .ok_or_else(|| usage("krun ghost needs a subcommand"))?;
    if verb == "run" {
        let (output, program) = match rest {
            [flag, file, program @ ..] if flag == "--output" => (PathBuf::from(file), program),
            program => (PathBuf::from("/dev/null"), program),
        };
        let (prog, prog_args) = program
            .split_first()
            .ok_or_else(|| usage("krun ghost run needs a program"))?;
        let c = ghost::criu::spawn_capturable(prog.as_ref(), prog_args, &output)?;
        let pid = c.pid;
        // The supervisor (unshare) lives on after krun exits.
        std::mem::forget(c.supervisor);
        return Ok(format!("started {prog} as pid {pid}"));
    }
    let mut positional = Vec::new();
    let mut out: Option<PathBuf> = None;
    let mut output: Option<PathBuf> = None;
    let mut owner: Option<String> = None;
    let mut workdir: Option<PathBuf> = None;
    let mut netns: Option<String> = None;
    let mut to: Option<String> = None;
    let mut kill = false;
    let mut zstd = false;
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| usage(&format!("{flag} needs a value")))
        };
        match a.as_str() {
            "-o" | "--image" => out = Some(PathBuf::from(value(a)?)),
            "--output" => output = Some(PathBuf::from(value(a)?)),
            "--owner" => owner = Some(value(a)?),
            "--workdir" => workdir = Some(PathBuf::from(value(a)?)),
            "--netns" => netns = Some(value(a)?),
            "--to" => to = Some(value(a)?),
            "--kill" => kill = true,
            "--zstd" => zstd = true,
            flag if flag.starts_with('-') => return Err(usage(&format!("unknown option {flag}"))),
            _ => positional.push(a.clone()),
        }
    }
    let ghost_err = |e: ghost::GhostError| LauncherError::Ghost(e);
    match (verb.as_str(), positional.as_slice()) {
        ("inspect", [image]) => checkpointer::inspect(image.as_ref()).map_err(ghost_err),
        ("capture", [pid]) => {
            let pid = pid_arg(pid)?;
            let out = out.ok_or_else(|| usage("capture needs -o IMAGE"))?;
            let opts = CaptureOptions {
                leave_running: !kill,
                compress: zstd,
                ..CaptureOptions::default()
            };
            let c = checkpointer::for_process(pid)
                .and_then(|cp| cp.capture(pid, &out, &opts))
                .map_err(ghost_err)?;
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
        ("restore", [image]) => {
            let opts = RestoreOptions {
                output,
                owner,
                workdir,
            };
            let r = checkpointer::for_image(image.as_ref())
                .and_then(|cp| cp.restore(image.as_ref(), &opts))
                .map_err(ghost_err)?;
            Ok(format!(
                "restored {image} with {} as pid {}",
                r.backend.name(),
                r.pid
            ))
        }
        ("rollback", [pid, image]) => {
            let pid = pid_arg(pid)?;
            let r = checkpointer::for_process(pid)
                .and_then(|cp| cp.rollback(pid, image.as_ref(), &RestoreOptions::default()))
                .map_err(ghost_err)?;
            Ok(format!(
                "pid {pid} rolled back to {image} with {} (now pid {})",
                r.backend.name(),
                r.pid
            ))
        }
        ("migrate", [pid]) if to.is_some() => {
            let pid = pid_arg(pid)?;
            let out = out.ok_or_else(|| usage("migrate needs -o IMAGE"))?;
            migrate_to_host(pid, &out, to.as_deref().unwrap_or_default(), output)
        }
        ("migrate", [pid]) => {
            let pid = pid_arg(pid)?;
            let out = out.ok_or_else(|| usage("migrate needs -o IMAGE"))?;
            let netns = netns.ok_or_else(|| usage("migrate needs --netns NAME"))?;
            let krun = std::env::current_exe().map_err(|e| LauncherError::Io {
                context: "locating krun".into(),
                source: e,
            })?;
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
            Ok(format!(
                "migrated pid {pid} to netns {netns}: now pid {}",
                r.pid
            ))
        }
        _ => Err(usage(&format!(
            "unknown or incomplete: krun ghost {}",
            args.join(" ")
        ))),
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
