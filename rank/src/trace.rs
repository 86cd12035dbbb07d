//! Opt-in time stamps of a rank's start-up steps (`KRUN_TRACE_STEPS=1`), for finding where
//! a recovery's time goes: one stderr line per step,
//! `krun-trace: rank R STEP at UNIX_SECONDS` (krun forwards the rank's stderr).
use std::sync::OnceLock;

/// Whether `KRUN_TRACE_STEPS` is set to something other than `0` or empty.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("KRUN_TRACE_STEPS").is_ok_and(|v| on(&v)))
}

/// The setting's meaning: anything but empty or `0` turns the stamps on.
fn on(value: &str) -> bool {
    let v = value.trim();
    !v.is_empty() && v != "0"
}

/// Prints `krun-trace: rank <rank> <step> at <now>` when tracing is on.
pub fn step(rank: usize, step: &str) {
    if enabled() {
        eprintln!("{}", line(rank, step, now()));
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn line(rank: usize, step: &str, at: f64) -> String {
    format!("krun-trace: rank {rank} {step} at {at:.6}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_or_zero_setting_leaves_the_stamps_off() {
        assert!(!on(""));
        assert!(!on(" 0 "));
        assert!(on("1"));
        assert!(on("yes"));
        assert_eq!(
            line(3, "allgather done", 12.5),
            "krun-trace: rank 3 allgather done at 12.500000"
        );
    }
}
