//! Prewarm against the real test bed: containerd 1.7 with CRI, an htpasswd registry, real images.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn pull_cli(bed: &Bed, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("pull")
        .args(args)
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .expect("run runner-warden pull");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn agent_prewarms_private_image_pins_it_and_serves_metrics() {
    let _g = serial().await;
    let bed = Bed::get();
    let image = bed.image("runners/compliant:v1");
    bed.remove_repo(&bed.image("runners/compliant")).await;
    assert_eq!(bed.cri_status(&image).await, (false, false));

    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let mut agent = Agent::start_in(
        &bed,
        dir,
        "",
        &format!(
            "[[images]]\nimage = \"{image}\"\npull_secret = \"{}\"\nproject = \"team-a\"\n",
            secret.display()
        ),
    );
    let f = agent
        .wait_finding("RunnerImagePrewarmed", &image, S(60))
        .await;
    assert_eq!(f["type"], "Normal");
    assert_eq!(f["regarding"]["kind"], "ProjectSettings");
    assert_eq!(f["regarding"]["namespace"], "team-a");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("pinned against kubelet image GC"),
        "{f}"
    );

    // CRI (what kubelet sees) reports the image present and pinned.
    assert_eq!(bed.cri_status(&image).await, (true, true));

    let m = agent.metrics().await;
    assert_eq!(
        metric(&m, "runner_warden_prewarm_images{state=\"ready\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "runner_warden_prewarm_pulls_total{result=\"success\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "runner_warden_runtime_pinning_honoured"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "runner_warden_prewarm_pull_duration_seconds_count"),
        Some(1.0)
    );
    assert_eq!(agent.get("/healthz").await.unwrap().0, 200);
    assert_eq!(agent.get("/readyz").await.unwrap().0, 200);

    // Graceful: SIGTERM → exit 0 well within 5 s.
    let (code, secs) = agent.terminate();
    assert_eq!(code, Some(0), "{}", agent.logs());
    assert!(secs < 5.0, "took {secs}s to stop");
}

/// containerd 1.6 ignores the pin label: the image is still prewarmed, the agent says once that its pins
/// are not honoured, and the gauge says 0. Runs on a 1.6 bed (`RW_CONTAINERD=1.6 scripts/testbed up`, a
/// phase of `scripts/test`); on the others it has nothing to check and says so.
#[tokio::test]
async fn on_containerd_1_6_pins_are_not_honoured_but_images_are_prewarmed() {
    let _g = serial().await;
    let bed = Bed::get();
    if bed.containerd != "1.6" {
        eprintln!(
            "skipped: the bed runs containerd {} (this test is for 1.6)",
            bed.containerd
        );
        return;
    }
    let images: Vec<String> = ["runners/compliant:v1", "runners/runtime:v1"]
        .iter()
        .map(|i| bed.image(i))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let entries: String = images
        .iter()
        .map(|i| {
            format!(
                "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\n",
                secret.display()
            )
        })
        .collect();
    let agent = Agent::start_in(&bed, dir, "", &entries);
    for image in &images {
        agent
            .wait_finding("RunnerImagePrewarmed", image, S(60))
            .await;
        assert_eq!(
            bed.cri_status(image).await,
            (true, false),
            "present; 1.6's CRI does not report it pinned"
        );
    }
    agent
        .wait_metric("runner_warden_runtime_pinning_honoured", S(10), |v| {
            v == 0.0
        })
        .await;
    let warnings = agent
        .logs()
        .matches("the runtime does not report pinned images as pinned")
        .count();
    assert_eq!(warnings, 1, "said once, not per image:\n{}", agent.logs());
}

#[tokio::test]
async fn pull_command_skips_an_image_already_present() {
    let bed = Bed::get();
    let image = bed.image("runners/present:v1");
    bed.remove_repo(&bed.image("runners/present")).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let s = secret.to_str().unwrap();
    let (code, out, err) = pull_cli(&bed, &[&image, "--secret", s]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("pulled {image} sha256:")), "{out}");
    assert!(out.contains("(pinned)"), "{out}");
    let (code, out, err) = pull_cli(&bed, &[&image, "--secret", s]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("present {image} sha256:")),
        "{out}"
    );
    assert_eq!(bed.cri_status(&image).await, (true, true));
}

