use super::*;
use crate::contract::Severity;

fn parse(text: &str) -> Result<Settings, Vec<String>> {
    Settings::parse(text, Path::new("/etc/rw"), &Overrides::default())
}

#[test]
fn example_file_is_valid() {
    let text = include_str!("../../deploy/standalone.example.toml");
    let s = parse(text).unwrap();
    assert!(!s.images.is_empty());
}

#[test]
fn defaults_apply() {
    let s = parse("").unwrap();
    assert_eq!(s.containerd_socket, PathBuf::from(DEFAULT_SOCKET));
    assert_eq!(s.namespace, "k8s.io");
    assert_eq!(s.prewarm, PrewarmSettings::default());
    assert_eq!(s.findings, "-");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
        [prewarm]
        concurrency = 0
        stall_timeout = "soon"
        backoff_initial = "10m"
        backoff_max = "1m"
        [report]
        metrics_address = "nowhere"
        [[images]]
        image = "quay.io/A/b"
        [[images]]
        image = "quay.io/a/b:v1"
        [[images]]
        image = "quay.io/a/b:v1"
    "#;
    let problems = parse(text).unwrap_err();
    let all = problems.join("\n");
    for want in [
        "prewarm.concurrency",
        "prewarm.stall_timeout",
        "prewarm.backoff_initial",
        "report.metrics_address",
        "images[0].image",
        "images[2].image",
    ] {
        assert!(all.contains(want), "missing {want} in:\n{all}");
    }
    assert_eq!(problems.len(), 6, "{all}");
}

#[test]
fn unknown_keys_are_rejected_with_their_name() {
    let problems = parse("[prewarm]\nconcurency = 2\n").unwrap_err();
    assert!(problems[0].contains("concurency"), "{problems:?}");
}

#[test]
fn secret_paths_resolve_against_the_config_directory() {
    let s =
        parse("[[images]]\nimage = \"a.io/b:c\"\npull_secret = \"s.json\"\nproject = \"team\"\n")
            .unwrap();
    assert_eq!(
        s.images[0].pull_secret.as_deref(),
        Some(Path::new("/etc/rw/s.json"))
    );
    assert_eq!(s.images[0].projects.first(), Some("team"));
}

#[test]
fn audit_section_is_validated() {
    let s = parse("[audit]\nexpected_major = 2\n[audit.severity]\nstop-signal = \"warning\"\n")
        .unwrap();
    assert_eq!(s.audit.policy.expected_major, 2);
    assert_eq!(s.audit.policy.severities["stop-signal"], Severity::Warning);
    let problems = parse(
        "[audit]\nlabel_keys = []\n[audit.severity]\nno-such = \"warning\"\nsetuid-files = \"fatal\"\n",
    )
    .unwrap_err();
    let all = problems.join("\n");
    assert_eq!(problems.len(), 3, "{all}");
    assert!(
        all.contains("unknown check \"no-such\"") && all.contains("\"fatal\" is neither"),
        "{all}"
    );
}

