//! The command line without a test bed: what an operator's first mistakes get back.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_runner-warden");

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("RUNNER_WARDEN_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run runner-warden");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_misspelt_log_level_is_refused_and_names_where_it_came_from() {
    let (code, _, err) = run(&["--log-level", "debgu", "scan"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--log-level: \"debgu\" is neither a level"),
        "{err}"
    );
    let (code, _, err) = run(&["scan"], &[("RUNNER_WARDEN_LOG", "debgu")]);
    assert_eq!(code, 2);
    assert!(err.contains("RUNNER_WARDEN_LOG: \"debgu\""), "{err}");
}

#[test]
fn containerd_unreachable_is_exit_2_with_one_line_naming_the_socket() {
    let sock = "/nonexistent/runner-warden-test.sock";
    for args in [
        vec!["pull", "busybox"],
        vec!["check-image", "busybox"],
        vec!["scan"],
    ] {
        let mut a = args.clone();
        a.extend(["--containerd-socket", sock]);
        let (code, out, err) = run(&a, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line, got:\n{err}");
        assert!(lines[0].contains(sock), "{args:?}: {err}");
        assert!(
            !err.contains("pull failed"),
            "{args:?}: not a pull failure: {err}"
        );
        assert!(out.is_empty() || args[0] == "scan", "{args:?}: {out}");
    }
}

#[test]
fn check_config_lists_every_problem_on_disk_and_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("junk.json"), "not json").unwrap();
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        "[prewarm]\nconcurrency = \"two\"\n[[images]]\nimage = \"r.io/a:1\"\npull_secret = \"junk.json\"\n[[images]]\npull_secret = \"x.json\"\n[report]\nfindings = \"/nonexistent/dir/f.jsonl\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    let (code, _, err) = run(&["run", "--config", c, "--check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("line 2: prewarm.concurrency: expected an integer"),
        "{err}"
    );
    assert!(err.contains("images[1].image: missing"), "{err}");
    // The file's own problems first; once they are fixed, what the disk shows.
    std::fs::write(
        &config,
        "[[images]]\nimage = \"r.io/a:1\"\npull_secret = \"junk.json\"\n[report]\nfindings = \"/nonexistent/dir/f.jsonl\"\n[containerd]\nsocket = \"unix:///run/containerd/containerd.sock\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["run", "--config", c, "--check-config"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("images[0].pull_secret: "), "{err}");
    assert!(
        err.contains("report.findings: directory /nonexistent/dir does not exist"),
        "{err}"
    );
    assert!(
        !err.contains("containerd.socket"),
        "unix:// is a socket URL: {err}"
    );
    std::fs::write(d.join("junk.json"), r#"{"auths":{"r.io":{"auth":"dTpw"}}}"#).unwrap();
    std::fs::write(
        &config,
        "[[images]]\nimage = \"r.io/a:1\"\npull_secret = \"junk.json\"\n",
    )
    .unwrap();
    let (code, out, err) = run(&["run", "--config", c, "--check-config"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid; 1 image(s)"), "{out}");
}

#[test]
fn the_cli_validates_as_the_file_does_and_names_the_variable_a_value_came_from() {
    let (code, _, err) = run(
        &["verify-shutdown", "r.io/a:1", "--slow-fraction", "2"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("must be a number in (0, 1]"), "{err}");
    let (code, _, err) = run(&["pull", "r.io/a:1", "--stall-timeout", "0s"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("must be greater than zero"), "{err}");
    let (code, _, err) = run(
        &["verify-shutdown", "r.io/a:1"],
        &[("RUNNER_WARDEN_GRACE", "soon")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("in RUNNER_WARDEN_GRACE"), "{err}");
    assert!(
        !err.contains("--grace"),
        "the operator set the variable, not the flag: {err}"
    );
    // A flag on the command line is named as the flag, even when the variable is set too.
    let (_, _, err) = run(
        &["verify-shutdown", "r.io/a:1", "--grace", "soon"],
        &[("RUNNER_WARDEN_GRACE", "60s")],
    );
    assert!(err.contains("--grace"), "{err}");
    let (code, _, err) = run(&["run", "--concurrency", "65", "--config", "/x"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("65"), "{err}");
}

#[test]
fn booleans_take_1_and_0_and_run_follows_a_cluster_without_a_config_file() {
    let (code, out, err) = run(
        &["run", "--check-config"],
        &[("RUNNER_WARDEN_KUBERNETES", "1"), ("NODE_NAME", "node-1")],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("following the cluster as node node-1"),
        "{out}"
    );
    let (code, _, err) = run(
        &["run", "--check-config"],
        &[("RUNNER_WARDEN_KUBERNETES", "0")],
    );
    assert_eq!(code, 2, "a config file is needed without --kubernetes");
    assert!(err.contains("--config"), "{err}");
}

#[test]
fn json_output_is_a_json_document_on_failure_too() {
    let sock = "/nonexistent/runner-warden-test.sock";
    for args in [
        vec![
            "check-image",
            "busybox",
            "--output",
            "json",
            "--containerd-socket",
            sock,
        ],
        vec![
            "pull",
            "busybox",
            "--output",
            "json",
            "--containerd-socket",
            sock,
        ],
        vec!["scan", "--output", "json", "--containerd-socket", sock],
        vec!["pull", "Bad Ref", "--output", "json"],
    ] {
        let (code, out, err) = run(&args, &[]);
        assert_eq!(code, 2, "{args:?}: {err}");
        let doc: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out:?}"));
        assert!(
            doc["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{args:?}: {doc}"
        );
    }
    let (code, out, _) = run(
        &[
            "run",
            "--check-config",
            "--output",
            "json",
            "--config",
            "/nonexistent.toml",
        ],
        &[],
    );
    assert_eq!(code, 2);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["valid"], false);
    assert!(
        doc["problems"][0]
            .as_str()
            .unwrap()
            .contains("/nonexistent.toml"),
        "{doc}"
    );
}

#[test]
fn version_names_the_commit() {
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("(commit "), "{out}");
}

/// What this CLI adds that speaks of pull secrets — `--check-config`'s problems, the JSON failure
/// documents, the one-line errors — names the file and the rule, never what is in it.
#[test]
fn secrets_never_appear_in_check_config_or_json_failures() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let password = "hunter2-Sup3rSecret";
    // Not base64; a syntax error right after a password; a username without its password next to a token.
    std::fs::write(
        d.join("a.json"),
        format!(r#"{{"auths":{{"r.io":{{"auth":"{password}"}}}}}}"#),
    )
    .unwrap();
    std::fs::write(
        d.join("b.json"),
        format!(r#"{{"auths":{{"r.io":{{"username":"u","password":"{password}"}} oops"#),
    )
    .unwrap();
    std::fs::write(
        d.join("c.json"),
        format!(r#"{{"auths":{{"r.io":{{"username":"{password}"}}}}}}"#),
    )
    .unwrap();
    let config = d.join("c.toml");
    std::fs::write(
        &config,
        "[[images]]\nimage = \"r.io/a:1\"\npull_secret = \"a.json\"\n[[images]]\nimage = \"r.io/b:1\"\npull_secret = \"b.json\"\n[[images]]\nimage = \"r.io/c:1\"\npull_secret = \"c.json\"\n",
    )
    .unwrap();
    let c = config.to_str().unwrap();
    for output in ["table", "json"] {
        let (code, out, err) = run(
            &["run", "--config", c, "--check-config", "--output", output],
            &[],
        );
        assert_eq!(code, 2, "{err}");
        for i in 0..3 {
            assert!(err.contains(&format!("images[{i}].pull_secret")), "{err}");
        }
        assert!(
            !out.contains(password) && !err.contains(password),
            "{out}\n{err}"
        );
    }
    let sock = "/nonexistent/runner-warden-test.sock";
    for secret in ["a.json", "b.json"] {
        let s = d.join(secret);
        let (_, out, err) = run(
            &[
                "pull",
                "r.io/a:1",
                "--secret",
                s.to_str().unwrap(),
                "--output",
                "json",
                "--containerd-socket",
                sock,
            ],
            &[],
        );
        assert!(
            !out.contains(password) && !err.contains(password),
            "{out}\n{err}"
        );
    }
}

/// A loopback port nothing listens on (bound, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn an_unreachable_api_server_is_one_outage_named_in_logs_readyz_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let api = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{api}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: t\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    let metrics = free_port();
    let log = dir.path().join("agent.log");
    let mut agent = Command::new(BIN)
        .args([
            "run",
            "--kubernetes",
            "--containerd-socket",
            "/nonexistent/rw.sock",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--metrics-address", &format!("127.0.0.1:{metrics}")])
        .env("NODE_NAME", "test-node")
        .env_remove("RUNNER_WARDEN_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let address = format!("https://127.0.0.1:{api}");
    let status_args = [
        "status",
        "--address",
        &format!("127.0.0.1:{metrics}"),
        "--output",
        "json",
    ];
    let mut doc = serde_json::Value::Null;
    for _ in 0..100 {
        let (_, out, _) = run(&status_args, &[]);
        doc = serde_json::from_str(&out).unwrap_or_default();
        if doc["api_server"]["reachable"] == false {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(doc["api_server"]["address"], address.as_str(), "{doc}");
    assert_eq!(doc["api_server"]["reachable"], false, "{doc}");
    assert_eq!(doc["ready"], false);
    let (code, table, _) = run(&status_args[..3], &[]);
    assert_eq!(code, 1, "not ready: exit 1");
    assert!(
        table.contains(&format!("API server {address} not reachable")),
        "{table}"
    );
    let ready = http_get(metrics, "/readyz").unwrap();
    assert!(
        ready.starts_with("HTTP/1.0 503") || ready.starts_with("HTTP/1.1 503"),
        "{ready}"
    );
    assert!(
        ready.contains(&format!("API server {address} not reachable")),
        "{ready}"
    );
    let up = http_get(metrics, "/metrics").unwrap();
    assert!(up.contains("runner_warden_api_server_up 0"), "{up}");
    // Five watches and the lease retry on their own backoff meanwhile; the log says it once.
    std::thread::sleep(std::time::Duration::from_secs(6));
    agent.kill().unwrap();
    agent.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let about_api: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("API server") || l.contains("Connect"))
        .collect();
    assert_eq!(about_api.len(), 1, "one line for the outage, got:\n{text}");
    assert!(about_api[0].contains("API server unreachable") && about_api[0].contains(&address));
    assert!(
        !text.contains("failed with error"),
        "kube's duplicate line:\n{text}"
    );
}

#[test]
fn status_without_an_agent_is_exit_2_with_a_json_error() {
    let port = free_port().to_string();
    let (code, out, err) = run(
        &[
            "status",
            "--address",
            &format!("localhost:{port}"),
            "--output",
            "json",
        ],
        &[],
    );
    assert_eq!(code, 2, "{err}");
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON on failure too");
    assert!(
        doc["error"].as_str().unwrap().contains("no agent answered"),
        "{doc}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    // The config file's address is used when no --address is given.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[report]\nmetrics_address = \"0.0.0.0:{port}\"\n"),
    )
    .unwrap();
    let (code, _, err) = run(&["status", "--config", cfg.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&format!("http://127.0.0.1:{port}/status")),
        "{err}"
    );
}

#[test]
fn completions_and_man_pages_come_from_the_cli_itself() {
    let (code, bash, _) = run(&["completions", "bash"], &[]);
    assert_eq!(code, 0);
    for word in ["verify-shutdown", "check-image", "status", "--kubeconfig"] {
        assert!(bash.contains(word), "{word} not in the bash completions");
    }
    let (code, zsh, _) = run(&["completions", "zsh"], &[]);
    assert_eq!(code, 0);
    assert!(
        zsh.starts_with("#compdef runner-warden"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    let (code, page, _) = run(&["man"], &[]);
    assert_eq!(code, 0);
    assert!(page.contains(".TH runner-warden 1"), "{page}");
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = run(&["man", "--dir", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    let run_page = std::fs::read_to_string(dir.path().join("runner-warden-run.1")).unwrap();
    assert!(
        run_page.contains("RUNNER_WARDEN_CONFIG"),
        "the variables are on the page"
    );
    let (code, _, err) = run(&["completions", "tcsh"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("possible values"), "{err}");
}
