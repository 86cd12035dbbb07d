//! `krun ghost ...`: capture, restore, roll back, migrate and inspect ghost processes through
//! the uniform checkpointer API (the backend is chosen from the process or the image).
use crate::error::{LauncherError, Result};
use ghost::checkpointer::{self, CaptureOptions, RestoreOptions};
use std::path::PathBuf;

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
                                              namespace NAME (a node of a namespace cluster)";

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