/// kubelet treats a key's `/v1/` or `/v2/` path as the registry itself (what `docker login` and legacy
/// `.dockercfg` files write): such a secret must authenticate pulls from that registry.
#[tokio::test]
async fn a_secret_keyed_by_the_registry_api_url_prewarms() {
    let bed = Bed::get();
    let image = bed.image("runners/legacy-key:v1");
    let dir = tempfile::tempdir().unwrap();
    for (name, version) in [("v1.json", "v1"), ("v2.json", "v2")] {
        bed.remove_repo(&bed.image("runners/legacy-key")).await;
        let key = format!("https://{}/{version}/", bed.registry);
        let secret = bed.secret(dir.path(), name, &key, &bed.user, &bed.password);
        let (code, out, err) = pull_cli(
            &bed,
            &[&image, "--secret", secret.to_str().unwrap(), "--no-pin"],
        );
        assert_eq!(code, 0, "key {key}: {err}");
        assert!(out.starts_with(&format!("pulled {image} sha256:")), "{out}");
    }
    assert!(bed.cri_status(&image).await.0);
}

#[tokio::test]
async fn wrong_password_is_an_auth_failure() {
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.secret(
        dir.path(),
        "bad.json",
        &bed.registry,
        &bed.user,
        "not-the-password",
    );
    let image = bed.image("runners/other:v1");
    bed.remove_repo(&bed.image("runners/other")).await;
    let (code, _, err) = pull_cli(&bed, &[&image, "--secret", secret.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("pull failed [auth]"), "{err}");
    assert!(err.contains("401 Unauthorized"), "{err}");
    assert!(
        err.contains("tried 1 credential(s) from pull secret"),
        "{err}"
    );
    assert!(
        err.contains("check that the pull secret holds valid credentials"),
        "{err}"
    );
    assert!(!bed.cri_status(&image).await.0);
}

#[tokio::test]
async fn missing_tag_is_not_found() {
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let (code, _, err) = pull_cli(
        &bed,
        &[
            &bed.image("runners/other:no-such-tag"),
            "--secret",
            secret.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(err.contains("pull failed [not_found]"), "{err}");
    assert!(err.contains("check the repository and tag"), "{err}");
}

#[tokio::test]
async fn no_secret_means_a_clear_anonymous_failure() {
    let bed = Bed::get();
    let (code, _, err) = pull_cli(&bed, &[&bed.image("runners/other:v1")]);
    assert_eq!(code, 1);
    assert!(err.contains("pull failed [auth]"), "{err}");
    assert!(
        err.contains("no pull secret is configured, and anonymously"),
        "{err}"
    );
}

#[tokio::test]
async fn secret_matching_another_registry_is_said_so() {
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.secret(
        dir.path(),
        "other.json",
        "quay.io",
        &bed.user,
        &bed.password,
    );
    let (code, _, err) = pull_cli(
        &bed,
        &[
            &bed.image("runners/other:v1"),
            "--secret",
            secret.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "has no entry matching {} (its keys: quay.io)",
            bed.registry
        )),
        "{err}"
    );
}

#[tokio::test]
async fn bad_reference_and_missing_secret_file_are_usage_errors() {
    let bed = Bed::get();
    let (code, _, err) = pull_cli(&bed, &["quay.io/Bad/Name:v1"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid image reference"), "{err}");
    let (code, _, err) = pull_cli(
        &bed,
        &[
            &bed.image("runners/other:v1"),
            "--secret",
            "/nonexistent.json",
        ],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent.json does not exist"), "{err}");
}

#[tokio::test]
async fn invalid_secret_is_reported_and_other_images_still_prewarm() {
    let _g = serial().await;
    let bed = Bed::get();
    let good = bed.image("runners/demo-a:v1");
    let broken = bed.image("runners/demo-b:v1");
    bed.remove_repo(&bed.image("runners/demo-a")).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    std::fs::write(
        dir.path().join("broken.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"%%%\"}}}}}}",
            bed.registry
        ),
    )
    .unwrap();
    let agent = Agent::start_in(
        &bed,
        dir,
        "failure_finding_after = 1",
        &format!(
            "[[images]]\nimage = \"{broken}\"\npull_secret = \"broken.json\"\nproject = \"team-b\"\n\
             [[images]]\nimage = \"{good}\"\npull_secret = \"{}\"\n",
            secret.display()
        ),
    );
    let f = agent
        .wait_finding("RunnerImagePullSecretInvalid", &broken, S(30))
        .await;
    assert_eq!(f["type"], "Warning");
    assert_eq!(f["class"], "secret");
    let msg = f["message"].as_str().unwrap();
    assert!(
        msg.contains("broken.json") && msg.contains("not valid base64"),
        "{msg}"
    );
    agent
        .wait_finding("RunnerImagePrewarmed", &good, S(60))
        .await;
    agent
        .wait_metric(
            "runner_warden_prewarm_pulls_total{result=\"secret\"}",
            S(10),
            |v| v >= 2.0,
        )
        .await;
    // Reported once per distinct problem, not on every retry.
    let n = agent
        .findings()
        .iter()
        .filter(|f| f["reason"] == "RunnerImagePullSecretInvalid")
        .count();
    assert_eq!(n, 1);
    assert!(
        agent.logs().contains("class=\"secret\""),
        "{}",
        agent.logs()
    );
}

#[tokio::test]
async fn pins_follow_the_config_file() {
    let _g = serial().await;
    let bed = Bed::get();
    let a = bed.image("runners/unpin-a:v1");
    let b = bed.image("runners/unpin-b:v1");
    let dir = tempfile::tempdir().unwrap();
    let secret = bed.good_secret(dir.path());
    let entry = |i: &str| {
        format!(
            "[[images]]\nimage = \"{i}\"\npull_secret = \"{}\"\n",
            secret.display()
        )
    };
    let agent = Agent::start_in(&bed, dir, "", &format!("{}{}", entry(&a), entry(&b)));
    wait_for(S(60), "both images pinned", || async {
        (bed.cri_status(&a).await == (true, true) && bed.cri_status(&b).await == (true, true))
            .then_some(())
    })
    .await;

    agent.rewrite_images(&bed, "", &entry(&a));
    wait_for(S(20), "b unpinned", || async {
        (bed.cri_status(&b).await == (true, false)).then_some(())
    })
    .await;
    // The image stays for kubelet's GC to decide; the other one keeps its pin.
    assert_eq!(bed.cri_status(&a).await, (true, true));
    assert!(
        agent.logs().contains("unpinned image no longer desired"),
        "{}",
        agent.logs()
    );
    agent
        .wait_metric(
            "runner_warden_config_reloads_total{result=\"success\"}",
            S(5),
            |v| v >= 1.0,
        )
        .await;

    // A broken edit is reported and the running set kept.
    std::fs::write(&agent.config, "[prewarm]\nconcurrency = \"lots\"\n").unwrap();
    agent
        .wait_metric(
            "runner_warden_config_reloads_total{result=\"failed\"}",
            S(15),
            |v| v >= 1.0,
        )
        .await;
    assert!(agent.logs().contains("keeping the running configuration"));
    assert_eq!(bed.cri_status(&a).await, (true, true));
}

/// A freshly pushed image of two random layers (~120 MB on the wire), absent from containerd, pulled
/// through a proxy throttled to `rate` bytes/s. Fresh content each time: a pull another test cancelled
/// leaves its lease (24 h) holding what it fetched, and a shared fixture's next pull would then be a no-op
/// with no progress to see.
async fn big_image_behind_throttle(bed: &Bed, rate: u64) -> (Proxy, String) {
    let repo_tag = bed.push_fresh("prewarm/big", &["80", "80"]);
    let proxy = Proxy::start(5003, bed.registry_port(), rate, 0).await;
    (proxy, format!("127.0.0.1:5003/{repo_tag}"))
}

#[tokio::test]
async fn progress_is_visible_while_a_large_image_pulls() {
    let _g = serial().await;
    let bed = Bed::get();
    // Throttled to ~40 MB/s through a proxy so the 110 MiB pull takes a few seconds.
    let (_proxy, image) = big_image_behind_throttle(&bed, 40_000_000).await;
    let image = image.as_str();
    let agent = Agent::with_image(&bed, "", image);
    let done_series =
        format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"done\"}}");
    let total_series =
        format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"total\"}}");
    let total = agent
        .wait_metric(&total_series, S(30), |v| v > 100.0 * 1024.0 * 1024.0)
        .await;
    let first = agent.wait_metric(&done_series, S(30), |v| v > 0.0).await;
    // `status` shows the same pull (tokio's Command: the throttling proxy runs in this process).
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--output", "json", "--address"])
        .arg(format!("127.0.0.1:{}", agent.port))
        .output()
        .await
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let progress = &doc["images"][0]["progress"];
    assert_eq!(doc["images"][0]["state"], "pulling", "{doc}");
    assert!(progress["done_bytes"].as_u64().unwrap() > 0, "{doc}");
    assert!(progress["total_bytes"].as_f64().unwrap() >= total, "{doc}");
    let later = agent.wait_metric(&done_series, S(30), |v| v > first).await;
    assert!(later <= total);
    agent
        .wait_metric(
            "runner_warden_prewarm_images{state=\"pulling\"}",
            S(1),
            |v| v == 1.0,
        )
        .await;
    agent
        .wait_finding("RunnerImagePrewarmed", image, S(60))
        .await;
    // The per-image series goes away with the pull; the byte counter stays.
    assert_eq!(metric(&agent.metrics().await, &done_series), None);
    assert!(
        metric(&agent.metrics().await, "runner_warden_prewarm_bytes_total").unwrap() >= total * 0.9
    );
}

#[tokio::test]
async fn pull_without_a_terminal_prints_plain_progress_lines() {
    let _g = serial().await;
    let bed = Bed::get();
    let (_proxy, image) = big_image_behind_throttle(&bed, 40_000_000).await;
    let image = image.as_str();
    let dir = tempfile::tempdir().unwrap();
    let host = image.split('/').next().unwrap();
    let secret = bed.secret(dir.path(), "proxy.json", host, &bed.user, &bed.password);
    // Awaited, not blocked on: the proxy serves on this test's runtime meanwhile.
    let o = tokio::process::Command::new(BIN)
        .args([
            "pull",
            image,
            "--secret",
            secret.to_str().unwrap(),
            "--no-pin",
        ])
        .env("RUNNER_WARDEN_CONTAINERD_SOCKET", &bed.socket)
        .output()
        .await
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.starts_with("pulled "), "{out}");
    let line = err
        .lines()
        .find(|l| l.starts_with(&format!("pulling {image}: ")))
        .unwrap_or_else(|| panic!("no progress line in:\n{err}"));
    assert!(line.contains(" MiB (") && line.contains("MiB/s"), "{line}");
}

#[tokio::test]
async fn stalled_registry_is_detected_cancelled_and_retried() {
    let _g = serial().await;
    let bed = Bed::get();
    let proxy = Proxy::start(5001, bed.registry_port(), 0, 4 * 1024 * 1024).await;
    proxy
        .stall
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let image = "127.0.0.1:5001/runners/big-stall:v1";
    bed.remove_repo("127.0.0.1:5001/runners/big-stall").await;
    let agent = Agent::with_image(&bed, "stall_timeout = \"2s\"", image);
    agent
        .wait_metric(
            "runner_warden_prewarm_pulls_total{result=\"stalled\"}",
            S(40),
            |v| v >= 1.0,
        )
        .await;
    let logs = agent.logs();
    assert!(logs.contains("made no progress for 2s"), "{logs}");
    assert!(logs.contains("class=\"stalled\""), "{logs}");
    assert!(!bed.cri_status(image).await.0);
    // The registry recovers: the retry completes.
    proxy
        .stall
        .store(false, std::sync::atomic::Ordering::Relaxed);
    agent
        .wait_finding("RunnerImagePrewarmed", image, S(60))
        .await;
    assert_eq!(bed.cri_status(image).await, (true, true));
}

#[tokio::test]
async fn registry_stopped_mid_pull_is_retried_after_it_returns() {
    let _g = serial().await;
    let bed = Bed::get();
    let mut registry = bed.start_registry(5010);
    // Throttled so the pull is still running when the registry dies.
    let _proxy = Proxy::start(5002, 5010, 20_000_000, 0).await;
    let image = "127.0.0.1:5002/runners/big-restart:v1";
    bed.remove_repo("127.0.0.1:5002/runners/big-restart").await;
    let agent = Agent::with_image(&bed, "", image);
    let done_series =
        format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"done\"}}");
    agent
        .wait_metric(&done_series, S(30), |v| v > 10.0 * 1024.0 * 1024.0)
        .await;
    registry.kill();
    agent
        .wait_metric(
            "runner_warden_prewarm_pulls_total{result=\"network\"}",
            S(30),
            |v| v >= 1.0,
        )
        .await;
    assert!(!bed.cri_status(image).await.0);
    let restarted = Instant::now();
    let _registry = bed.start_registry(5010);
    agent
        .wait_finding("RunnerImagePrewarmed", image, S(60))
        .await;
    assert!(restarted.elapsed() < S(30));
    assert_eq!(bed.cri_status(image).await, (true, true));
}

#[tokio::test]
async fn passwords_never_appear_in_logs_findings_metrics_or_errors() {
    let _g = serial().await;
    let bed = Bed::get();
    let ok_image = bed.image("runners/leak:v1");
    let denied_image = bed.image("runners/other:v1");
    bed.remove_repo(&bed.image("runners/leak")).await;
    bed.remove_repo(&bed.image("runners/other")).await;
    let dir = tempfile::tempdir().unwrap();
    let good = bed.good_secret(dir.path());
    let wrong_pw = format!("wrong-{}-pw", std::process::id());
    let bad = bed.secret(dir.path(), "bad.json", &bed.registry, &bed.user, &wrong_pw);
    // A malformed secret that contains the password as text.
    std::fs::write(
        dir.path().join("garbled.json"),
        format!("{{\"auths\": \"{}\"}}", bed.password),
    )
    .unwrap();
    let agent = Agent::start_in(
        &bed,
        dir,
        "failure_finding_after = 1",
        &format!(
            "[[images]]\nimage = \"{ok_image}\"\npull_secret = \"{}\"\n\
             [[images]]\nimage = \"{denied_image}\"\npull_secret = \"{}\"\n\
             [[images]]\nimage = \"{}\"\npull_secret = \"garbled.json\"\n",
            good.display(),
            bad.display(),
            bed.image("runners/compliant:v2"),
        ),
    );
    agent
        .wait_finding("RunnerImagePrewarmed", &ok_image, S(60))
        .await;
    agent
        .wait_finding("RunnerImagePullFailed", &denied_image, S(60))
        .await;
    agent
        .wait_finding(
            "RunnerImagePullSecretInvalid",
            &bed.image("runners/compliant:v2"),
            S(60),
        )
        .await;
    let metrics = agent.metrics().await;
    let (_, cli_out, cli_err) = pull_cli(&bed, &[&denied_image, "--secret", bad.to_str().unwrap()]);
    let everything = format!(
        "{}\n{}\n{metrics}\n{cli_out}\n{cli_err}",
        agent.logs(),
        agent.findings_raw()
    );
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    };
    for secret in [
        bed.password.clone(),
        wrong_pw.clone(),
        b64(&format!("{}:{}", bed.user, bed.password)),
        b64(&format!("{}:{wrong_pw}", bed.user)),
    ] {
        assert!(
            !everything.contains(&secret),
            "a secret leaked into the output:\n{everything}"
        );
    }
    // The outputs are not empty: the assertion above had something to search.
    assert!(agent.logs().contains("pull failed") && cli_err.contains("[auth]"));
}