#[test]
fn kubernetes_section_and_the_platform_environment() {
    let mut s = parse("[kubernetes]\nenabled = true\nallowed_registries = [\" Quay.io \"]\nagent_registry = \"ac/ambient-agent-registry\"\n")
        .unwrap()
        .kubernetes;
    assert!(s.enabled);
    assert_eq!(s.allowed_registries, ["quay.io"]);
    assert_eq!(
        s.agent_registry,
        Some(("ac".into(), "ambient-agent-registry".into()))
    );
    assert!(s.validate().unwrap_err().contains("NODE_NAME"));
    let env = |k: &str| match k {
        "NODE_NAME" => Some("node-1".to_string()),
        "CUSTOM_RUNNER_IMAGE_ENABLED" => Some("1".into()),
        "RUNNER_IMAGE_ALLOWED_REGISTRIES" => Some("a.io,B.io".into()),
        "RUNNER_IMAGE" => Some("quay.io/ambient_code/vteam_claude_runner:latest".into()),
        "POD_NAMESPACE" => Some("ops".into()),
        _ => None,
    };
    s.apply_env(env);
    assert_eq!(s.node_name, "node-1");
    assert!(s.custom_runner_image_enabled);
    assert_eq!(s.allowed_registries, ["a.io", "b.io"]);
    assert_eq!(s.default_images.len(), 1);
    assert_eq!(s.lease_namespace, "ops");
    assert!(s.validate().is_ok());
    let e = parse("[kubernetes]\nagent_registry = \"x\"\ndefault_images = [\"Bad Ref\"]\n")
        .unwrap_err();
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn secret_refresh_defaults_to_five_minutes_and_is_at_least_a_second() {
    let k = |text: &str| parse(text).map(|s| s.kubernetes.secret_refresh);
    assert_eq!(k("").unwrap(), Duration::from_secs(300));
    assert_eq!(
        k("[kubernetes]\nsecret_refresh = \"90s\"\n").unwrap(),
        Duration::from_secs(90)
    );
    // Written in the file, it also polls; the default reads a secret again only when a pull needs it.
    let poll = |text: &str| parse(text).map(|s| s.kubernetes.secret_poll).unwrap();
    assert!(!poll(""));
    assert!(poll("[kubernetes]\nsecret_refresh = \"5m\"\n"));
    for bad in ["\"500ms\"", "\"soon\""] {
        let e = k(&format!("[kubernetes]\nsecret_refresh = {bad}\n")).unwrap_err();
        assert!(e[0].contains("kubernetes.secret_refresh"), "{e:?}");
    }
}

#[test]
fn session_images_are_on_by_default_and_forgotten_after_a_week_at_least_an_hour() {
    let s = parse("").unwrap();
    assert!(s.kubernetes.session_images);
    assert_eq!(
        s.kubernetes.session_images_forget,
        Duration::from_secs(7 * 24 * 3600)
    );
    let s =
        parse("[kubernetes]\nsession_images = false\nsession_images_forget = \"2d\"\n").unwrap();
    assert!(!s.kubernetes.session_images);
    assert_eq!(
        s.kubernetes.session_images_forget,
        Duration::from_secs(2 * 24 * 3600)
    );
    for bad in ["\"10m\"", "\"later\""] {
        let e = parse(&format!("[kubernetes]\nsession_images_forget = {bad}\n")).unwrap_err();
        assert!(e[0].contains("kubernetes.session_images_forget"), "{e:?}");
    }
}

#[test]
fn shutdown_section_is_validated() {
    let s = parse("[shutdown]\nslow_fraction = 0.8\nstop_records = \"stops\"\n").unwrap();
    assert_eq!(s.shutdown.slow_fraction, 0.8);
    assert_eq!(s.shutdown.stop_records, PathBuf::from("/etc/rw/stops"));
    let e = parse("[shutdown]\nslow_fraction = 1.5\nstop_records = \"\"\n").unwrap_err();
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].contains("shutdown.slow_fraction"), "{e:?}");
}

