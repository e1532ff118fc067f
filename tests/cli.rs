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
