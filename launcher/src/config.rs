//! One configuration surface for krun and krund: a TOML file, `KRUN_*` variables, flags.
//!
//! Sources, lowest precedence first:
//! 1. built-in defaults;
//! 2. `/etc/krun/krun.toml`;
//! 3. `$XDG_CONFIG_HOME/krun/krun.toml` (else `~/.config/krun/krun.toml`);
//! 4. the file named by `KRUN_CONFIG`, if set (a named file that is missing is an error);
//! 5. `KRUN_*` environment variables;
//! 6. command-line flags (applied by each command after [`load`]).
//!
//! Every setting has one TOML key (`section.key`) and one environment variable; the table
//! is [`SETTINGS`]. An unknown section or key, a value of the wrong type, or a value its
//! component refuses is an error naming the file, the line and the key. [`load`] exports
//! each setting that came from a file as its `KRUN_*` variable (unless the variable is
//! already set: the environment wins), so the components, which read their variables, and
//! every process krun starts see the same effective settings. `krun config` prints each
//! setting, its value and where it came from.
//!
//! The cluster secret itself is never a setting here (only the path of its 0600 file), and
//! `krun config` never prints `KRUN_SECRET`.
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{LauncherError, Result};

/// What a setting's value must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A non-negative integer.
    Count,
    /// A positive integer.
    Positive,
    /// Free text (a path, a device name, a host).
    Text,
    /// An IP address.
    Ip,
    /// A fabric provider name (`auto`, `tcp`, `shm`, `verbs`, `verbs-ofi`, `loopback`).
    Provider,
    /// `core`, `numa` or `none`.
    BindTo,
    /// A checkpoint store level: `L1`..`L4` (or `1`..`4`).
    Level,
    /// `true` or `false`.
    Bool,
    /// An HA policy: `coordinated` or `uncoordinated`.
    PolicyKind,
    /// L3 parity sets: `auto`, `off` or a set size >= 2.
    Parity,
}

/// One setting: its TOML key, its variable, what it must be, and what it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setting {
    pub section: &'static str,
    pub key: &'static str,
    pub var: &'static str,
    pub kind: Kind,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

const fn s(
    section: &'static str,
    key: &'static str,
    var: &'static str,
    kind: Kind,
    default: Option<&'static str>,
    help: &'static str,
) -> Setting {
    Setting {
        section,
        key,
        var,
        kind,
        default,
        help,
    }
}

