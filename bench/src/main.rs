//! `bench <subcommand> [options]`: see [`USAGE`].
use std::process::ExitCode;

const USAGE: &str = "usage: bench <subcommand> [options]

Every subcommand writes its JSON with an \"environment\" (commit, UTC date, kernel, CPUs) and
a PNG plot beside it (same name, .png).

subcommands:
  fabric   one-sided RMA latency and bandwidth per provider (tcp, shm, verbs), against
           loopback iperf3 and memcpy; writes bench/results/fabric.json
           options: --providers tcp,shm,verbs  --lat-ops N  --bw-secs S  --iperf-secs S
                    --quick  --out PATH
  launch   krun starting 1, 16, 64 ranks of /bin/true over 4 local nodes, against
           Open MPI's mpirun in the same run; writes bench/results/launch.json
           options: --runs N  --ranks 1,16,64  --out PATH
  launch-slurm  an MPI hello world (6 ranks, 3 nodes) in the local Slurm lab: krun against
           srun --mpi=pmi2 (MPICH) and --mpi=pmix (Open MPI), both inside salloc; a launcher
           Slurm cannot serve is recorded with the reason; writes
           bench/results/launch_slurm.json (root)  options: --runs N  --limit-secs S  --out PATH
  ckpt     checkpoint/restore of 1 and 4 GiB: criu dump/restore to disk against our CRIU and
           native captures to L1+L2 (buddy memory over RMA) and L4 (io_uring), restores
           from L2 and L4, with dd oflag=direct, memcpy and RMA write references;
           writes bench/results/ckpt.json (root; needs CRIU from scripts/build-criu.sh)
           options: --sizes 1,4  --out PATH
  l4       the L4 disk level alone writing 1 GiB (page-aligned: zero-copy; one byte off:
           through bounce buffers) against dd oflag=direct, round by round;
           writes bench/results/l4.json  options: --rounds N  --dir DIR  --out PATH
  locator  directory-entry placement on 8, 64, 1024 nodes: the cell-tree locator against
           entry % n and rendezvous hashing, on one join and one leave (entries moved, nodes
           touched, balance, lookup ns); writes bench/results/locator.json
           options: --entries N  --out PATH
  reconfig 8 local adaptation daemons holding 1,000,000 entries: a node addition split into
           the paper's phases (start, physical, setting, logical, end) and the repair after
           a SIGKILL, against one request's round trip; writes bench/results/reconfig.json
           options: --entries N  --out PATH
  ha       the coordinated checkpoint policy on the heat stencil (6 ranks, 3 local nodes):
           failure-free overhead without a policy, at an interval and at the Young/Daly
           interval; a node SIGKILLed, restarted onto a spare against relaunching the job
           from its L4 images; optional fault campaign; writes bench/results/ha.json
           options: --runs N  --state-mib M  --job-s S  --interval-s A  --mtbf-s M
                    --campaign N  --seed S  --rma-read-gbs X  --out PATH
  policies the HA policies compared on the heat stencil (6 ranks, 3 local nodes): no policy,
           coordinated, uncoordinated with and without logging (those this krun accepts),
           failure-free and with failures from a seeded trace (krun --inject-failure), beside
           the analytic model and the simulator's replay; --simulate extrapolates the measured
           costs to 1,000-100,000 nodes; writes bench/results/policies.json
           options: --runs N  --state-mib M  --job-s S  --interval-s A  --intervals A,B,C
                    --failures K  --dist exponential|weibull  --shape K  --seed S  --out PATH
                    --simulate [--nodes 1000,10000  --node-mtbf-h H  --solve-h H  --sim-runs N]
  rank     the rank library beside the raw fabric endpoint between two processes: send,
           put, get at 8 B, 4 KiB, 1 MiB over shm and tcp; writes bench/results/rank.json
           options: --providers shm,tcp  --runs N (>= 3)  --quick  --out PATH
  logging  8-byte ping-pong latency of the rank library with sender-based message logging
           against without, between two processes; writes bench/results/logging.json
           options: --provider shm|tcp  --runs N (>= 3)  --batches N  --batch N  --out PATH";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(sub) = args.first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest = &args[1..];
    let result = match sub.as_str() {
        "fabric" => bench::fabric::run(rest),
        "dsm" => bench::dsm::run(rest),
        "launch" => bench::launch::run(rest),
        "launch-slurm" => bench::launch_slurm::run(rest),
        "ha" => bench::ha::run(rest),
        "policies" => bench::policies::run(rest),
        "ckpt" => bench::ckpt::run(rest),
        "reconfig" => bench::reconfig::run(rest),
        // Hidden: the daemons `bench reconfig` starts.
        "adapt-node" => bench::reconfig::node(rest),
        "locator" => bench::locator::run(rest),
        "l4" => bench::l4::run(rest),
        "rank" => bench::rank::run(rest),
        "logging" => bench::logging::run(rest),
        // Hidden: rank 1 of `bench logging`.
        "logging-worker" => bench::logging::worker(rest),
        // Hidden: rank 1 of `bench rank`.
        "rank-worker" => bench::rank::worker(rest),
        // Hidden: the target process `bench fabric` re-executes itself as.
        "fabric-target" => bench::fabric::target(rest),
        "help" | "--help" | "-h" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        other => Err(format!("unknown subcommand {other:?}\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench {sub}: {e}");
            ExitCode::FAILURE
        }
    }
}
