//! Seeded failure traces: exponential or Weibull inter-arrival times, the failed node drawn
//! uniformly. The generator is SplitMix64 (Steele, Lea, Flood 2014), written out here so that
//! a seed gives the same trace on every platform and with every version of the workspace's
//! crates (`rand`'s small generators do not promise that).
use crate::PolicyError;

/// SplitMix64: 64 bits of state, full period, passes BigCrush.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1]: never 0, so `ln` of it is finite.
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// The law of the time between two failures.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Distribution {
    Exponential,
    /// Weibull with this shape (`< 1`: failures cluster, as on real machines, e.g. 0.7).
    Weibull {
        shape: f64,
    },
}

impl Distribution {
    /// A sample with mean 1.
    pub fn sample(&self, rng: &mut Rng) -> f64 {
        let e = -rng.unit().ln();
        match *self {
            Distribution::Exponential => e,
            Distribution::Weibull { shape } => e.powf(1.0 / shape) / gamma(1.0 + 1.0 / shape),
        }
    }

    pub fn name(&self) -> String {
        match self {
            Distribution::Exponential => "exponential".into(),
            Distribution::Weibull { shape } => format!("Weibull (shape {shape})"),
        }
    }

    fn check(&self) -> Result<(), PolicyError> {
        match *self {
            Distribution::Weibull { shape } if !(shape.is_finite() && shape > 0.0) => {
                Err(PolicyError::Config(format!(
                    "Weibull shape must be a positive number, not {shape}"
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The gamma function (Lanczos, g = 7, 9 terms; relative error below 1e-13 on x > 0.5).
pub fn gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        return std::f64::consts::PI / ((std::f64::consts::PI * x).sin() * gamma(1.0 - x));
    }
    let x = x - 1.0;
    let t = x + 7.5;
    let mut a = G[0];
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    (2.0 * std::f64::consts::PI).sqrt() * t.powf(x + 0.5) * (-t).exp() * a
}

/// One failure: when (seconds of job time) and which node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Failure {
    pub at_s: f64,
    pub node: u32,
}

/// An endless seeded trace: failures of a system of `nodes` nodes whose MTBF (the whole
/// system's) is `mtbf_s`.
#[derive(Clone, Debug)]
pub struct Trace {
    rng: Rng,
    dist: Distribution,
    mtbf_s: f64,
    nodes: u32,
    t: f64,
}

impl Trace {
    pub fn new(
        dist: Distribution,
        mtbf_s: f64,
        nodes: u32,
        seed: u64,
    ) -> Result<Trace, PolicyError> {
        dist.check()?;
        if !(mtbf_s.is_finite() && mtbf_s > 0.0) {
            return Err(PolicyError::Config(format!(
                "MTBF must be a positive number of seconds, not {mtbf_s}"
            )));
        }
        if nodes == 0 {
            return Err(PolicyError::Config(
                "a trace needs at least one node".into(),
            ));
        }
        Ok(Trace {
            rng: Rng::new(seed),
            dist,
            mtbf_s,
            nodes,
            t: 0.0,
        })
    }
}

impl Iterator for Trace {
    type Item = Failure;
    fn next(&mut self) -> Option<Failure> {
        self.t += self.mtbf_s * self.dist.sample(&mut self.rng);
        Some(Failure {
            at_s: self.t,
            node: self.rng.below(self.nodes),
        })
    }
}

/// `count` failures scaled into `[start_s, end_s]` (for a measured run of known length):
/// inter-arrival times drawn from `dist`, then stretched so that the `count + 1`-th arrival
/// would fall at `end_s`; nodes drawn from `0..nodes`. At least `min_gap_s` between two
/// failures and after `start_s` (a failure must not fall inside the previous recovery).
pub fn scaled_to_run(
    dist: Distribution,
    seed: u64,
    count: usize,
    start_s: f64,
    end_s: f64,
    min_gap_s: f64,
    nodes: u32,
) -> Result<Vec<Failure>, PolicyError> {
    dist.check()?;
    if !(start_s.is_finite() && end_s > start_s && min_gap_s >= 0.0) || nodes == 0 {
        return Err(PolicyError::Config(format!(
            "cannot scale a trace into [{start_s}, {end_s}] s with gaps of {min_gap_s} s on {nodes} nodes"
        )));
    }
    let span = end_s - start_s;
    if (count + 1) as f64 * min_gap_s > span {
        return Err(PolicyError::Config(format!(
            "{count} failures at least {min_gap_s} s apart do not fit in {span:.1} s"
        )));
    }
    let mut rng = Rng::new(seed);
    let gaps: Vec<f64> = (0..=count).map(|_| dist.sample(&mut rng)).collect();
    let total: f64 = gaps.iter().sum();
    // Each gap gets min_gap_s, the rest of the span is shared in proportion to the draws.
    let free = span - (count + 1) as f64 * min_gap_s;
    let mut t = start_s;
    let mut out = Vec::with_capacity(count);
    for g in &gaps[..count] {
        t += min_gap_s + free * g / total;
        out.push(Failure {
            at_s: t,
            node: rng.below(nodes),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_matches_known_values() {
        assert!((gamma(1.0) - 1.0).abs() < 1e-12);
        assert!((gamma(5.0) - 24.0).abs() < 1e-9);
        assert!((gamma(0.5) - std::f64::consts::PI.sqrt()).abs() < 1e-12);
        // Γ(1 + 1/0.7), the Weibull(0.7) mean factor.
        assert!((gamma(1.0 + 1.0 / 0.7) - 1.265_823_5).abs() < 1e-6);
    }

    #[test]
    fn traces_have_the_asked_mean_and_are_seeded() {
        for dist in [
            Distribution::Exponential,
            Distribution::Weibull { shape: 0.7 },
        ] {
            let n = 200_000;
            let last = Trace::new(dist, 100.0, 8, 7).unwrap().nth(n - 1).unwrap();
            let mean = last.at_s / n as f64;
            assert!((mean - 100.0).abs() < 2.0, "{dist:?}: mean {mean}");
            let a: Vec<Failure> = Trace::new(dist, 100.0, 8, 7).unwrap().take(50).collect();
            let b: Vec<Failure> = Trace::new(dist, 100.0, 8, 7).unwrap().take(50).collect();
            let c: Vec<Failure> = Trace::new(dist, 100.0, 8, 8).unwrap().take(50).collect();
            assert_eq!(a, b);
            assert_ne!(a, c);
            assert!(a.iter().all(|f| f.node < 8));
        }
        // Weibull with shape < 1 has more short gaps than the exponential of the same mean.
        let short = |dist| {
            let mut r = Rng::new(3);
            (0..100_000)
                .filter(|_| Distribution::sample(&dist, &mut r) < 0.1)
                .count()
        };
        assert!(short(Distribution::Weibull { shape: 0.7 }) > short(Distribution::Exponential));
    }

    #[test]
    fn a_trace_scaled_to_a_run_fits_it() {
        let f = scaled_to_run(Distribution::Exponential, 5, 2, 3.0, 20.0, 4.0, 3).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f[0].at_s >= 7.0 && f[1].at_s >= f[0].at_s + 4.0 && f[1].at_s <= 16.0);
        assert_eq!(
            f,
            scaled_to_run(Distribution::Exponential, 5, 2, 3.0, 20.0, 4.0, 3).unwrap()
        );
        let e = scaled_to_run(Distribution::Exponential, 5, 5, 0.0, 10.0, 4.0, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("do not fit"), "{e}");
        let e = Trace::new(Distribution::Weibull { shape: 0.0 }, 1.0, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Weibull shape"), "{e}");
    }
}