#[tokio::test]
async fn a_moved_tag_is_pulled_again_and_the_old_content_unpinned() {
    let _g = serial().await;
    let bed = Bed::get();
    let image = bed.image("runners/moving:v1");
    retag(&bed, "runners/compliant:v1", "runners/moving:v1");
    bed.remove_repo(&bed.image("runners/moving")).await;
    let agent = Agent::with_image(&bed, "resolve_interval = \"1s\"", &image);
    let first = agent
        .wait_finding("RunnerImagePrewarmed", &image, S(60))
        .await;
    let old_records = {
        let mut c = bed.images().await;
        let list = c
            .list(ns(containerd_client::services::v1::ListImagesRequest {
                filters: vec![],
            }))
            .await
            .unwrap()
            .into_inner()
            .images;
        list.into_iter()
            .filter(|i| {
                i.name
                    .starts_with(&format!("{}@", bed.image("runners/moving")))
            })
            .map(|i| i.name)
            .collect::<Vec<_>>()
    };
    assert_eq!(old_records.len(), 1, "{old_records:?}");

    retag(&bed, "runners/compliant:v2", "runners/moving:v1");
    let second = agent
        .wait(S(30), "a second RunnerImagePrewarmed", || async {
            agent
                .findings()
                .into_iter()
                .filter(|f| f["reason"] == "RunnerImagePrewarmed" && f["image"] == image.as_str())
                .nth(1)
        })
        .await;
    assert_ne!(
        first["message"], second["message"],
        "the image id must change"
    );
    assert!(
        agent.logs().contains("tag moved; new content prewarmed"),
        "{}",
        agent.logs()
    );
    // The digest the tag moved away from is no longer pinned by us.
    let (present, pinned) = bed.cri_status(&old_records[0]).await;
    assert!(
        present && !pinned,
        "old content: present={present} pinned={pinned}"
    );
    assert_eq!(bed.cri_status(&image).await, (true, true));
}

