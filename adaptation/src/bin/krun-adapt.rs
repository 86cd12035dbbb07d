//! `krun-adapt`: one node of the adaptation layer (see `adaptation::daemon`).
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--under-krun") {
        let supervisors = match args.get(1..) {
            Some([flag, list]) if flag == "--supervisors" => {
                match list.split(',').map(|s| s.parse()).collect() {
                    Ok(v) => v,
                    Err(_) => {
                        eprintln!("krun-adapt: --supervisors {list:?} is not a list of node ids");
                        return ExitCode::from(2);
                    }
                }
            }
            Some([]) | None => Vec::new(),
            Some(other) => {
                eprintln!(
                    "krun-adapt: unexpected arguments {other:?}\n{}",
                    adaptation::daemon::USAGE
                );
                return ExitCode::from(2);
            }
        };
        return match adaptation::daemon::under_krun(supervisors) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("krun-adapt: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cfg = match adaptation::daemon::DaemonConfig::from_args(&args) {
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
    match adaptation::daemon::run(cfg, secret) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("krun-adapt: {e}");
            ExitCode::FAILURE
        }
    }
}