/// Every setting of the runtime.
pub const SETTINGS: &[Setting] = &[
    s(
        "fabric",
        "provider",
        "KRUN_FABRIC_PROVIDER",
        Kind::Provider,
        Some("auto"),
        "fabric provider: auto (verbs if a device exists, else tcp), tcp, shm, verbs, verbs-ofi",
    ),
    s(
        "fabric",
        "timeout_ms",
        "KRUN_FABRIC_TIMEOUT_MS",
        Kind::Positive,
        Some("10000"),
        "every fabric operation completes or fails within this many milliseconds",
    ),
    s(
        "fabric",
        "max_in_flight",
        "KRUN_FABRIC_MAX_IN_FLIGHT",
        Kind::Positive,
        Some("256"),
        "operations in flight per endpoint before posting blocks",
    ),
    s(
        "fabric",
        "max_message",
        "KRUN_FABRIC_MAX_MESSAGE",
        Kind::Positive,
        Some("65536"),
        "largest two-sided message payload in bytes",
    ),
    s(
        "fabric",
        "recv_poll_us",
        "KRUN_FABRIC_RECV_POLL_US",
        Kind::Count,
        Some("0"),
        "microseconds a receive polls for its message before it sleeps (100 for a core per rank)",
    ),
    s(
        "fabric",
        "bind",
        "KRUN_FABRIC_BIND",
        Kind::Ip,
        None,
        "address the fabric endpoint binds (default: where the node reaches the job)",
    ),
    s(
        "fabric",
        "verbs_device",
        "KRUN_FABRIC_VERBS_DEVICE",
        Kind::Text,
        None,
        "RDMA device for the verbs backend (default: the first one)",
    ),
    s(
        "fabric",
        "verbs_gid_index",
        "KRUN_FABRIC_VERBS_GID_INDEX",
        Kind::Count,
        None,
        "GID index for RoCE",
    ),
    s(
        "security",
        "secret_file",
        "KRUN_SECRET_FILE",
        Kind::Text,
        None,
        "path of the cluster secret (a 0600 file); required by krund --listen",
    ),
    s(
        "launcher",
        "krund",
        "KRUN_KRUND",
        Kind::Text,
        None,
        "path of the krund binary (default: beside krun)",
    ),
    s(
        "launcher",
        "ssh",
        "KRUN_SSH",
        Kind::Text,
        Some("ssh"),
        "ssh command for --launch ssh",
    ),
    s(
        "launcher",
        "srun",
        "KRUN_SRUN",
        Kind::Text,
        Some("srun"),
        "srun command inside a Slurm allocation",
    ),
    s(
        "launcher",
        "bootstrap_host",
        "KRUN_BOOTSTRAP_HOST",
        Kind::Ip,
        None,
        "address krun advertises for the job bootstrap (default: found from the route)",
    ),
    s(
        "launcher",
        "bind_to",
        "KRUN_BIND_TO",
        Kind::BindTo,
        Some("core"),
        "rank pinning: core, numa or none",
    ),
    s(
        "ghost",
        "dir",
        "KRUN_GHOST_DIR",
        Kind::Text,
        Some("/dev/shm/krun-ghost"),
        "where native checkpoints write their L1 image files",
    ),
    s(
        "ghost",
        "full_every",
        "KRUN_GHOST_FULL_EVERY",
        Kind::Positive,
        Some("4"),
        "a full native image every N checkpoints (incremental between)",
    ),
    s(
        "ghost",
        "criu",
        "KRUN_CRIU",
        Kind::Text,
        None,
        "the CRIU binary (default: /opt/criu/criu-4.2.1/criu/criu from scripts/build-criu.sh, then PATH)",
    ),
    s(
        "runtime",
        "failure_timeout_ms",
        "KRUN_FAILURE_TIMEOUT_MS",
        Kind::Positive,
        Some("3000"),
        "a node silent this long (no probe answered, no refutation) is declared failed",
    ),
    s(
        "store",
        "arena_mib",
        "KRUN_STORE_ARENA_MIB",
        Kind::Positive,
        Some("64"),
        "memory each node's checkpoint store lends to other nodes' L2 copies and parity (MiB)",
    ),
    s(
        "store",
        "delay_ms",
        "KRUN_STORE_DELAY_MS",
        Kind::Count,
        Some("1000"),
        "how long a node's ranks run before its store opens its fabric endpoint anyway (sooner when a checkpoint or a restart needs it; never when every rank ended first)",
    ),
    s(
        "store",
        "disk",
        "KRUN_STORE_DISK",
        Kind::Text,
        None,
        "directory of the store's L4 copies (unset: no L4)",
    ),
    s(
        "store",
        "level",
        "KRUN_STORE_LEVEL",
        Kind::Level,
        Some("L2"),
        "the level a checkpoint must be safe at before it counts (L1..L4)",
    ),
    s(
        "store",
        "parity",
        "KRUN_STORE_PARITY",
        Kind::Parity,
        Some("auto"),
        "L3 parity sets among the nodes that run ranks: auto (on for 4 or more nodes with as \
         many ranks each, sets of half of them), off, or a set size",
    ),
    s(
        "policy",
        "kind",
        "KRUN_POLICY_KIND",
        Kind::PolicyKind,
        Some("coordinated"),
        "the HA policy: coordinated (global checkpoints) or uncoordinated (each rank on its own schedule)",
    ),
    s(
        "policy",
        "logging",
        "KRUN_POLICY_LOGGING",
        Kind::Bool,
        Some("true"),
        "uncoordinated policy: sender-based message logging (only lost ranks restart) instead of a recovery line",
    ),
];

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: usize },
    Env,
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File { path, line } => write!(f, "{}:{line}", path.display()),
            Origin::Env => f.write_str("environment"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// The effective value of one setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Effective {
    pub setting: &'static Setting,
    pub value: String,
    pub origin: Origin,
}

/// The effective configuration: every setting that has a value.
#[derive(Clone, Debug, Default)]
pub struct Config {
    values: BTreeMap<&'static str, Effective>,
    /// The files read, in order.
    pub files: Vec<PathBuf>,
}

