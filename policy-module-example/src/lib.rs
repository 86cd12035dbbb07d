//! An example policy module: the coordinated checkpoint policy at a fixed cadence, built as
//! a shared library (`libpolicy_module_example.so`) against the `policies` crate's C ABI and
//! loaded by krun while a job runs:
//!
//! ```text
//! cargo build -p policy-module-example
//! cat > fixed.toml <<EOT
//! module = "/path/to/target/debug/libpolicy_module_example.so"
//! [params]
//! cadence_ms = "400"
//! EOT
//! krun policy load fixed.toml
//! ```
//!
//! Parameters (`[params]` of the description):
//! - `cadence_ms`: the checkpoint interval (default: the description's `interval_ms`, else
//!   the job's);
//! - `panic`: for experiments on containment: `create` panics while the policy is built,
//!   `event` at its first event, `after:N` at its N-th event, `deadline` when krun asks for
//!   its next deadline (the second time it is asked: the first is for create's answer).
use policies::module::abi::Init;
use policies::policy::Phase;
use policies::primitives::{Action, Costs, Event, Millis, Reads, Version};
use policies::report::Summary;
use policies::{Coordinated, IntervalChoice, Policy};

/// The coordinated policy, checkpointing every `cadence_ms`.
struct FixedCadence {
    inner: Coordinated,
    events: u64,
    /// Panic at this event (1: the first).
    panic_at: Option<u64>,
    /// Panic when asked for the next deadline.
    panic_deadline: bool,
    deadline_calls: std::cell::Cell<u32>,
}

impl Policy for FixedCadence {
    fn name(&self) -> &'static str {
        "example-fixed-cadence"
    }

    fn on_event(&mut self, now: Millis, event: Event, reads: &dyn Reads) -> Vec<Action> {
        self.events += 1;
        if self.panic_at == Some(self.events) {
            panic!(
                "example module: panic asked for at event {} ({event:?})",
                self.events
            );
        }
        self.inner.on_event(now, event, reads)
    }

    fn next_deadline(&self) -> Option<Millis> {
        self.deadline_calls.set(self.deadline_calls.get() + 1);
        if self.panic_deadline && self.deadline_calls.get() >= 2 {
            panic!("example module: panic asked for at next_deadline");
        }
        self.inner.next_deadline()
    }

    fn phase(&self) -> Phase {
        self.inner.phase()
    }

    fn recovery_line(&self) -> Option<Version> {
        self.inner.recovery_line()
    }

    fn costs(&self) -> &Costs {
        self.inner.costs()
    }

    fn summary(&self) -> Summary {
        self.inner.summary()
    }
}

fn create(init: &Init) -> Result<Box<dyn Policy + Send>, String> {
    let mut cfg = init.config.clone();
    if let Some(ms) = init.params.get("cadence_ms") {
        let ms: u64 = ms
            .parse()
            .ok()
            .filter(|&m| m > 0)
            .ok_or_else(|| format!("params.cadence_ms: {ms:?} is not a positive integer"))?;
        cfg.interval = IntervalChoice::Fixed { ms };
    }
    let panic_deadline = init.params.get("panic").is_some_and(|p| p == "deadline");
    let panic_at = match init.params.get("panic").map(String::as_str) {
        None | Some("deadline") => None,
        Some("create") => panic!("example module: panic asked for at create"),
        Some("event") => Some(1),
        Some(other) => match other.strip_prefix("after:").and_then(|n| n.parse().ok()) {
            Some(n) => Some(n),
            None => {
                return Err(format!(
                    "params.panic: {other:?} is not create, event, after:N or deadline"
                ))
            }
        },
    };
    let inner = match &init.snapshot {
        Some(s) => Coordinated::resume(cfg, init.leader, s, init.now),
        None => Coordinated::new(cfg, init.leader, &init.layout, init.view.clone(), init.now),
    }
    .map_err(|e| e.to_string())?;
    Ok(Box::new(FixedCadence {
        inner,
        events: 0,
        panic_at,
        panic_deadline,
        deadline_calls: std::cell::Cell::new(0),
    }))
}

policies::export_policy!(create);
