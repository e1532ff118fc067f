//! The static contract audit against real images in the test bed's containerd: `check-image` and the
//! agent, one fixture per failure (built by scripts/testbed without Docker).

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn check_image(bed: &Bed, image: &str, extra: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let out = Command::new(BIN)
        .args(["check-image", image, "--secret"])
        .arg(&secret)
        .args(extra)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .expect("run check-image");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (check, outcome) of every result that did not pass.
fn failures(json: &str) -> BTreeSet<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] != "pass")
        .map(|r| {
            (
                r["check"].as_str().unwrap().into(),
                r["outcome"].as_str().unwrap().into(),
            )
        })
        .collect()
}

#[tokio::test]
async fn check_image_reports_exactly_the_fixtures_failures() {
    let bed = Bed::get();
    // (fixture, exit status, failing checks with their outcome)
    type Expected<'a> = (&'a str, i32, &'a [(&'a str, &'a str)]);
    let table: &[Expected] = &[
        ("audit-compliant", 0, &[]),
        ("audit-root", 1, &[("non-root-user", "violation")]),
        ("audit-named-root", 1, &[("non-root-user", "violation")]),
        ("audit-nolabel", 0, &[("contract-label", "warning")]),
        ("audit-major2", 1, &[("contract-label", "violation")]),
        (
            "audit-session-env",
            1,
            &[("baked-platform-env", "violation")],
        ),
        ("audit-sigint", 1, &[("stop-signal", "violation")]),
        ("audit-no-runner", 1, &[("required-paths", "violation")]),
        ("audit-setuid", 1, &[("setuid-files", "violation")]),
        ("audit-setuid-removed", 0, &[]),
        ("audit-opaque", 0, &[]),
        ("audit-creds", 0, &[("credentials-baked", "warning")]),
        ("audit-index", 0, &[]),
    ];
    for (fixture, code, want) in table {
        let image = bed.image(&format!("runners/{fixture}:v1"));
        let (got_code, out, err) = check_image(&bed, &image, &["--output", "json"]);
        assert_eq!(got_code, *code, "{fixture}: {err}{out}");
        let want: BTreeSet<(String, String)> = want
            .iter()
            .map(|(c, o)| (c.to_string(), o.to_string()))
            .collect();
        assert_eq!(failures(&out), want, "{fixture}: {out}");
    }
}

