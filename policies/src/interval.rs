//! The checkpoint interval from the checkpoint cost and the mean time between failures.
//!
//! - Young (1974): `τ = sqrt(2 δ M)`.
//! - Daly, "A higher order estimate of the optimum checkpoint interval for restart dumps",
//!   FGCS 22 (2006), eq. (37): for `δ < 2M`,
//!   `τ = sqrt(2 δ M) · [1 + (1/3)·sqrt(δ/(2M)) + (1/9)·(δ/(2M))] − δ`, and `τ = M` otherwise.
//!   The restart time `R` does not move the optimum; it enters the expected wall time
//!   (eq. (20)): `T_w = M · e^(R/M) · (e^((τ+δ)/M) − 1) · T_s / τ`.
//!
//! `δ` is the time the application is held for one checkpoint, `M` the job's MTBF (the node
//! MTBF divided by the number of nodes), all in seconds.
use crate::PolicyError;

fn check(name: &str, x: f64) -> Result<f64, PolicyError> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(PolicyError::Config(format!(
            "{name} must be a positive number of seconds, not {x}"
        )))
    }
}

/// Young's first-order interval.
pub fn young(checkpoint_s: f64, mtbf_s: f64) -> Result<f64, PolicyError> {
    let d = check("checkpoint cost", checkpoint_s)?;
    let m = check("MTBF", mtbf_s)?;
    Ok((2.0 * d * m).sqrt())
}

/// Daly's higher-order interval (compute time between two checkpoints).
pub fn daly(checkpoint_s: f64, mtbf_s: f64) -> Result<f64, PolicyError> {
    let d = check("checkpoint cost", checkpoint_s)?;
    let m = check("MTBF", mtbf_s)?;
    if d >= 2.0 * m {
        return Ok(m);
    }
    let r = d / (2.0 * m);
    Ok((2.0 * d * m).sqrt() * (1.0 + r.sqrt() / 3.0 + r / 9.0) - d)
}

/// Daly's expected wall time of a job that computes `solve_s` seconds, checkpointing every
/// `interval_s` at cost `checkpoint_s`, restarting in `restart_s`, with MTBF `mtbf_s`.
pub fn expected_wall_time(
    solve_s: f64,
    interval_s: f64,
    checkpoint_s: f64,
    restart_s: f64,
    mtbf_s: f64,
) -> Result<f64, PolicyError> {
    let ts = check("solve time", solve_s)?;
    let tau = check("interval", interval_s)?;
    let d = check("checkpoint cost", checkpoint_s)?;
    let m = check("MTBF", mtbf_s)?;
    if !(restart_s.is_finite() && restart_s >= 0.0) {
        return Err(PolicyError::Config(format!(
            "restart time must be zero or a positive number of seconds, not {restart_s}"
        )));
    }
    Ok(m * (restart_s / m).exp() * ((tau + d) / m).exp_m1() * ts / tau)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: f64 = 60.0;
    const HOUR: f64 = 3600.0;

    #[test]
    fn daly_worked_example_mtbf_24_hours_gives_117_minutes() {
        let tau = daly(5.0 * MIN, 24.0 * HOUR).unwrap();
        assert_eq!((tau / MIN).round(), 117.0, "{} min", tau / MIN);
    }

    #[test]
    fn daly_worked_example_mtbf_6_hours_gives_57_minutes() {
        let tau = daly(5.0 * MIN, 6.0 * HOUR).unwrap();
        assert_eq!((tau / MIN).round(), 57.0, "{} min", tau / MIN);
    }

    #[test]
    fn young_is_the_first_order_term() {
        // sqrt(2 * 5 * 1440) = 120 minutes; Daly's correction lowers it by about 3.
        assert_eq!(young(5.0 * MIN, 24.0 * HOUR).unwrap() / MIN, 120.0);
        assert_eq!(young(5.0 * MIN, 6.0 * HOUR).unwrap() / MIN, 60.0);
    }

    #[test]
    fn daly_interval_is_the_mtbf_when_checkpoints_cost_more_than_two_mtbf() {
        assert_eq!(daly(3.0 * HOUR, HOUR).unwrap(), HOUR);
    }

    #[test]
    fn daly_interval_minimises_the_expected_wall_time() {
        // Restart 10 minutes, as in Daly's examples: it does not move the optimum.
        for mtbf in [6.0 * HOUR, 24.0 * HOUR] {
            let tau = daly(5.0 * MIN, mtbf).unwrap();
            let at = |t: f64| expected_wall_time(100.0 * HOUR, t, 5.0 * MIN, 10.0 * MIN, mtbf);
            let best = at(tau).unwrap();
            for f in [0.5, 0.8, 0.95, 1.05, 1.25, 2.0] {
                assert!(best <= at(tau * f).unwrap(), "interval x{f} beats Daly's");
            }
            // Failures cost: the wall time exceeds the solve time plus the checkpoints.
            assert!(best > 100.0 * HOUR * (1.0 + 5.0 * MIN / tau));
        }
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = daly(0.0, HOUR).unwrap_err().to_string();
        assert!(e.contains("checkpoint cost"), "{e}");
        let e = young(1.0, f64::NAN).unwrap_err().to_string();
        assert!(e.contains("MTBF"), "{e}");
        let e = expected_wall_time(1.0, 1.0, 1.0, -1.0, 1.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("restart time"), "{e}");
    }
}