#[test]
fn runtime_audit_section_is_validated() {
    let s = parse("[runtime_audit]\ninterval = \"1s\"\nuid_range = \"1000680000/10000\"\ncontainers = [\"runner\"]\n").unwrap();
    assert_eq!(s.runtime_audit.interval, Duration::from_secs(1));
    assert_eq!(
        s.runtime_audit.scan.uid_policy.range,
        Some((1000680000, 1000689999))
    );
    assert_eq!(s.runtime_audit.scan.containers, ["runner"]);
    let problems =
        parse("[runtime_audit]\ninterval = \"1ms\"\nuid_range = \"x\"\ncontainers = []\n")
            .unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn overrides_win() {
    let o = Overrides {
        containerd_socket: Some("/tmp/c.sock".into()),
        metrics_address: Some("127.0.0.1:1".into()),
        findings: Some("/tmp/f.jsonl".into()),
        concurrency: Some(5),
        ..Overrides::default()
    };
    let s = Settings::parse("[prewarm]\nconcurrency = 1\n", Path::new("/"), &o).unwrap();
    assert_eq!(s.containerd_socket, PathBuf::from("/tmp/c.sock"));
    assert_eq!(s.metrics_address.port(), 1);
    assert_eq!(s.findings, "/tmp/f.jsonl");
    assert_eq!(s.prewarm.concurrency, 5);
}

#[test]
fn a_reload_names_every_section_that_changed() {
    let a = parse("[[images]]\nimage = \"a.io/b:c\"\n").unwrap();
    assert!(a.changes(&a.clone()).is_empty());
    let b = parse(
        "[audit]\nexpected_major = 2\n[runtime_audit]\ninterval = \"5s\"\n[shutdown]\nslow_fraction = 0.9\n[kubernetes]\nlease_namespace = \"x\"\n[report]\nfindings = \"/tmp/f\"\n[containerd]\nnamespace = \"other\"\n[prewarm]\npin = false\n",
    )
    .unwrap();
    assert_eq!(
        a.changes(&b),
        [
            "containerd",
            "report",
            "prewarm",
            "audit",
            "runtime_audit",
            "shutdown",
            "kubernetes",
            "images"
        ]
    );
}

#[test]
fn loading_overlays_the_platform_environment_and_validates_the_cluster_side() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[kubernetes]\nenabled = true\n").unwrap();
    let none = |_: &str| None;
    let e = Settings::load(Some(&path), &Overrides::default(), none).unwrap_err();
    assert!(e.to_string().contains("NODE_NAME"), "{e}");
    let env = |k: &str| (k == "NODE_NAME").then(|| "node-1".to_string());
    let s = Settings::load(Some(&path), &Overrides::default(), env).unwrap();
    assert_eq!(s.kubernetes.node_name, "node-1");
    // --kubernetes turns the cluster on whatever the file says.
    std::fs::write(&path, "").unwrap();
    let o = Overrides {
        kubernetes: true,
        ..Overrides::default()
    };
    assert!(
        Settings::load(Some(&path), &o, env)
            .unwrap()
            .kubernetes
            .enabled
    );
    assert!(
        !Settings::load(Some(&path), &Overrides::default(), env)
            .unwrap()
            .kubernetes
            .enabled
    );
}

#[test]
fn toml_problems_are_all_reported_in_the_configs_words_with_lines() {
    let text = "[prewarm]\nconcurrency = \"two\"\nconcurency = 2\npin = 3\n[[images]]\npull_secret = \"s.json\"\n[[images]]\nimage = \"Bad Ref\"\n";
    let p = parse(text).unwrap_err();
    let all = p.join("\n");
    assert_eq!(p.len(), 5, "{all}");
    assert!(
        all.contains(
            "line 2: prewarm.concurrency: expected an integer (e.g. 2), found string \"two\""
        ),
        "{all}"
    );
    assert!(
        all.contains("line 3: prewarm.concurency: unknown key `concurency`"),
        "{all}"
    );
    assert!(
        all.contains("line 4: prewarm.pin: expected true or false"),
        "{all}"
    );
    assert!(all.contains("images[0].image: missing"), "{all}");
    assert!(
        all.contains("images[1].image: invalid image reference"),
        "{all}"
    );
    assert!(!all.contains("i64"), "no Rust in messages: {all}");
}

#[test]
fn a_broken_toml_line_is_reported_with_its_line() {
    let p = parse("[prewarm]\nconcurrency = 2\n[report\n").unwrap_err();
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(p[0].starts_with("line 3:"), "{p:?}");
}

