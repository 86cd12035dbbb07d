//! Starting ranks (clone/exec without copying krund) and forwarding their output (one poll
//! loop per node), end to end through `krun --local`.

mod job_common;
use job_common::run_krun as krun;

#[test]
fn a_program_missing_from_path_is_named_with_the_exec_error() {
    let (code, _, err) = krun(&["-n", "3", "--local", "1", "no-such-program-for-krun"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot start rank 0: no-such-program-for-krun: No such file or directory"),
        "{err}"
    );
}

#[test]
fn a_program_that_may_not_be_run_is_named_with_the_exec_error() {
    let dir = std::env::temp_dir().join(format!("krun-rank-spawn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("not-executable");
    std::fs::write(&f, "#!/bin/sh\necho ran\n").unwrap();
    let path = f.to_str().unwrap();
    let (code, out, err) = krun(&["-n", "2", "--local", "1", path]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_ne!(code, 0);
    assert!(!out.contains("ran"), "{out}");
    assert!(
        err.contains(&format!("cannot start rank 0: {path}: Permission denied")),
        "{err}"
    );
}

#[test]
fn output_written_after_a_rank_exited_is_not_lost() {
    // Each rank exits at once; a process it left behind writes to its stdout and stderr
    // later, while the rank's exit has been reported already.
    let script = "(sleep 0.5; echo late-out-$KRUN_RANK; echo late-err-$KRUN_RANK >&2) & \
                  echo early-$KRUN_RANK";
    let (code, out, err) = krun(&["-n", "6", "--local", "2", "sh", "-c", script]);
    assert_eq!(code, 0, "{err}");
    for rank in 0..6 {
        assert!(out.contains(&format!("early-{rank}\n")), "{out}");
        assert!(out.contains(&format!("late-out-{rank}\n")), "{out}");
        assert!(err.contains(&format!("late-err-{rank}\n")), "{err}");
    }
}

#[test]
fn lines_of_many_ranks_are_never_mixed_even_longer_than_a_pipe_write() {
    // 48 ranks on one node, each 200 lines of 6,000 bytes (longer than PIPE_BUF, so the
    // kernel may hand a line over in pieces), tagged.
    let script = "i=0; pad=$(printf '%06000d' 0); while [ $i -lt 200 ]; do \
                  echo \"r$KRUN_RANK-$i-$pad\"; i=$((i+1)); done";
    let (code, out, err) = krun(&[
        "-n",
        "48",
        "--local",
        "1",
        "--tag-output",
        "--bind-to",
        "none",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(code, 0, "{err}");
    let pad = "0".repeat(6000);
    let mut next = [0usize; 48];
    for line in out.lines() {
        let (tag, body) = line.split_once(' ').expect("a tagged line");
        let rank: usize = tag
            .strip_prefix('[')
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("bad tag in {:.80}", line));
        assert_eq!(
            body,
            format!("r{rank}-{}-{pad}", next[rank]),
            "line of rank {rank} mixed or out of order"
        );
        next[rank] += 1;
    }
    assert_eq!(next, [200usize; 48], "lines lost");
}