fn bad(path: &Path, line: usize, key: &str, reason: impl Into<String>) -> LauncherError {
    LauncherError::Config {
        place: format!("{}:{line}", path.display()),
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
        + 1
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`).
pub fn parse_bool(v: &str) -> std::result::Result<bool, String> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{v:?} is not true or false")),
    }
}

/// Checks a value as its component will read it; the reason on failure.
fn check(setting: &Setting, value: &str) -> std::result::Result<(), String> {
    let v = value.trim();
    match setting.kind {
        Kind::Count => v
            .parse::<u64>()
            .map(drop)
            .map_err(|_| format!("{v:?} is not a non-negative integer")),
        Kind::Positive => match v.parse::<u64>() {
            Ok(0) | Err(_) => Err(format!("{v:?} is not a positive integer")),
            Ok(_) => Ok(()),
        },
        Kind::Text => {
            if v.is_empty() {
                Err("is empty".into())
            } else {
                Ok(())
            }
        }
        Kind::Ip => v
            .parse::<std::net::IpAddr>()
            .map(drop)
            .map_err(|_| format!("{v:?} is not an IP address")),
        Kind::Provider => v
            .parse::<fabric::ProviderChoice>()
            .map(drop)
            .map_err(|e| e.to_string()),
        Kind::BindTo => v
            .parse::<crate::binding::BindTo>()
            .map(drop)
            .map_err(|e| e.to_string()),
        Kind::Level => crate::runtime::store_node::parse_level(v).map(drop),
        Kind::Bool => parse_bool(v).map(drop),
        Kind::PolicyKind => crate::runtime::checkpoints::PolicyKind::parse(v).map(drop),
        Kind::Parity => crate::runtime::store_node::Parity::parse(v).map(drop),
    }
}

/// The settings of one TOML file, checked.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(&'static Setting, String, usize)>> {
    let doc: toml::Spanned<toml::Table> = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(text, s.start));
        bad(path, line, "(syntax)", e.message().to_string())
    })?;
    // The raw table has no spans for its keys: find each key's line from the text.
    let key_line = |section: &str, key: &str| -> usize {
        let mut in_section = false;
        for (i, l) in text.lines().enumerate() {
            let t = l.trim();
            if t.starts_with('[') {
                in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == section;
            } else if in_section
                && t.split(['=', ' ']).next().map(|k| k.trim_matches('"')) == Some(key)
            {
                return i + 1;
            }
        }
        line_of(text, 0)
    };
    let section_line = |section: &str| -> usize {
        text.lines()
            .position(|l| l.trim().trim_matches(|c| c == '[' || c == ']').trim() == section)
            .map_or(1, |i| i + 1)
    };
    let mut out = Vec::new();
    for (section, table) in doc.get_ref() {
        let Some(table) = table.as_table() else {
            return Err(bad(
                path,
                key_line("", section),
                section,
                format!(
                    "top-level keys are not settings; put them in a section ({})",
                    sections().join(", ")
                ),
            ));
        };
        if !SETTINGS.iter().any(|s| s.section == section) {
            return Err(bad(
                path,
                section_line(section),
                &format!("[{section}]"),
                format!("unknown section (known: {})", sections().join(", ")),
            ));
        }
        for (key, value) in table {
            let name = format!("{section}.{key}");
            let line = key_line(section, key);
            let Some(setting) = SETTINGS
                .iter()
                .find(|s| s.section == section && s.key == key)
            else {
                let known: Vec<&str> = SETTINGS
                    .iter()
                    .filter(|s| s.section == section)
                    .map(|s| s.key)
                    .collect();
                return Err(bad(
                    path,
                    line,
                    &name,
                    format!("unknown key (known in [{section}]: {})", known.join(", ")),
                ));
            };
            let text_value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                other => {
                    return Err(bad(
                        path,
                        line,
                        &name,
                        format!(
                            "expected a string or an integer, found a {}",
                            other.type_str()
                        ),
                    ))
                }
            };
            check(setting, &text_value).map_err(|r| bad(path, line, &name, r))?;
            out.push((setting, text_value, line));
        }
    }
    Ok(out)
}

fn sections() -> Vec<&'static str> {
    let mut v: Vec<&str> = SETTINGS.iter().map(|s| s.section).collect();
    v.dedup();
    v
}

/// The files [`load`] reads, in order (existing or not).
pub fn search_path(get: &dyn Fn(&str) -> Option<String>) -> Vec<(PathBuf, bool)> {
    let mut files = vec![(PathBuf::from("/etc/krun/krun.toml"), false)];
    let xdg = get("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| get("HOME").map(|h| Path::new(&h).join(".config")));
    if let Some(dir) = xdg {
        files.push((dir.join("krun/krun.toml"), false));
    }
    if let Some(p) = get("KRUN_CONFIG").filter(|v| !v.is_empty()) {
        files.push((PathBuf::from(p), true));
    }
    files
}

impl Config {
    /// Builds the effective configuration from the files and the variables `get` returns.
    pub fn resolve(get: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let mut config = Config::default();
        for s in SETTINGS {
            if let Some(d) = s.default {
                config.set(s, d.to_string(), Origin::Default);
            }
        }
        for (path, required) in search_path(get) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => continue,
                Err(e) => {
                    return Err(LauncherError::Io {
                        context: format!("reading the configuration file {}", path.display()),
                        source: e,
                    })
                }
            };
            for (setting, value, line) in parse_file(&path, &text)? {
                config.set(
                    setting,
                    value,
                    Origin::File {
                        path: path.clone(),
                        line,
                    },
                );
            }
            config.files.push(path);
        }
        for s in SETTINGS {
            if let Some(v) = get(s.var).filter(|v| !v.is_empty()) {
                check(s, &v).map_err(|reason| LauncherError::Config {
                    place: "environment".into(),
                    key: s.var.into(),
                    reason,
                })?;
                config.set(s, v, Origin::Env);
            }
        }
        Ok(config)
    }

    fn set(&mut self, setting: &'static Setting, value: String, origin: Origin) {
        self.values.insert(
            setting.var,
            Effective {
                setting,
                value,
                origin,
            },
        );
    }

    /// Records a value given by a command-line flag (highest precedence).
    pub fn set_flag(&mut self, var: &str, value: &str, flag: &str) -> Result<()> {
        let setting = SETTINGS
            .iter()
            .find(|s| s.var == var)
            .ok_or_else(|| LauncherError::Usage(format!("{var} is not a setting")))?;
        check(setting, value).map_err(|reason| LauncherError::Config {
            place: format!("flag {flag}"),
            key: flag.into(),
            reason,
        })?;
        self.set(setting, value.to_string(), Origin::Flag(flag.into()));
        Ok(())
    }

    pub fn get(&self, var: &str) -> Option<&Effective> {
        self.values.get(var)
    }

    /// Every setting with a value, in table order.
    pub fn effective(&self) -> Vec<&Effective> {
        SETTINGS
            .iter()
            .filter_map(|s| self.values.get(s.var))
            .collect()
    }

    /// The variables to export so components and child processes see file settings: those
    /// that came from a file (defaults stay with their components; the environment already
    /// holds its own).
    pub fn exports(&self) -> Vec<(&'static str, String)> {
        self.effective()
            .into_iter()
            .filter(|e| matches!(e.origin, Origin::File { .. } | Origin::Flag(_)))
            .map(|e| (e.setting.var, e.value.clone()))
            .collect()
    }

    /// `krun config`'s text: one line per setting, with its origin; the secret is never shown.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.files.is_empty() {
            out += "# no configuration file found\n";
        }
        for f in &self.files {
            out += &format!("# read {}\n", f.display());
        }
        let mut section = "";
        for s in SETTINGS {
            if s.section != section {
                section = s.section;
                out += &format!("[{section}]\n");
            }
            match self.values.get(s.var) {
                Some(e) => {
                    out += &format!("{} = {:?}    # {} ({})\n", s.key, e.value, e.origin, s.var)
                }
                None => out += &format!("# {} unset ({}): {}\n", s.key, s.var, s.help),
            }
        }
        if std::env::var_os("KRUN_SECRET").is_some() {
            out += "# KRUN_SECRET is set in the environment (value hidden)\n";
        }
        out
    }
}

/// Loads the effective configuration of this process and exports file settings as their
/// variables. Call it at the start of `main`, before any thread starts.
pub fn load() -> Result<Config> {
    let config = Config::resolve(&|k| std::env::var(k).ok())?;
    for (var, value) in config.exports() {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, value);
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "krun-config-test-{}-{}",
            std::process::id(),
            fabric::random_u64().unwrap()
        ));
        std::fs::create_dir_all(d.join("krun")).unwrap();
        d
    }

    fn resolve_with(vars: &[(&str, String)]) -> Result<Config> {
        let vars: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        Config::resolve(&|k| vars.get(k).cloned())
    }

    #[test]
    fn file_then_environment_then_flag_and_each_origin_is_reported() {
        let d = dir();
        let path = d.join("krun/krun.toml");
        std::fs::write(
            &path,
            "# comment\n[fabric]\nprovider = \"shm\"\ntimeout_ms = 250\n\n[ghost]\nfull_every = 2\n",
        )
        .unwrap();
        let mut c = resolve_with(&[
            ("XDG_CONFIG_HOME", d.display().to_string()),
            ("KRUN_GHOST_FULL_EVERY", "8".into()),
        ])
        .unwrap();
        let p = c.get("KRUN_FABRIC_PROVIDER").unwrap();
        assert_eq!(p.value, "shm");
        assert_eq!(
            p.origin,
            Origin::File {
                path: path.clone(),
                line: 3
            }
        );
        assert_eq!(c.get("KRUN_FABRIC_TIMEOUT_MS").unwrap().value, "250");
        let g = c.get("KRUN_GHOST_FULL_EVERY").unwrap();
        assert_eq!((g.value.as_str(), &g.origin), ("8", &Origin::Env));
        assert_eq!(c.get("KRUN_SSH").unwrap().origin, Origin::Default);
        c.set_flag("KRUN_FABRIC_PROVIDER", "tcp", "--provider")
            .unwrap();
        assert_eq!(
            c.get("KRUN_FABRIC_PROVIDER").unwrap().origin,
            Origin::Flag("--provider".into())
        );
        let text = c.render();
        assert!(text.contains("timeout_ms = \"250\""), "{text}");
        assert!(text.contains(&format!("{}:4", path.display())), "{text}");
        assert!(text.contains("flag --provider"), "{text}");
        let exports = c.exports();
        assert!(exports.contains(&("KRUN_FABRIC_TIMEOUT_MS", "250".into())));
        assert!(!exports.iter().any(|(k, _)| *k == "KRUN_GHOST_FULL_EVERY"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_unknown_key_or_section_or_bad_value_names_the_key_and_the_line() {
        let p = Path::new("/x/krun.toml");
        let e = parse_file(p, "[fabric]\nprovider = \"tcp\"\ntimeout = 5\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/x/krun.toml:3") && e.contains("fabric.timeout"),
            "{e}"
        );
        assert!(e.contains("timeout_ms"), "suggests known keys: {e}");
        let e = parse_file(p, "\n\n[fabrik]\nprovider = \"tcp\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3") && e.contains("[fabrik]") && e.contains("unknown section"),
            "{e}"
        );
        let e = parse_file(p, "[fabric]\n\nprovider = \"infiniband\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(":3") && e.contains("fabric.provider") && e.contains("infiniband"),
            "{e}"
        );
        let e = parse_file(p, "[fabric]\ntimeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2") && e.contains("positive"), "{e}");
        let e = parse_file(p, "[fabric]\ntimeout_ms = true\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("boolean"), "{e}");
        let e = parse_file(p, "[launcher]\nbind_to = \"socket\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("launcher.bind_to"), "{e}");
        let e = parse_file(p, "provider = \"tcp\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("section"), "{e}");
        let e = parse_file(p, "[fabric\nprovider = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/x/krun.toml:1") && e.contains("syntax"), "{e}");
        let e = parse_file(p, "[fabric]\nbind = \"10.0.0.300\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fabric.bind") && e.contains("IP"), "{e}");
    }

    #[test]
    fn a_bad_environment_value_and_a_missing_named_file_are_errors() {
        let e = resolve_with(&[("KRUN_FABRIC_MAX_IN_FLIGHT", "many".into())])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("KRUN_FABRIC_MAX_IN_FLIGHT") && e.contains("many"),
            "{e}"
        );
        let e = resolve_with(&[("KRUN_CONFIG", "/nonexistent/krun.toml".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/krun.toml"), "{e}");
    }

    #[test]
    fn every_setting_has_a_valid_default_and_a_unique_variable() {
        for s in SETTINGS {
            if let Some(d) = s.default {
                check(s, d).unwrap_or_else(|e| panic!("{}: {e}", s.var));
            }
            assert_eq!(SETTINGS.iter().filter(|o| o.var == s.var).count(), 1);
            assert!(s.var.starts_with("KRUN_"));
        }
    }
}
