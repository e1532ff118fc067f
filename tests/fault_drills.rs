//! Fault drills on the real bed: each fault happens mid-work, then heals, and the drill checks that
//! nothing was lost (the image ends present and pinned), nothing was said twice (one
//! `RunnerImagePrewarmed`, at most one `RunnerImagePullFailed`), nothing is stuck (no image left failed or
//! pulling, no ingest left open in containerd) and that the agent recovered without a restart.
//! A binary of its own: killing containerd would break tests running beside it.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::ListStatusesRequest;

const S: fn(u64) -> Duration = Duration::from_secs;

/// The one proxy port the drills use (containerd's hosts config on the bed knows 5001–5004).
const PORT: u16 = 5004;

/// containerd's open ingests (partial downloads).
async fn open_ingests(bed: &Bed) -> Vec<String> {
    let mut c = ContentClient::new(
        containerd_client::connect(&bed.socket)
            .await
            .expect("connect containerd"),
    );
    c.list_statuses(ns(ListStatusesRequest { filters: vec![] }))
        .await
        .expect("content ListStatuses")
        .into_inner()
        .statuses
        .into_iter()
        .map(|s| s.r#ref)
        .collect()
}

fn count(agent: &Agent, reason: &str, image: &str) -> usize {
    agent
        .findings()
        .iter()
        .filter(|f| f["reason"] == reason && f["image"] == image)
        .count()
}

/// The end state every drill must reach: present, pinned, ready, no failure left, no open ingest, each
/// finding said at most once.
async fn healed(bed: &Bed, agent: &Agent, image: &str) {
    agent
        .wait_finding("RunnerImagePrewarmed", image, S(120))
        .await;
    assert_eq!(
        bed.cri_status(image).await,
        (true, true),
        "present and pinned"
    );
    agent
        .wait_metric(
            "runner_warden_prewarm_images{state=\"ready\"}",
            S(10),
            |v| v == 1.0,
        )
        .await;
    let m = agent.metrics().await;
    for state in ["failed", "pulling", "waiting"] {
        let series = format!("runner_warden_prewarm_images{{state=\"{state}\"}}");
        assert_eq!(metric(&m, &series), Some(0.0), "{series}\n{}", agent.logs());
    }
    agent
        .wait(S(30), "no ingest left open in containerd", || async {
            open_ingests(bed).await.is_empty().then_some(())
        })
        .await;
    // A few more seconds: nothing is announced again.
    tokio::time::sleep(S(3)).await;
    assert_eq!(
        count(agent, "RunnerImagePrewarmed", image),
        1,
        "{:?}",
        agent.findings()
    );
    assert!(
        count(agent, "RunnerImagePullFailed", image) <= 1,
        "{:?}",
        agent.findings()
    );
    assert!(agent.child_alive(), "recovered without a restart");
}

/// A freshly pushed image (two random layers, ~60 MB on the wire) behind the drills' proxy port. A pull
/// that is cancelled (or that containerd is killed in) leaves its lease behind, holding what it fetched for
/// 24 h: content of its own keeps the drills from turning another test's pull of a shared fixture into a
/// no-op (or a hang).
fn fresh_image(bed: &Bed, what: &str) -> String {
    let repo_tag = bed.push_fresh(&format!("drills/{what}"), &["40", "40"]);
    format!("127.0.0.1:{PORT}/{repo_tag}")
}

fn pulls_failed(m: &str) -> f64 {
    ["auth", "not_found", "network", "stalled", "other"]
        .iter()
        .filter_map(|r| {
            metric(
                m,
                &format!("runner_warden_prewarm_pulls_total{{result=\"{r}\"}}"),
            )
        })
        .sum()
}

#[tokio::test]
async fn a_registry_answering_500s_then_resetting_connections_heals_into_one_prewarm() {
    let _g = serial().await;
    let bed = Bed::get();
    let proxy = Proxy::start(PORT, bed.registry_port(), 0, 0).await;
    proxy.fault.store(FAULT_500, Ordering::Relaxed);
    let image = &fresh_image(&bed, "flaky");
    let agent = Agent::with_image(&bed, "", image);
    agent
        .wait(S(30), "pulls failing on 500s", || async {
            (pulls_failed(&agent.metrics().await) >= 2.0).then_some(())
        })
        .await;
    assert!(!bed.cri_status(image).await.0);
    let after_500s = pulls_failed(&agent.metrics().await);
    proxy.fault.store(FAULT_RESET, Ordering::Relaxed);
    agent
        .wait(S(30), "pulls failing on resets", || async {
            (pulls_failed(&agent.metrics().await) >= after_500s + 2.0).then_some(())
        })
        .await;
    let logs = agent.logs();
    assert!(logs.contains("pull failed"), "{logs}");
    proxy.fault.store(FAULT_NONE, Ordering::Relaxed);
    healed(&bed, &agent, image).await;
    assert_eq!(
        count(&agent, "RunnerImagePullFailed", image),
        1,
        "one finding for the whole failing streak: {:?}",
        agent.findings()
    );
}

#[tokio::test]
async fn an_agent_stopped_mid_pull_and_started_again_finishes_with_nothing_leaked() {
    let _g = serial().await;
    let bed = Bed::get();
    let _proxy = Proxy::start(PORT, bed.registry_port(), 8_000_000, 0).await;
    let image = &fresh_image(&bed, "stopped");
    let mut first = Agent::with_image(&bed, "", image);
    let done = format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"done\"}}");
    first.wait_metric(&done, S(30), |v| v > 1e6).await;
    let (code, _) = first.terminate();
    assert_eq!(code, Some(0), "{}", first.logs());
    assert_eq!(
        bed.cri_status(image).await,
        (false, false),
        "no half image, no pin"
    );

    let second = Agent::with_image(&bed, "", image);
    healed(&bed, &second, image).await;
    assert_eq!(count(&first, "RunnerImagePrewarmed", image), 0);
}

