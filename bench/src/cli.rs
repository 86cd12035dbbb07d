//! The `bench` command line: one subcommand per bench, each bench's options a clap `Args`
//! struct in its own module, and the hidden worker subcommands the benches re-execute this
//! binary as.
use clap::{Parser, Subcommand};

use crate::{
    ckpt, dsm, fabric, faults, ha, l4, launch, launch_slurm, locator, logging, mgs, policies, rank,
    reconfig,
};

/// krun benchmarks. Every subcommand prints a table and writes its JSON with an
/// "environment" (commit, UTC date, kernel, CPUs) and a PNG plot beside it (same name, .png).
#[derive(Debug, Parser)]
#[command(name = "bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Fabric(fabric::FabricArgs),
    Dsm(dsm::DsmArgs),
    Mgs(mgs::MgsArgs),
    Launch(launch::LaunchArgs),
    LaunchSlurm(launch_slurm::LaunchSlurmArgs),
    Ckpt(ckpt::CkptArgs),
    L4(l4::L4Args),
    Locator(locator::LocatorArgs),
    Reconfig(reconfig::ReconfigArgs),
    Ha(ha::HaArgs),
    Faults(faults::FaultsArgs),
    Policies(policies::PoliciesArgs),
    Rank(rank::RankArgs),
    Logging(logging::LoggingArgs),
    /// Hidden: the target process `bench fabric` re-executes itself as.
    #[command(hide = true)]
    FabricTarget(fabric::TargetArgs),
    /// Hidden: the daemons `bench reconfig` starts.
    #[command(hide = true)]
    AdaptNode(reconfig::NodeArgs),
    /// Hidden: rank 1 of `bench rank`.
    #[command(hide = true)]
    RankWorker(rank::WorkerArgs),
    /// Hidden: rank 1 of `bench logging`.
    #[command(hide = true)]
    LoggingWorker(logging::WorkerArgs),
}

impl Command {
    /// The subcommand's name, for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Fabric(_) => "fabric",
            Command::Dsm(_) => "dsm",
            Command::Mgs(_) => "mgs",
            Command::Launch(_) => "launch",
            Command::LaunchSlurm(_) => "launch-slurm",
            Command::Ckpt(_) => "ckpt",
            Command::L4(_) => "l4",
            Command::Locator(_) => "locator",
            Command::Reconfig(_) => "reconfig",
            Command::Ha(_) => "ha",
            Command::Faults(_) => "faults",
            Command::Policies(_) => "policies",
            Command::Rank(_) => "rank",
            Command::Logging(_) => "logging",
            Command::FabricTarget(_) => "fabric-target",
            Command::AdaptNode(_) => "adapt-node",
            Command::RankWorker(_) => "rank-worker",
            Command::LoggingWorker(_) => "logging-worker",
        }
    }

    /// Runs the subcommand.
    pub fn run(self) -> Result<(), String> {
        match self {
            Command::Fabric(a) => fabric::run(a),
            Command::Dsm(a) => dsm::run(a),
            Command::Mgs(a) => mgs::run(a),
            Command::Launch(a) => launch::run(a),
            Command::LaunchSlurm(a) => launch_slurm::run(a),
            Command::Ckpt(a) => ckpt::run(a),
            Command::L4(a) => l4::run(a),
            Command::Locator(a) => locator::run(a),
            Command::Reconfig(a) => reconfig::run(a),
            Command::Ha(a) => ha::run(a),
            Command::Faults(a) => faults::run(a),
            Command::Policies(a) => policies::run(a),
            Command::Rank(a) => rank::run(a),
            Command::Logging(a) => logging::run(a),
            Command::FabricTarget(a) => fabric::target(a),
            Command::AdaptNode(a) => reconfig::node(a),
            Command::RankWorker(a) => rank::worker(a),
            Command::LoggingWorker(a) => logging::worker(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn defaults_are_kept() {
        let Command::Rank(r) = parse(&["rank"]).unwrap().command else {
            panic!("not rank");
        };
        assert_eq!(
            (r.providers.as_str(), r.runs, r.quick),
            ("shm,tcp", 3, false)
        );
        assert!(r.out.is_none());
        let Command::Locator(l) = parse(&["locator", "--entries", "5"]).unwrap().command else {
            panic!("not locator");
        };
        assert_eq!(l.entries, 5);
        let Command::Policies(p) = parse(&["policies", "--simulate", "--sim-runs=7"])
            .unwrap()
            .command
        else {
            panic!("not policies");
        };
        assert!(p.simulate);
        assert_eq!(
            (p.sim_runs, p.intervals.as_str(), p.seed),
            (7, "1,2,4", 20261206)
        );
    }

    #[test]
    fn unknown_flags_get_a_suggestion_and_bad_numbers_an_error() {
        let e = parse(&["rank", "--quik"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::UnknownArgument);
        assert!(e.to_string().contains("--quick"), "{e}");
        let e = parse(&["locator", "--entries", "many"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(parse(&["rank", "positional"]).is_err());
    }

    #[test]
    fn hidden_workers_parse_what_the_benches_pass() {
        let c = parse(&[
            "rank-worker",
            "--provider",
            "shm",
            "--mode",
            "raw",
            "--bootstrap",
            "127.0.0.1:5000",
            "--quick",
        ])
        .unwrap();
        assert_eq!(c.command.name(), "rank-worker");
        let c = parse(&[
            "dsm",
            "--worker",
            "--provider",
            "tcp",
            "--rank",
            "2",
            "--pages",
            "8",
            "--bootstrap",
            "127.0.0.1:1",
        ])
        .unwrap();
        let Command::Dsm(d) = c.command else {
            panic!("not dsm");
        };
        assert!(d.worker && d.rank == Some(2) && d.pages == 8);
        // A worker without its rank is refused.
        assert!(parse(&["dsm", "--worker", "--provider", "tcp"]).is_err());
        let c = parse(&[
            "mgs",
            "--worker",
            "--rank",
            "1",
            "--size",
            "3",
            "--n",
            "64",
            "--locator",
            "dynamic",
            "--bootstrap",
            "127.0.0.1:1",
        ])
        .unwrap();
        let Command::Mgs(m) = c.command else {
            panic!("not mgs");
        };
        assert!(m.worker && m.size == Some(3) && m.locator.as_deref() == Some("dynamic"));
        assert!(parse(&["mgs", "--worker", "--rank", "1"]).is_err());
        let Command::Mgs(m) = parse(&["mgs", "--quick"]).unwrap().command else {
            panic!("not mgs");
        };
        assert!(m.quick && m.runs.is_none() && m.sizes.is_none());
        let c = parse(&["adapt-node", "--id", "3", "--listen", "127.0.0.1:1"]).unwrap();
        let Command::AdaptNode(n) = c.command else {
            panic!("not adapt-node");
        };
        assert_eq!(n.args, ["--id", "3", "--listen", "127.0.0.1:1"]);
    }
}