#[tokio::test]
async fn details_say_what_to_change() {
    let bed = Bed::get();
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-named-root:v1"), &[]);
    assert!(
        out.contains("USER admin (uid 0 in the image's /etc/passwd) is root; add `USER 1001`"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-setuid:v1"), &[]);
    assert!(
        out.contains("setuid/setgid files: /usr/bin/helper (1 in all)"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-sigint:v1"), &[]);
    assert!(
        out.contains("STOPSIGNAL SIGINT: containerd sends SIGINT instead of SIGTERM"),
        "{out}"
    );
    let (_, out, _) = check_image(&bed, &bed.image("runners/audit-no-runner:v1"), &[]);
    assert!(out.contains("/app/ambient-runner is missing"), "{out}");
    // The table: a header, one row per check, a verdict.
    assert!(
        out.contains("CHECK                RESULT     DETAIL"),
        "{out}"
    );
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("required-paths "))
            .count(),
        1
    );
    assert!(
        out.trim_end().ends_with("1 violation(s), 0 warning(s)"),
        "{out}"
    );
}

#[tokio::test]
async fn the_index_is_resolved_to_the_node_platform() {
    let bed = Bed::get();
    let (code, out, err) = check_image(
        &bed,
        &bed.image("runners/audit-index:v1"),
        &["--output", "json"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["image"]["platform"], "linux/amd64");
    // The arm64 entry runs as root; had it been chosen, non-root-user would fail.
    assert!(failures(&out).is_empty(), "{out}");
}

#[tokio::test]
async fn severity_can_be_lowered_per_check() {
    let bed = Bed::get();
    let image = bed.image("runners/audit-session-env:v1");
    let (code, out, _) = check_image(
        &bed,
        &image,
        &["--output", "json", "--warn", "baked-platform-env"],
    );
    assert_eq!(code, 0);
    assert_eq!(
        failures(&out),
        [("baked-platform-env".to_string(), "warning".to_string())].into()
    );
    let (code, _, err) = check_image(&bed, &image, &["--warn", "no-such-check"]);
    assert_eq!(code, 2, "{err}");
}

#[tokio::test]
async fn unreadable_images_exit_2_with_the_reason() {
    let bed = Bed::get();
    let (code, _, err) = check_image(&bed, &bed.image("runners/audit-root:no-such-tag"), &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot read") && err.contains("not_found"),
        "{err}"
    );
    let (code, _, err) = check_image(&bed, "Not A Reference", &[]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid image reference"), "{err}");
}

#[tokio::test]
async fn a_layer_containerd_never_fetched_is_a_clear_cannot_read() {
    let _g = serial().await;
    let bed = Bed::get();
    // audit-twin's gzip layer has the same uncompressed content as audit-compliant's plain one.
    bed.remove_repo(&bed.image("runners/audit-twin")).await;
    let (code, _, err) = check_image(&bed, &bed.image("runners/audit-compliant:v1"), &[]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = check_image(&bed, &bed.image("runners/audit-twin:v1"), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is not in containerd's content store"),
        "{err}"
    );
    assert!(err.contains("layer 1 (sha256:"), "{err}");
}

#[tokio::test]
async fn the_agent_audits_each_new_digest_once_and_reports_findings_and_metrics() {
    let _g = serial().await;
    let bed = Bed::get();
    let root = bed.image("runners/audit-root:v1");
    // Same content under another name: audited once, served from the cache the second time.
    retag(&bed, "runners/audit-root:v1", "runners/audit-rootcopy:v1");
    let rootcopy = bed.image("runners/audit-rootcopy:v1");
    let sigint = bed.image("runners/audit-sigint:v1");
    let nolabel = bed.image("runners/audit-nolabel:v1");
    let ok = bed.image("runners/audit-compliant:v1");
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let entries: String = [&root, &rootcopy, &sigint, &nolabel, &ok]
        .iter()
        .map(|i| {
            format!(
                "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\nproject = \"team-x\"\n",
                secret.display()
            )
        })
        .collect();
    let agent = Agent::start_in(&bed, dir, "", &entries);

    let f = agent
        .wait_finding("RunnerImageContractViolation", &root, S(60))
        .await;
    assert_eq!(f["check"], "non-root-user");
    assert_eq!(f["outcome"], "violation");
    assert_eq!(f["regarding"]["kind"], "ProjectSettings");
    assert!(
        f["message"].as_str().unwrap().contains("add `USER 1001`"),
        "{f}"
    );
    let f = agent
        .wait_finding("RunnerImageContractViolation", &sigint, S(60))
        .await;
    assert_eq!(f["check"], "stop-signal");
    let f = agent
        .wait_finding("RunnerImageContractViolation", &nolabel, S(60))
        .await;
    assert_eq!(
        (f["check"].as_str(), f["outcome"].as_str()),
        (Some("contract-label"), Some("warning"))
    );
    agent.wait_finding("RunnerImagePrewarmed", &ok, S(60)).await;
    agent
        .wait_metric(
            "runner_warden_image_audits_total{result=\"ok\"}",
            S(30),
            |v| v == 4.0,
        )
        .await;

    let m = agent.metrics().await;
    assert_eq!(
        metric(&m, "runner_warden_image_audits_total{result=\"cached\"}"),
        Some(1.0),
        "{m}"
    );
    // Both names of the root image count.
    assert_eq!(
        metric(
            &m,
            "runner_warden_image_violations{check=\"non-root-user\"}"
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "runner_warden_image_violations{check=\"stop-signal\"}"),
        Some(1.0)
    );
    // Warnings are findings, not violations.
    assert_eq!(
        metric(
            &m,
            "runner_warden_image_violations{check=\"contract-label\"}"
        ),
        Some(0.0)
    );
    assert!(metric(&m, "runner_warden_image_audit_duration_seconds_count").unwrap() >= 4.0);
    // The compliant image yields no audit finding at all.
    assert!(!agent
        .findings()
        .iter()
        .any(|f| f["reason"] == "RunnerImageContractViolation" && f["image"] == ok.as_str()));

    // The violating image leaves the config: it no longer counts.
    let keep: String = [&sigint, &nolabel, &ok]
        .iter()
        .map(|i| {
            format!(
                "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\n",
                agent.dir.path().join("good.json").display()
            )
        })
        .collect();
    agent.rewrite_images(&bed, "", &keep);
    agent
        .wait_metric(
            "runner_warden_image_violations{check=\"non-root-user\"}",
            S(20),
            |v| v == 0.0,
        )
        .await;
}
