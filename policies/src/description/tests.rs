use super::*;

fn parse(text: &str) -> Result<Description, PolicyError> {
    Description::parse("/etc/p.toml", text)
}

/// The error's place (file:line) and key.
fn at(text: &str) -> (String, String, String) {
    match parse(text).unwrap_err() {
        PolicyError::Description { place, key, reason } => (place, key, reason),
        e => panic!("not a description error: {e}"),
    }
}

const FULL: &str = r#"
policy = "coordinated"
interval_ms = 500
commit_level = "L2"
keep_commits = 3
max_restarts = 4
spares = 1
restart = "shrink"
max_ranks_per_node = 4
failure_groups = [[0, 1], [2, 3]]

[levels]
L1 = 1
L2 = 1
L4 = 10

[inject]
failures = ["node=1@3ckpt"]

[params]
cadence = "2"
"#;

#[test]
fn a_full_description_is_read_and_maps_to_the_coordinated_config() {
    let d = parse(FULL).unwrap();
    assert_eq!(d.kind, Kind::Coordinated);
    assert_eq!(d.interval, Some(IntervalChoice::Fixed { ms: 500 }));
    assert_eq!(d.spares, Some(1));
    assert_eq!(d.failure_groups, vec![vec![0, 1], vec![2, 3]]);
    assert_eq!(d.inject, vec![("node=1@3ckpt".to_string(), 18)]);
    assert_eq!(d.params["cadence"], "2");
    let cfg = d.coordinated_config(&Config::default()).unwrap();
    assert_eq!(cfg.keep_commits, 3);
    assert_eq!(cfg.max_restart_attempts, 4);
    assert_eq!(
        cfg.no_spare,
        NoSpare::Survivors {
            max_ranks_per_node: Some(4)
        }
    );
    assert_eq!(
        cfg.levels,
        vec![
            LevelCadence {
                level: Level::L1,
                every: 1
            },
            LevelCadence {
                level: Level::L2,
                every: 1
            },
            LevelCadence {
                level: Level::L4,
                every: 10
            },
        ]
    );
    let shown = d.render(&Config::default());
    assert!(
        shown.contains("every 500 ms") && shown.contains("L4 every 10"),
        "{shown}"
    );
}

#[test]
fn daly_and_a_module_path_relative_to_the_file() {
    let d = parse("module = \"libx.so\"\ndaly = { mtbf_s = 3600.0, initial_ms = 2000 }\n").unwrap();
    assert_eq!(d.kind, Kind::Module(PathBuf::from("/etc/libx.so")));
    assert_eq!(
        d.interval,
        Some(IntervalChoice::Daly {
            mtbf_s: 3600.0,
            initial_ms: 2000
        })
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let (place, key, _) = at("policy = \"coordinated\"\ninterval_ms = = 3\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "interval_ms")
    );
}

#[test]
fn an_unknown_key_names_the_key_and_the_line() {
    let (place, key, reason) = at("policy = \"coordinated\"\n\ninterval = 3\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:3", "interval"),
        "{reason}"
    );
    let (place, key, _) = at("policy = \"coordinated\"\n[logging]\nmessages = true\nfoo = 1\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:4", "logging.foo")
    );
}

#[test]
fn a_value_of_the_wrong_type_names_the_key() {
    let (place, key, reason) = at("policy = \"coordinated\"\nkeep_commits = \"two\"\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "keep_commits")
    );
    assert!(reason.contains("string"), "{reason}");
}

#[test]
fn the_choice_of_policy_is_required_and_unique() {
    let (_, key, reason) = at("interval_ms = 5\n");
    assert_eq!(key, "policy");
    assert!(reason.contains("missing"), "{reason}");
    let (place, key, _) = at("\npolicy = \"coordinated\"\nmodule = \"x.so\"\n");
    assert_eq!((place.as_str(), key.as_str()), ("/etc/p.toml:2", "policy"));
    let (place, key, reason) = at("policy = \"optimistic\"\n");
    assert_eq!((place.as_str(), key.as_str()), ("/etc/p.toml:1", "policy"));
    assert!(reason.contains("unknown policy \"optimistic\""), "{reason}");
    let (_, key, _) = at("module = \" \"\n");
    assert_eq!(key, "module");
}

#[test]
fn intervals_must_be_positive_and_not_both() {
    let (place, key, _) = at("policy = \"coordinated\"\ninterval_ms = 0\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "interval_ms")
    );
    let (_, key, _) = at("policy = \"coordinated\"\ninterval_ms = 5\ndaly = { mtbf_s = 1.0 }\n");
    assert_eq!(key, "daly");
    let (place, key, _) = at("policy = \"coordinated\"\n\ndaly = { mtbf_s = -1.0 }\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:3", "daly.mtbf_s")
    );
    let (_, key, _) = at("policy = \"coordinated\"\ndaly = { mtbf_s = 1.0, initial_ms = -4 }\n");
    assert_eq!(key, "daly.initial_ms");
}

