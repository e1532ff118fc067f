//! The node's kubelet credential provider plugins (KEP-2133) on the real bed: the bed's own plugin
//! (scripts/lib/bed-credential-provider, a shell script that answers the bed registry's login and logs
//! each call with its caller) run by the agent for images that have no pull secret, and — on the cluster —
//! by kubelet 1.20 itself from the same files.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const S: fn(u64) -> Duration = Duration::from_secs;
const PLUGIN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/scripts/lib/bed-credential-provider"
);

/// One provider of a config: its name (the plugin's file name), the argument that picks its fault (or
/// none), its `matchImages`.
struct Provider<'a> {
    name: &'a str,
    arg: Option<&'a str>,
    match_images: String,
}

/// Writes `<dir>/config.yaml` (`kubelet.config.k8s.io/v1`, plugin API v1) and `<dir>/bin/<name>` for
/// each provider; every call is logged to `<dir>/calls.log`.
fn provider_files(bed: &Bed, dir: &Path, providers: &[Provider]) -> (PathBuf, PathBuf, PathBuf) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("calls.log");
    let mut yaml = String::from(
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n",
    );
    for p in providers {
        std::fs::copy(PLUGIN, bin.join(p.name)).unwrap();
        yaml += &format!(
            "- name: {}\n  apiVersion: credentialprovider.kubelet.k8s.io/v1\n  matchImages: [\"{}\"]\n  defaultCacheDuration: \"0\"\n  args: [{}]\n  env:\n  - {{name: BED_PLUGIN_LOG, value: \"{}\"}}\n  - {{name: BED_AUTH_KEY, value: \"{}\"}}\n  - {{name: BED_USER, value: \"{}\"}}\n  - {{name: BED_PASSWORD, value: \"{}\"}}\n  - {{name: BED_CACHE_KEY_TYPE, value: Registry}}\n",
            p.name,
            p.match_images,
            p.arg.map(|a| format!("\"{a}\"")).unwrap_or_default(),
            log.display(),
            bed.registry,
            bed.user,
            bed.password
        );
    }
    let config = dir.join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    (config, bin, log)
}

/// The calls the plugin logged, as (caller, image).
fn calls(log: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let caller = l.split(" caller=").nth(1)?.split(' ').next()?.to_string();
            let image = l.split(" image=").nth(1)?.to_string();
            Some((caller, image))
        })
        .collect()
}

/// The password (which the plugins answer, or print on purpose when they fail) is in no log line,
/// finding, metric or status the agent wrote.
async fn password_nowhere(agent: &Agent, bed: &Bed, metrics: String) {
    let status = agent
        .get("/status")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    for (what, text) in [
        ("log", agent.logs()),
        ("findings", agent.findings_raw()),
        ("metrics", metrics),
        ("status", status),
    ] {
        assert!(
            !text.contains(&bed.password),
            "the password leaked into the {what}"
        );
    }
}

fn section(config: &Path, bin: &Path, extra: &str) -> String {
    format!(
        "[credential_providers]\nconfig = \"{}\"\nbin_dir = \"{}\"\n{extra}\n",
        config.display(),
        bin.display()
    )
}