#[tokio::test]
async fn containerd_killed_mid_pull_is_an_outage_not_a_failure_and_the_pull_completes() {
    let _g = serial().await;
    let bed = Bed::get();
    let _proxy = Proxy::start(PORT, bed.registry_port(), 8_000_000, 0).await;
    let image = &fresh_image(&bed, "killed");
    let agent = Agent::with_image(&bed, "", image);
    let done = format!("runner_warden_prewarm_progress_bytes{{image=\"{image}\",kind=\"done\"}}");
    agent.wait_metric(&done, S(30), |v| v > 1e6).await;

    let pid = std::fs::read_to_string(bed.dir.join("containerd.pid")).expect("containerd pid");
    let killed = Command::new("kill")
        .args(["-KILL", pid.trim()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // Gone (or a zombie) before it is started again.
    let stat = format!("/proc/{}/stat", pid.trim());
    agent
        .wait(S(10), "containerd gone", || async {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            (s.is_empty() || s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
                .then_some(())
        })
        .await;
    agent
        .wait_metric("runner_warden_runtime_up", S(30), |v| v == 0.0)
        .await;
    let started = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed"))
        .arg("start-containerd")
        .status()
        .expect("scripts/testbed start-containerd")
        .success();
    assert!(started, "containerd did not come back");
    healed(&bed, &agent, image).await;
    assert_eq!(
        count(&agent, "RunnerImagePullFailed", image),
        0,
        "containerd's outage is the node's, not the image's: {:?}",
        agent.findings()
    );
    agent
        .wait_metric("runner_warden_runtime_up", S(10), |v| v == 1.0)
        .await;
}

/// A registry that trades the pull secret for a bearer token and redirects blob fetches to signed URLs,
/// whose "CDN" is down at first: containerd's error quotes the signed URL. The agent's finding keeps the
/// URL's path (which blob failed) and drops its query; neither the token, the signature nor the password
/// reaches a finding, a log line or a metric — then, with the CDN back, the image is prewarmed through
/// the same token flow.
#[tokio::test]
async fn a_token_registry_with_signed_redirects_leaks_neither_token_nor_signature() {
    use common::registry_front::{TokenRegistry, SIGNATURE, TOKEN};
    let _g = serial().await;
    let bed = Bed::get();
    let front = TokenRegistry::start(PORT, bed.registry_port(), &bed.user, &bed.password).await;
    let image = &fresh_image(&bed, "token");
    let agent = Agent::with_image(&bed, "", image);
    let failed = agent
        .wait_finding("RunnerImagePullFailed", image, S(60))
        .await;
    let message = failed["message"].as_str().unwrap_or_default().to_string();
    assert!(
        message.contains("/cdn/v2/"),
        "containerd quoted the redirect target (else this drill proves nothing): {message}"
    );
    assert!(
        front.tokens_issued.load(Ordering::Relaxed) >= 1
            && front.bearer_requests.load(Ordering::Relaxed) >= 1,
        "containerd went through the token flow"
    );
    let leaked = |what: &str| {
        let everything = [agent.findings_raw(), agent.logs()];
        [TOKEN, SIGNATURE, bed.password.as_str()]
            .iter()
            .find(|secret| everything.iter().any(|text| text.contains(*secret)))
            .map(|secret| format!("{what}: {secret:?} leaked"))
    };
    assert_eq!(leaked("while failing"), None, "{}", agent.logs());
    let m = agent.metrics().await;
    assert!(!m.contains(TOKEN) && !m.contains(SIGNATURE), "{m}");

    front.cdn_down.store(false, Ordering::Relaxed);
    healed(&bed, &agent, image).await;
    assert_eq!(leaked("after healing"), None, "{}", agent.logs());
    let m = agent.metrics().await;
    assert!(!m.contains(TOKEN) && !m.contains(SIGNATURE), "{m}");
}