#[test]
fn listen_addresses_take_ips_and_localhost_without_a_lookup() {
    let a = |s: &str| super::listen_address(s);
    assert_eq!(a("127.0.0.1:9477").unwrap().to_string(), "127.0.0.1:9477");
    assert_eq!(a(" 0.0.0.0:1 ").unwrap().to_string(), "0.0.0.0:1");
    assert_eq!(a("[::1]:9477").unwrap().to_string(), "[::1]:9477");
    assert_eq!(a("localhost:9477").unwrap().to_string(), "127.0.0.1:9477");
    for bad in [
        "nowhere",
        "localhost",
        "localhost:",
        "localhost:99999",
        "example.com:80",
        ":9477",
    ] {
        let e = a(bad).unwrap_err();
        assert!(e.contains("is not host:port"), "{bad}: {e}");
    }
}

#[test]
fn the_node_caps_are_validated() {
    let s = parse("[prewarm]\nmax_images = 7\nmax_pinned_bytes = \"200GiB\"").unwrap();
    assert_eq!(s.prewarm.caps.images, 7);
    assert_eq!(s.prewarm.caps.bytes, Some(200 << 30));
    let s = parse("[prewarm]\nmax_pinned_bytes = \"500 GB\"").unwrap();
    assert_eq!(s.prewarm.caps.bytes, Some(500_000_000_000));
    assert_eq!(s.prewarm.caps.images, 50, "the default image cap");
    let problems = parse("[prewarm]\nmax_images = 0\nmax_pinned_bytes = \"lots\"").unwrap_err();
    assert!(
        problems.contains(&"prewarm.max_images: 0 is out of range; use 1 to 10000".to_string()),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("prewarm.max_pinned_bytes: \"lots\" is not a size")),
        "{problems:?}"
    );
    let problems = parse("[prewarm]\nmax_pinned_bytes = \"0\"").unwrap_err();
    assert!(
        problems[0].contains("must be greater than zero"),
        "{problems:?}"
    );
}

#[test]
fn the_audit_cache_is_an_absolute_directory_or_none() {
    assert_eq!(parse("").unwrap().audit.cache_dir, None);
    let s = parse("[audit]\ncache_dir = \"/var/lib/runner-warden/audits\"").unwrap();
    assert_eq!(
        s.audit.cache_dir.as_deref(),
        Some(Path::new("/var/lib/runner-warden/audits"))
    );
    let problems = parse("[audit]\ncache_dir = \"audits\"").unwrap_err();
    assert!(
        problems[0].starts_with("audit.cache_dir: audits must be an absolute path"),
        "{problems:?}"
    );
}

#[test]
fn fleet_section_defaults_and_bounds() {
    let s = parse("").unwrap();
    assert!(s.fleet.node_status);
    assert_eq!(s.fleet.heartbeat, Duration::from_secs(600));
    let s = parse("[fleet]\nnode_status = false\nheartbeat = \"30s\"\n").unwrap();
    assert!(!s.fleet.node_status);
    assert_eq!(s.fleet.heartbeat, Duration::from_secs(30));
    for bad in ["\"5s\"", "\"soon\""] {
        let e = parse(&format!("[fleet]\nheartbeat = {bad}\n")).unwrap_err();
        assert!(e[0].contains("fleet.heartbeat"), "{e:?}");
    }
    assert!(parse("[fleet]\nbogus = 1\n").is_err());
}

#[test]
fn tags_are_resolved_centrally_by_default_with_an_hourly_fallback() {
    let s = parse("").unwrap().fleet;
    assert!(s.central_tags);
    assert_eq!(s.fallback_resolve_interval, Duration::from_secs(3600));
    let s = parse("[fleet]\ncentral_tags = false\nfallback_resolve_interval = \"2h\"\n")
        .unwrap()
        .fleet;
    assert!(!s.central_tags);
    assert_eq!(s.fallback_resolve_interval, Duration::from_secs(7200));
    for bad in ["\"30s\"", "\"later\""] {
        let e = parse(&format!("[fleet]\nfallback_resolve_interval = {bad}\n")).unwrap_err();
        assert!(e[0].contains("fleet.fallback_resolve_interval"), "{e:?}");
    }
}