#[tokio::test]
async fn sigterm_during_a_pull_cancels_it_and_exits_quickly() {
    let _g = serial().await;
    let bed = Bed::get();
    // Slow enough (5 MB/s) that the pull is certainly running when the signal arrives.
    let (_proxy, image) = big_image_behind_throttle(&bed, 5_000_000).await;
    let image = image.as_str();
    let mut agent = Agent::with_image(&bed, "", image);
    let done = format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"done\"}}");
    agent.wait_metric(&done, S(30), |v| v > 0.0).await;
    let (code, secs) = agent.terminate();
    assert_eq!(code, Some(0), "{}", agent.logs());
    assert!(secs < 5.0, "took {secs}s to stop during a pull");
    assert!(
        !bed.cri_status(image).await.0,
        "the pull must have been cancelled"
    );
}

#[tokio::test]
async fn status_shows_each_image_its_health_and_the_last_hours_findings() {
    let _g = serial().await;
    let bed = Bed::get();
    let root = bed.image("runners/audit-root:v1");
    let refused = bed.image("runners/demo-b:v1");
    bed.remove_repo(&bed.image("runners/demo-b")).await;
    let dir = tempfile::tempdir().unwrap();
    let good = bed.good_secret(dir.path());
    let bad = bed.secret(dir.path(), "bad.json", &bed.registry, &bed.user, "wrong");
    let agent = Agent::start_in(
        &bed,
        dir,
        "failure_finding_after = 1",
        &format!(
            "[[images]]\nimage = \"{root}\"\npull_secret = \"{}\"\nproject = \"team-a\"\n\
             [[images]]\nimage = \"{refused}\"\npull_secret = \"{}\"\nproject = \"team-b\"\n",
            good.display(),
            bad.display()
        ),
    );
    agent
        .wait_finding("RunnerImageContractViolation", &root, S(90))
        .await;
    agent
        .wait_finding("RunnerImagePullFailed", &refused, S(60))
        .await;
    let status = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("status")
            .args(args)
            .output()
            .expect("run runner-warden status");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    // Found through the agent's own config file, as an operator on the node would.
    let (code, out) = status(&[
        "--config",
        agent.config.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_eq!(code, 0, "the agent is ready: {out}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["runtime"]["reachable"], true);
    assert!(doc.get("api_server").is_none(), "standalone: {doc}");
    let image = |r: &str| {
        doc["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["image"] == r)
            .cloned()
            .unwrap_or_else(|| panic!("{r} not in {doc}"))
    };
    let r = image(&root);
    assert_eq!(r["state"], "ready", "{r}");
    assert_eq!(r["pin"], "pinned", "{r}");
    assert_eq!(r["projects"][0], "team-a");
    assert!(
        r["image_id"].as_str().unwrap().starts_with("sha256:"),
        "{r}"
    );
    assert_eq!(r["audit"]["result"], "violations", "{r}");
    assert!(
        r["audit"]["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d.as_str().unwrap().starts_with("non-root-user")),
        "{r}"
    );
    let f = image(&refused);
    assert_eq!(f["state"], "failed", "{f}");
    assert_eq!(f["last_failure"]["class"], "auth", "{f}");
    assert!(f["last_failure"]["attempts"].as_u64().unwrap() >= 1);
    let reasons: Vec<&str> = doc["findings_last_hour"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    for want in [
        "RunnerImagePrewarmed",
        "RunnerImageContractViolation",
        "RunnerImagePullFailed",
    ] {
        assert!(reasons.contains(&want), "{want} not in {reasons:?}");
    }
    assert!(!out.contains("wrong\""), "the password stays out: {out}");

    let (code, table) = status(&["--address", &format!("127.0.0.1:{}", agent.port)]);
    assert_eq!(code, 0);
    for want in [
        root.as_str(),
        "pinned",
        "violations",
        "auth ×",
        "Findings in the last hour",
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }
}
