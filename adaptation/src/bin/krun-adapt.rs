//! `krun-adapt`: one node of the adaptation layer (see `adaptation::daemon`); its command
//! line is `adaptation::cli::AdaptCli`.
use std::process::ExitCode;

use adaptation::cli::AdaptCli;
use clap::Parser;

fn main() -> ExitCode {
    let cli = AdaptCli::parse();
    if cli.under_krun {
        return match adaptation::daemon::under_krun(cli.supervisors) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("krun-adapt: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match cli.daemon_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("krun-adapt: {e}");
            return ExitCode::from(2);
        }
    };
    let secret = match fabric::secret::ClusterSecret::from_env() {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("krun-adapt: no cluster secret: set KRUN_SECRET_FILE (a 0600 file) or KRUN_SECRET (hex)");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("krun-adapt: cluster secret: {e}");
            return ExitCode::from(2);
        }
    };
    match adaptation::daemon::run_tolerating(cfg, secret, cli.tolerate as usize) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("krun-adapt: {e}");
            ExitCode::FAILURE
        }
    }
}