#[test]
fn the_pull_budget_defaults_to_ten_and_the_environment_wins() {
    assert_eq!(parse("").unwrap().fleet.max_nodes_pulling, 10);
    let f = |text: &str| parse(text).map(|s| s.fleet.max_nodes_pulling);
    assert_eq!(f("[fleet]\nmax_nodes_pulling = 0\n").unwrap(), 0);
    assert_eq!(f("[fleet]\nmax_nodes_pulling = 2\n").unwrap(), 2);
    for bad in ["-1", "1001", "\"two\""] {
        let e = f(&format!("[fleet]\nmax_nodes_pulling = {bad}\n")).unwrap_err();
        assert!(e[0].contains("fleet.max_nodes_pulling"), "{e:?}");
    }
    let mut s = parse("[fleet]\nmax_nodes_pulling = 2\n").unwrap().fleet;
    let env = |v: &'static str| {
        move |k: &str| (k == "RUNNER_WARDEN_MAX_NODES_PULLING").then(|| v.to_string())
    };
    s.apply_env(env(" ")).unwrap();
    assert_eq!(s.max_nodes_pulling, 2, "blank: the file's value");
    s.apply_env(env("0")).unwrap();
    assert_eq!(s.max_nodes_pulling, 0);
    s.apply_env(env("5")).unwrap();
    assert_eq!(s.max_nodes_pulling, 5);
    for bad in ["five", "-3", "100000"] {
        let e = s.apply_env(env(bad)).unwrap_err();
        assert!(e.starts_with("RUNNER_WARDEN_MAX_NODES_PULLING: "), "{e}");
    }
    assert_eq!(s.max_nodes_pulling, 5);
}

#[test]
fn credential_providers_are_read_at_start_both_paths_or_neither() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let plugin = bin.join("ecr-credential-provider");
    std::fs::write(&plugin, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("providers.json"),
        r#"{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"ecr-credential-provider","matchImages":["*.dkr.ecr.*.amazonaws.com"],"defaultCacheDuration":"12h","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}"#,
    )
    .unwrap();
    let f = |text: &str| Settings::parse(text, dir.path(), &Overrides::default());
    assert_eq!(f("").unwrap().credential_providers, None, "none by default");
    let s = f("[credential_providers]\nconfig = \"providers.json\"\nbin_dir = \"bin\"\ntimeout = \"5s\"\n")
        .unwrap()
        .credential_providers
        .unwrap();
    assert_eq!(
        s.config,
        dir.path().join("providers.json"),
        "relative to the file"
    );
    assert_eq!(s.timeout, Duration::from_secs(5));
    assert_eq!(s.providers[0].name, "ecr-credential-provider");
    let e = f("[credential_providers]\nconfig = \"providers.json\"\n").unwrap_err();
    assert!(
        e[0].contains("credential_providers.bin_dir is required"),
        "{e:?}"
    );
    let e = f("[credential_providers]\nbin_dir = \"bin\"\ntimeout = \"2h\"\n").unwrap_err();
    assert_eq!(e.len(), 2, "{e:?}");
    let e =
        f("[credential_providers]\nconfig = \"missing.yaml\"\nbin_dir = \"bin\"\n").unwrap_err();
    assert!(e[0].contains("missing.yaml: cannot read it"), "{e:?}");

    // The DaemonSet's environment names the node's files over the file's.
    let env = |k: &str| match k {
        "RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG" => {
            Some(dir.path().join("providers.json").display().to_string())
        }
        "RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR" => Some(bin.display().to_string()),
        _ => None,
    };
    let s = Settings::load(None, &Overrides::default(), env).unwrap();
    assert_eq!(s.credential_providers.unwrap().bin_dir, bin);
    let half =
        |k: &str| (k == "RUNNER_WARDEN_CREDENTIAL_PROVIDER_CONFIG").then(|| "/x".to_string());
    let e = Settings::load(None, &Overrides::default(), half)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("RUNNER_WARDEN_CREDENTIAL_PROVIDER_BIN_DIR is required"),
        "{e}"
    );
}