#[test]
fn levels_are_checked() {
    let (place, key, reason) = at("policy = \"coordinated\"\n[levels]\nL1 = 1\nL9 = 2\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:4", "levels.L9")
    );
    assert!(reason.contains("unknown level"), "{reason}");
    let (place, key, _) = at("policy = \"coordinated\"\n[levels]\nL2 = 0\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:3", "levels.L2")
    );
    let (_, key, _) = at("policy = \"coordinated\"\n[levels]\n");
    assert_eq!(key, "levels");
    let (place, key, _) = at("policy = \"coordinated\"\ncommit_level = \"L7\"\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "commit_level")
    );
    // The commit level must be written at every checkpoint.
    let (place, key, reason) =
        at("policy = \"coordinated\"\ncommit_level = \"L4\"\n[levels]\nL2 = 1\nL4 = 10\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "commit_level")
    );
    assert!(reason.contains("every checkpoint"), "{reason}");
}

#[test]
fn counts_and_placement_are_checked() {
    for (text, want_key, line) in [
        ("keep_commits = 0", "keep_commits", 2),
        ("max_restarts = -1", "max_restarts", 2),
        ("spares = -2", "spares", 2),
        ("restart = \"anywhere\"", "restart", 2),
        ("max_ranks_per_node = 2", "max_ranks_per_node", 2),
        (
            "restart = \"shrink\"\nmax_ranks_per_node = 0",
            "max_ranks_per_node",
            3,
        ),
    ] {
        let (place, key, reason) = at(&format!("policy = \"coordinated\"\n{text}\n"));
        assert_eq!(
            (place, key.as_str()),
            (format!("/etc/p.toml:{line}"), want_key),
            "{text}: {reason}"
        );
    }
}

#[test]
fn failure_groups_are_disjoint_and_non_empty() {
    let (place, key, reason) = at("policy = \"coordinated\"\nfailure_groups = [[0, 1], [1, 2]]\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:2", "failure_groups[1]")
    );
    assert!(
        reason.contains("node 1 is in two failure groups"),
        "{reason}"
    );
    let (_, key, _) = at("policy = \"coordinated\"\nfailure_groups = [[]]\n");
    assert_eq!(key, "failure_groups[0]");
    let (_, key, _) = at("policy = \"coordinated\"\nfailure_groups = [[-3]]\n");
    assert_eq!(key, "failure_groups[0]");
}

#[test]
fn inject_and_logging_are_checked() {
    let (place, key, _) = at("policy = \"coordinated\"\n[inject]\nfailures = [\"\"]\n");
    assert_eq!(
        (place.as_str(), key.as_str()),
        ("/etc/p.toml:3", "inject.failures")
    );
    let (_, key, _) = at("policy = \"coordinated\"\n[logging]\nmessages = 1\n");
    assert_eq!(key, "logging.messages");
}

#[test]
fn what_the_coordinated_policy_cannot_do_is_refused_naming_the_key() {
    let d = parse("policy = \"coordinated\"\nrestart = \"in_place\"\n").unwrap();
    let e = d
        .coordinated_config(&Config::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("restart") && e.contains("in_place"), "{e}");
    let d = parse("policy = \"coordinated\"\n[logging]\nmessages = true\n").unwrap();
    let e = d
        .coordinated_config(&Config::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("logging"), "{e}");
}

#[test]
fn a_missing_file_is_an_error_naming_it() {
    let e = Description::load(Path::new("/nonexistent/p.toml")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/p.toml"), "{e}");
}

fn builtin() -> Description {
    Description::builtin(Kind::Coordinated)
}

#[test]
fn dropping_the_only_level_that_holds_the_recovery_line_is_refused() {
    let only_l4 =
        parse("policy = \"coordinated\"\ncommit_level = \"L4\"\n[levels]\nL4 = 1\n").unwrap();
    let e = check_change(
        &builtin(),
        &only_l4,
        &[Level::L1, Level::L2],
        &Config::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, PolicyError::UnsafeChange { reason } if reason.contains("held only at L1, L2")),
        "{e}"
    );
    // Keeping one of them is fine, and so is any change before the first commit.
    let keeps_l2 = parse("policy = \"coordinated\"\n[levels]\nL2 = 1\nL4 = 2\n").unwrap();
    check_change(
        &builtin(),
        &keeps_l2,
        &[Level::L1, Level::L2],
        &Config::default(),
    )
    .unwrap();
    check_change(&builtin(), &only_l4, &[], &Config::default()).unwrap();
}

#[test]
fn changing_spares_or_injections_while_running_is_refused() {
    let spares = parse("policy = \"coordinated\"\nspares = 2\n").unwrap();
    let e = check_change(&builtin(), &spares, &[], &Config::default()).unwrap_err();
    assert!(e.to_string().contains("spares"), "{e}");
    let inject = parse("policy = \"coordinated\"\n[inject]\nfailures = [\"node=1@2s\"]\n").unwrap();
    let e = check_change(&builtin(), &inject, &[], &Config::default()).unwrap_err();
    assert!(e.to_string().contains("inject"), "{e}");
    // The same spares as the job's are fine.
    let mut old = builtin();
    old.spares = Some(2);
    check_change(&old, &spares, &[Level::L2], &Config::default()).unwrap();
}