/// Three private images with no pull secret in one registry: the provider's login pulls them all, its
/// plugin runs once (`cacheKeyType: Registry`, an hour), though two pulls ask at the same time; the
/// password is nowhere the agent writes.
#[tokio::test]
async fn images_without_a_pull_secret_are_prewarmed_with_the_providers_login_one_run_per_registry()
{
    let _g = serial().await;
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let (config, bin, log) = provider_files(
        &bed,
        dir.path(),
        &[Provider {
            name: "bed",
            arg: None,
            match_images: format!("{}/provided", bed.registry),
        }],
    );
    let images: Vec<String> = (0..3)
        .map(|i| bed.image(&bed.push_fresh(&format!("provided/cp-{i}"), &["1"])))
        .collect();
    let mut toml = section(&config, &bin, "");
    for i in &images {
        toml += &format!("[[images]]\nimage = \"{i}\"\n");
    }
    let agent = Agent::start(&bed, "concurrency = 3", &toml);
    agent
        .wait_metric(
            "runner_warden_prewarm_images{state=\"ready\"}",
            S(90),
            |v| v == 3.0,
        )
        .await;
    for i in &images {
        assert!(bed.cri_status(i).await.0, "{i} present");
    }
    let runs = calls(&log);
    assert_eq!(runs.len(), 1, "one plugin run for the registry: {runs:?}");
    assert_eq!(runs[0].0, "runner-warden");
    assert!(
        images.iter().any(|i| i.starts_with(&runs[0].1)),
        "asked about registry/repository: {runs:?}"
    );
    let m = agent.metrics().await;
    assert_eq!(
        metric(
            &m,
            "runner_warden_credential_provider_lookups_total{provider=\"bed\",result=\"answered\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "runner_warden_credential_provider_lookups_total{provider=\"bed\",result=\"cached\"}"
        ),
        Some(2.0)
    );
    password_nowhere(&agent, &bed, m).await;
}

/// Plugins that exit non-zero, never answer, print garbage or flood: each is one WARN line naming the
/// provider (never what it printed, which here holds the password), a metric, and the pull goes on with
/// the pull secret; the agent keeps answering meanwhile. An image with no other credential fails with a
/// message saying what each provider did.
#[tokio::test]
async fn failing_plugins_leave_the_agent_serving_and_the_pull_secret_still_pulls() {
    let _g = serial().await;
    let bed = Bed::get();
    let dir = tempfile::tempdir().unwrap();
    let pattern = format!("{}/provided", bed.registry);
    let (config, bin, log) = provider_files(
        &bed,
        dir.path(),
        &[
            Provider {
                name: "bed-fails",
                arg: Some("--fail"),
                match_images: pattern.clone(),
            },
            Provider {
                name: "bed-hangs",
                arg: Some("--hang"),
                match_images: pattern.clone(),
            },
            Provider {
                name: "bed-garbage",
                arg: Some("--garbage"),
                match_images: pattern.clone(),
            },
            Provider {
                name: "bed-floods",
                arg: Some("--flood"),
                match_images: pattern.clone(),
            },
        ],
    );
    let with_secret = bed.image(&bed.push_fresh("provided/cp-secret", &["1"]));
    let without = bed.image(&bed.push_fresh("provided/cp-nothing", &["1"]));
    let secret = bed.good_secret(dir.path());
    let toml = format!(
        "{}[[images]]\nimage = \"{with_secret}\"\npull_secret = \"{}\"\n[[images]]\nimage = \"{without}\"\n",
        section(&config, &bin, "timeout = \"2s\""),
        secret.display()
    );
    let agent = Agent::start(&bed, "failure_finding_after = 1", &toml);
    // While a plugin hangs, the agent answers.
    agent
        .wait(S(30), "a plugin run in progress", || async {
            (!calls(&log).is_empty()).then_some(())
        })
        .await;
    let (code, _) = agent.get("/healthz").await.expect("/healthz answers");
    assert_eq!(code, 200);
    agent
        .wait(S(60), "the image with a pull secret present", || async {
            bed.cri_status(&with_secret).await.0.then_some(())
        })
        .await;
    let failed = agent
        .wait_finding("RunnerImagePullFailed", &without, S(60))
        .await;
    let message = failed["message"].as_str().unwrap().to_string();
    for want in [
        "bed-fails (failed: exited with exit status: 1)",
        "bed-hangs (failed: did not answer within 2s; killed)",
        "bed-garbage (failed: its answer is not a CredentialProviderResponse",
        "bed-floods (failed: printed more than 1048576 bytes)",
        "gave 0 login(s)",
    ] {
        assert!(message.contains(want), "{want:?} not in {message}");
    }
    let logs = agent.logs();
    for p in ["bed-fails", "bed-hangs", "bed-garbage", "bed-floods"] {
        assert!(
            logs.lines()
                .any(|l| l.contains("WARN")
                    && l.contains(&format!("credential provider {p} failed"))),
            "no WARN line for {p}"
        );
        let series = format!(
            "runner_warden_credential_provider_lookups_total{{provider=\"{p}\",result=\"failed\"}}"
        );
        assert!(
            metric(&agent.metrics().await, &series).unwrap_or(0.0) >= 1.0,
            "{series}"
        );
    }
    password_nowhere(&agent, &bed, agent.metrics().await).await;
    assert!(agent.child_alive());
}

/// Named so `scripts/test` runs it with the cluster (`--skip on_a_cluster::` elsewhere).
mod on_a_cluster {
    use super::*;
    use crate::common::cluster::{runner_pod, Cluster, COMPLIANT};

    /// Kubelet 1.20 (alpha `KubeletCredentialProviders`, config and plugin API v1alpha1) and the agent
    /// read the same files (scripts/cluster writes them): the agent prewarms a project's private image
    /// that has no pull secret, and a runner pod with no `imagePullSecrets` and `imagePullPolicy: Always`
    /// starts, kubelet pulling with the plugin's login. The plugin's log shows both callers.
    #[tokio::test]
    async fn kubelet_and_the_agent_pull_with_the_same_credential_provider() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let env = std::fs::read_to_string(k.dir.join("env")).unwrap();
        let get = |key: &str| -> PathBuf {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} not in the cluster env"))
                .into()
        };
        let (config, bin, log) = (
            get("RW_CREDENTIAL_PROVIDER_CONFIG"),
            get("RW_CREDENTIAL_PROVIDER_BIN_DIR"),
            get("RW_CREDENTIAL_PROVIDER_LOG"),
        );
        let repo_tag = format!(
            "provided/kubelet-{}:v1",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        retag(&bed, "runners/runtime:v1", &repo_tag);
        let image = bed.image(&repo_tag);
        let ns = "rw-credprov";
        k.project(&bed, ns).await;
        let agent = k
            .agent_with(
                &bed,
                &[
                    ("CUSTOM_RUNNER_IMAGE_ENABLED", "true"),
                    ("RUNNER_IMAGE_ALLOWED_REGISTRIES", "127.0.0.1:5000"),
                ],
                &section(&config, &bin, ""),
            )
            .await;
        k.project_settings(ns, &image, None);
        agent
            .wait(
                S(60),
                "the project's image present, with no pull secret",
                || async { bed.cri_status(&image).await.0.then_some(()) },
            )
            .await;
        k.wait_event(ns, "RunnerImagePrewarmed", "projectsettings", S(30))
            .await;

        let pod = runner_pod(ns, "session-cp-runner", &image, "", COMPLIANT)
            .replace("  imagePullSecrets: [{name: pull}]\n", "")
            .replace("imagePullPolicy: IfNotPresent", "imagePullPolicy: Always");
        assert!(!pod.contains("imagePullSecrets"));
        k.apply(&pod);
        let pulled = k.wait_event(ns, "Pulled", "session-cp-runner", S(60)).await;
        let note = pulled.note.unwrap_or_default();
        assert!(
            note.contains("Successfully pulled"),
            "kubelet pulled it: {note}"
        );
        k.wait_event(ns, "Started", "session-cp-runner", S(60))
            .await;

        let callers: Vec<String> = calls(&log)
            .into_iter()
            .filter(|(_, i)| image.starts_with(i.as_str()))
            .map(|(c, _)| c)
            .collect();
        assert!(callers.iter().any(|c| c == "runner-warden"), "{callers:?}");
        assert!(callers.iter().any(|c| c == "kubelet"), "{callers:?}");
        for text in [agent.logs(), agent.findings_raw()] {
            assert!(!text.contains(&bed.password), "the password leaked");
        }
        k.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }
}
