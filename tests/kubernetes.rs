//! runner-warden on a real single-node Kubernetes (scripts/cluster: apiserver, controller-manager, scheduler,
//! kubelet on the test bed's containerd). The agent runs with the runner-warden ServiceAccount's token and
//! deploy/rbac's ClusterRole, so a missing verb fails these tests.

mod common;

/// Named so `scripts/test` can run these apart (`--skip on_a_cluster::`): kubelet must not run beside the
/// bed's other tests (it kills CRI pods it does not own).
mod on_a_cluster {
    use std::time::Duration;

    use crate::common::cluster::{runner_pod, stubborn_runner_pod, Cluster, COMPLIANT};
    use crate::common::*;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::Api;
    use kube::ResourceExt;

    const S: fn(u64) -> Duration = Duration::from_secs;

    /// `scripts/cluster CMD` (the API-server drills stop and start it), which must succeed.
    fn cluster(cmd: &str) {
        let ok =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster"))
                .arg(cmd)
                .status()
                .expect("run scripts/cluster")
                .success();
        assert!(ok, "scripts/cluster {cmd} failed");
    }
    /// The API server stopped (a drill); started again by `restart` or, if the test fails first, on
    /// drop — so a failing drill does not fail every later test with it.
    struct ApiServerAway {
        restarted: bool,
    }

    impl ApiServerAway {
        fn stop() -> Self {
            cluster("stop-apiserver");
            Self { restarted: false }
        }

        fn restart(mut self) {
            self.restarted = true;
            cluster("start-apiserver");
        }
    }

    impl Drop for ApiServerAway {
        fn drop(&mut self) {
            if !self.restarted {
                let _ = std::process::Command::new(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/scripts/cluster"
                ))
                .arg("start-apiserver")
                .status();
            }
        }
    }

    const ENV: [(&str, &str); 2] = [
        ("CUSTOM_RUNNER_IMAGE_ENABLED", "true"),
        // The platform compares host and port: the bed registry and the test proxies in front of it.
        (
            "RUNNER_IMAGE_ALLOWED_REGISTRIES",
            "127.0.0.1:5000,127.0.0.1:5001,127.0.0.1:5002,127.0.0.1:5003,127.0.0.1:5004",
        ),
    ];

    #[tokio::test]
    async fn project_images_are_prewarmed_pinned_and_start_without_a_pull() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let image = bed.image("k8s/prewarm-a:v1");
        retag(&bed, "runners/runtime:v1", "k8s/prewarm-a:v1");
        bed.remove_repo(&format!("{}/k8s/prewarm-a", bed.registry))
            .await;
        k.project(&bed, "rw-prewarm").await;
        let agent = k.agent(&bed, &ENV).await;
        k.project_settings("rw-prewarm", &image, Some("pull"));

        agent
            .wait(
                S(60),
                "the project's image pinned in containerd",
                || async { (bed.cri_status(&image).await == (true, true)).then_some(()) },
            )
            .await;
        let ev = k
            .wait_event(
                "rw-prewarm",
                "RunnerImagePrewarmed",
                "projectsettings",
                S(30),
            )
            .await;
        assert_eq!(ev.type_.as_deref(), Some("Normal"));
        assert_eq!(
            ev.reporting_controller.as_deref(),
            Some("ambient-code.io/runner-warden")
        );
        assert_eq!(
            ev.reporting_instance.as_deref(),
            Some(format!("runner-warden-{}", k.node).as_str())
        );
        let regarding = ev.regarding.clone().unwrap();
        assert_eq!(regarding.kind.as_deref(), Some("ProjectSettings"));
        assert!(
            regarding.uid.is_some(),
            "kubectl describe matches by uid: {ev:?}"
        );
        // `kubectl describe ps` shows it.
        let described = k.kubectl(&[
            "-n",
            "rw-prewarm",
            "describe",
            "projectsettings",
            "projectsettings",
        ]);
        assert!(described.contains("RunnerImagePrewarmed"), "{described}");

        // A runner pod created now starts from the prewarmed image: kubelet does not pull.
        k.apply(&runner_pod(
            "rw-prewarm",
            "session-1-runner",
            &image,
            "",
            COMPLIANT,
        ));
        let pulled = k
            .wait_event("rw-prewarm", "Pulled", "session-1-runner", S(60))
            .await;
        let note = pulled.note.unwrap_or_default();
        assert!(note.contains("already present on machine"), "{note}");

        // The registry password is nowhere: agent log, findings, events.
        let all_notes: Vec<String> = k
            .events("rw-prewarm", "RunnerImagePrewarmed", "projectsettings")
            .await
            .into_iter()
            .filter_map(|e| e.note)
            .collect();
        for text in [agent.logs(), agent.findings_raw(), all_notes.join("\n")] {
            assert!(
                !text.contains(&bed.password),
                "the registry password leaked"
            );
        }
        k.kubectl(&["delete", "namespace", "rw-prewarm", "--wait=false"]);
    }

    #[tokio::test]
    async fn bad_project_settings_are_events_on_the_project_settings() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let image = bed.image("runners/compliant:v1");
        for ns in ["rw-missing", "rw-wrongtype", "rw-cross", "rw-registry"] {
            k.project(&bed, ns).await;
        }
        k.kubectl(&[
            "-n",
            "rw-wrongtype",
            "create",
            "secret",
            "generic",
            "opaque",
            "--from-literal=a=b",
        ]);
        let agent = k.agent(&bed, &ENV).await;
        k.project_settings("rw-missing", &image, Some("nope"));
        k.project_settings("rw-wrongtype", &image, Some("opaque"));
        k.project_settings("rw-cross", &image, Some("rw-missing/pull"));
        k.project_settings("rw-registry", "quay.io/evil/runner:1", Some("pull"));

        for (ns, reason, says) in [
            (
                "rw-missing",
                "RunnerImagePullSecretInvalid",
                "Secret rw-missing/nope (spec.runnerImagePullSecret) does not exist",
            ),
            (
                "rw-wrongtype",
                "RunnerImagePullSecretInvalid",
                "has type Opaque, not kubernetes.io/dockerconfigjson",
            ),
            (
                "rw-cross",
                "RunnerImagePullSecretInvalid",
                "must name a Secret in namespace rw-cross",
            ),
            (
                "rw-registry",
                "RunnerImageRegistryNotAllowed",
                "not in RUNNER_IMAGE_ALLOWED_REGISTRIES",
            ),
        ] {
            let ev = k.wait_event(ns, reason, "projectsettings", S(45)).await;
            let note = ev.note.clone().unwrap_or_default();
            assert!(note.contains(says), "{ns}: {note}");
            assert_eq!(ev.type_.as_deref(), Some("Warning"));
            assert!(note.len() <= 1024);
        }
        // This node holds the reporter lease, so it wrote the cluster-wide findings; no secret leaked.
        assert!(
            agent.logs().contains("reporter lease taken"),
            "{}",
            agent.logs()
        );
        assert!(!agent.logs().contains(&bed.password));
        // The disallowed image is not pulled.
        assert_eq!(
            bed.cri_status("quay.io/evil/runner:1").await,
            (false, false)
        );
        for ns in ["rw-missing", "rw-wrongtype", "rw-cross", "rw-registry"] {
            k.kubectl(&["delete", "namespace", ns, "--wait=false"]);
        }
    }

    #[tokio::test]
    async fn runtime_and_shutdown_violations_are_events_on_the_runner_pod() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        k.project(&bed, "rw-pods").await;
        let agent = k.agent(&bed, &ENV).await;
        agent
            .wait_metric("runner_warden_task_events_up", S(15), |v| v == 1.0)
            .await;
        k.apply(&runner_pod(
            "rw-pods",
            "session-root-runner",
            &bed.image("runners/runtime:v1"),
            "",
            "{runAsUser: 0, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}",
        ));
        let port = free_port();
        k.apply(&stubborn_runner_pod(
            &bed,
            "rw-pods",
            "session-stubborn-runner",
            port,
        ));
        // A namespace with an OpenShift UID range the runner's UID 1001 is outside of.
        k.project(&bed, "rw-range").await;
        k.kubectl(&[
            "annotate",
            "namespace",
            "rw-range",
            "openshift.io/sa.scc.uid-range=5000/10",
        ]);
        k.apply(&runner_pod(
            "rw-range",
            "session-range-runner",
            &bed.image("runners/runtime:v1"),
            "",
            COMPLIANT,
        ));
        let pods: Api<Pod> = Api::namespaced(k.admin().await, "rw-pods");
        let root = k
            .wait_event(
                "rw-pods",
                "RunnerRunningAsRoot",
                "session-root-runner",
                S(60),
            )
            .await;
        let pod = pods.get("session-root-runner").await.unwrap();
        assert_eq!(root.regarding.as_ref().unwrap().uid, pod.uid());
        assert_eq!(
            root.regarding.as_ref().unwrap().kind.as_deref(),
            Some("Pod")
        );

        wait_for(S(60), "the stubborn runner running", || async {
            let p = pods.get("session-stubborn-runner").await.ok()?;
            (p.status?.phase? == "Running").then_some(())
        })
        .await;
        // The runner says "listening" once its SIGTERM handler is installed.
        k.wait_listening("rw-pods", "session-stubborn-runner").await;
        k.kubectl(&[
            "-n",
            "rw-pods",
            "delete",
            "pod",
            "session-stubborn-runner",
            "--wait=false",
        ]);
        let killed = k
            .wait_event(
                "rw-pods",
                "RunnerShutdownKilled",
                "session-stubborn-runner",
                S(30),
            )
            .await;
        let note = killed.note.unwrap_or_default();
        assert!(note.contains("3 s grace period"), "{note}");
        let secs: f64 = note
            .split("SIGKILLed after ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no seconds in {note}"));
        // The clock starts at the deletion; kubelet signals 0.1–0.8 s later on an idle node (1.7 s seen
        // under CI load) and SIGKILLs `grace` after the signal.
        assert!((3.0..6.5).contains(&secs), "{note}");
        let m = agent.metrics().await;
        assert_eq!(
            metric(&m, "runner_warden_shutdowns_total{outcome=\"sigkilled\"}"),
            Some(1.0)
        );
        let drift = k
            .wait_event("rw-range", "RunnerUIDDrift", "session-range-runner", S(60))
            .await;
        let note = drift.note.unwrap_or_default();
        assert!(note.contains("5000"), "{note}");
        k.kubectl(&["delete", "namespace", "rw-pods", "--wait=false"]);
        k.kubectl(&["delete", "namespace", "rw-range", "--wait=false"]);
    }

    #[tokio::test]
    async fn a_repeated_finding_is_written_at_most_25_times() {
        use runner_warden::report::findings::{Finding, Level, Regarding};
        let _g = serial().await;
        let k = Cluster::get();
        // Left from an earlier run, or new.
        let _ = k.try_kubectl(&["create", "namespace", "rw-spam"]);
        let metrics = std::sync::Arc::new(runner_warden::report::metrics::Metrics::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let (queue, _task) = runner_warden::report::events::spawn(
            k.admin().await,
            &k.node,
            std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
            std::sync::Arc::new(|_: &Regarding| None),
            metrics.clone(),
            Default::default(),
            stop.clone(),
        );
        let f = Finding::new(
            "RunnerRunningAsRoot",
            Level::Warning,
            Regarding::pod("rw-spam", "session-spam-runner"),
            "runner process 1 runs as UID 0".into(),
        );
        for _ in 0..30 {
            queue.push(&f);
        }
        let count = |r: &str| metrics.events_total.with_label_values(&[r]).get();
        wait_for(S(30), "30 findings through the limiter", || async {
            (count("written") + count("spam_limited") == 30).then_some(())
        })
        .await;
        assert_eq!(count("written"), 25);
        assert_eq!(count("spam_limited"), 5);
        // In the API: one Event whose series counts the 25 writes.
        let evs = k
            .events("rw-spam", "RunnerRunningAsRoot", "session-spam-runner")
            .await;
        let total: i32 = evs
            .iter()
            .map(|e| e.series.as_ref().map(|s| s.count).unwrap_or(1))
            .sum();
        assert_eq!(total, 25, "{evs:?}");
        stop.cancel();
        k.kubectl(&["delete", "namespace", "rw-spam", "--wait=false"]);
    }

    #[tokio::test]
    async fn the_agent_registry_keeps_its_images_through_a_broken_edit() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        k.project(&bed, "rw-registry").await;
        let image = bed.image("runners/compliant:v1");
        let registry = |json: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ambient-agent-registry, namespace: rw-registry}}\ndata:\n  agent-registry.json: '{json}'\n")
        };
        k.apply(&registry(&format!(
            r#"[{{"container":{{"image":"{image}"}}}}]"#
        )));
        let agent = k
            .agent_with(
                &bed,
                &ENV,
                "[kubernetes]\nagent_registry = \"rw-registry/ambient-agent-registry\"\n",
            )
            .await;
        let desired = || async {
            image_states(&agent)
                .await
                .filter(|s| s.contains_key(&image))
                .map(|_| ())
        };
        agent
            .wait(S(60), "the registry's image desired", desired)
            .await;
        // A broken edit (or a failed read) keeps what the registry named before.
        k.apply(&registry("[not json"));
        agent
            .wait(S(60), "the broken edit noticed", || async {
                agent
                    .logs()
                    .contains("keeping the images it named before")
                    .then_some(())
            })
            .await;
        assert!(
            desired().await.is_some(),
            "the image left the desired set:\n{}",
            agent.logs()
        );
        k.kubectl(&["delete", "namespace", "rw-registry", "--wait=false"]);
    }

    /// Issue 25 item 1: a session pod pulls more than its runner image. A pod shaped as the control plane
    /// makes it (runner + `ambient-mcp` sidecar, `imagePullPolicy: Always`, the project's pull Secret),
    /// bound to a second Node with no kubelet, so it never runs anywhere: the reporter learns its images
    /// from the cluster-wide watch, publishes them in the session-images ConfigMap, and this node pulls
    /// them with the pod's own Secret (the bed's registry refuses anonymous pulls) and keeps them after
    /// the pod is gone.
    #[tokio::test]
    async fn every_image_of_a_session_pod_on_any_node_is_prewarmed_here_with_the_pods_secret() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let (runner, sidecar) = (
            bed.image("k8s/session-runner:v1"),
            bed.image("k8s/session-mcp:v1"),
        );
        retag(&bed, "runners/runtime:v1", "k8s/session-runner:v1");
        retag(&bed, "runners/audit-twin:v1", "k8s/session-mcp:v1");
        for i in [&runner, &sidecar] {
            bed.remove_repo(i.rsplit_once(':').unwrap().0).await;
        }
        k.project(&bed, "rw-session").await;
        let _ = k.try_kubectl(&[
            "-n",
            "runner-warden",
            "delete",
            "configmap",
            "runner-warden-session-images",
        ]);
        k.apply("apiVersion: v1\nkind: Node\nmetadata:\n  name: rw-ghost-node\n");
        k.apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: session-ghost-runner
  namespace: rw-session
  labels:
    ambient-code.io/session-id: ghost
    ambient-code.io/project-id: rw-session
    ambient-code.io/managed: "true"
    ambient-code.io/managed-by: ambient-control-plane
spec:
  nodeName: rw-ghost-node
  terminationGracePeriodSeconds: 60
  imagePullSecrets: [{{name: pull}}]
  containers:
  - name: ambient-code-runner
    image: "{runner}"
    imagePullPolicy: Always
    securityContext: {COMPLIANT}
  - name: ambient-mcp
    image: "{sidecar}"
    imagePullPolicy: Always
"#
        ));
        // No ProjectSettings names either image: only the pod does.
        let agent = k.agent(&bed, &ENV).await;
        for image in [&runner, &sidecar] {
            agent
                .wait(S(120), "the session pod's image pulled here", || async {
                    (bed.cri_status(image).await.0).then_some(())
                })
                .await;
        }
        let doc = k.kubectl(&[
            "-n",
            "runner-warden",
            "get",
            "configmap",
            "runner-warden-session-images",
            "-o",
            "jsonpath={.data.session-images\\.json}",
        ]);
        let doc: serde_json::Value = serde_json::from_str(&doc).expect(&doc);
        let mcp = doc["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["image"] == sidecar.as_str())
            .unwrap_or_else(|| panic!("{doc}"));
        assert_eq!(mcp["users"][0]["namespace"], "rw-session");
        assert_eq!(mcp["users"][0]["pullSecrets"], serde_json::json!(["pull"]));
        let states = image_states(&agent).await.unwrap();
        assert_eq!(
            states.get(&sidecar).map(String::as_str),
            Some("ready"),
            "{states:?}"
        );
        // The pod gone, its images stay (forgotten a week after their last pod).
        k.kubectl(&[
            "-n",
            "rw-session",
            "delete",
            "pod",
            "session-ghost-runner",
            "--grace-period=0",
            "--force",
        ]);
        tokio::time::sleep(S(35)).await;
        let states = image_states(&agent).await.unwrap();
        assert!(states.contains_key(&sidecar), "{states:?}");
        for text in [agent.logs(), agent.findings_raw()] {
            assert!(
                !text.contains(&bed.password),
                "the registry password leaked"
            );
        }
        k.kubectl(&["delete", "node", "rw-ghost-node", "--wait=false"]);
        k.kubectl(&["delete", "namespace", "rw-session", "--wait=false"]);
        let _ = k.try_kubectl(&[
            "-n",
            "runner-warden",
            "delete",
            "configmap",
            "runner-warden-session-images",
        ]);
    }

    /// Issue 25 item 3: the test cluster holds the platform's own ProjectSettings schema (PR #1584), not a
    /// looser one of ours: `spec.groupAccess` is required, the singular is upstream's, unknown fields are
    /// pruned — so every ProjectSettings these tests create is one the platform would accept.
    #[tokio::test]
    async fn the_test_cluster_holds_the_platforms_own_projectsettings_schema() {
        let _g = serial().await;
        let k = Cluster::get();
        let singular = k.kubectl(&[
            "get",
            "crd",
            "projectsettings.vteam.ambient-code",
            "-o",
            "jsonpath={.spec.names.singular}",
        ]);
        assert_eq!(singular.trim(), "projectsetting");
        let _ = k.try_kubectl(&["create", "namespace", "rw-schema"]);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ps.yaml");
        std::fs::write(
            &file,
            "apiVersion: vteam.ambient-code/v1alpha1\nkind: ProjectSettings\nmetadata:\n  name: projectsettings\n  namespace: rw-schema\nspec:\n  runnerImage: \"127.0.0.1:5000/x:1\"\n",
        )
        .unwrap();
        let out = k.try_kubectl(&["apply", "-f", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("groupAccess"),
            "a ProjectSettings without groupAccess must be refused: {err}"
        );
        k.kubectl(&["delete", "namespace", "rw-schema", "--wait=false"]);
    }

    /// The agent's desired images and their states, from `runner-warden status --output json`.
    async fn image_states(agent: &Agent) -> Option<std::collections::HashMap<String, String>> {
        let out = tokio::process::Command::new(BIN)
            .args(["status", "--output", "json", "--address"])
            .arg(format!("127.0.0.1:{}", agent.port))
            .output()
            .await
            .ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(
            doc["images"]
                .as_array()?
                .iter()
                .filter_map(|i| Some((i["image"].as_str()?.into(), i["state"].as_str()?.into())))
                .collect(),
        )
    }

    fn pulled(agent_metrics: &str) -> f64 {
        metric(
            agent_metrics,
            "runner_warden_prewarm_pulls_total{result=\"success\"}",
        )
        .unwrap_or(0.0)
    }

    /// Fault drill: the API server is away past the pull secret's refresh time. The failed Secret read
    /// keeps the last copy — the tag's re-resolutions during the outage still authenticate (a dropped copy
    /// would send them anonymous: 401) — and the failed agent-registry read keeps its image desired.
    #[tokio::test]
    async fn reads_that_fail_while_the_api_server_is_away_keep_the_last_secret_and_registry() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let ns = "rw-kept";
        k.project(&bed, ns).await;
        retag(&bed, "runners/compliant:v1", "k8s/kept:v1");
        let image = bed.image("k8s/kept:v1");
        bed.remove_repo(&format!("{}/k8s/kept", bed.registry)).await;
        // The registry's image has no secret: its pulls fail (auth); only its place in the set matters.
        let default_image = bed.image("k8s/kept-default:v1");
        k.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: ambient-agent-registry, namespace: {ns}}}\ndata:\n  agent-registry.json: '[{{\"container\":{{\"image\":\"{default_image}\"}}}}]'\n"
        ));
        k.project_settings(ns, &image, Some("pull"));
        let agent = k
            .agent_configured(
                &bed,
                &ENV,
                "resolve_interval = \"3s\"\n",
                // The node resolves its tags itself (as without a reporter), so its re-resolutions
                // during the outage show which credentials it uses; with central tags the reporter
                // would resolve, and it stops publishing once its Lease lapses with the API server.
                &format!(
                    "[kubernetes]\nsecret_refresh = \"2s\"\nagent_registry = \"{ns}/ambient-agent-registry\"\n[fleet]\ncentral_tags = false\n"
                ),
            )
            .await;
        agent
            .wait_finding("RunnerImagePrewarmed", &image, S(60))
            .await;
        let desired = || async {
            image_states(&agent)
                .await
                .is_some_and(|s| s.contains_key(&default_image))
        };
        agent
            .wait(S(30), "the registry's image desired", || async {
                desired().await.then_some(())
            })
            .await;

        let away = ApiServerAway::stop();
        agent
            .wait_metric("runner_warden_api_server_up", S(60), |v| v == 0.0)
            .await;
        // The next reconcile (at most 30 s on) finds the copy past its refresh time and cannot read it.
        agent
            .wait(
                S(90),
                "a failed Secret read and a failed registry read",
                || async {
                    let logs = agent.logs();
                    (logs.contains("pull secret not refreshed; keeping the last copy")
                        && logs.contains(
                            "agent registry not read; keeping the images it named before",
                        ))
                    .then_some(())
                },
            )
            .await;
        let before = pulled(&agent.metrics().await);
        agent
            .wait(
                S(60),
                "two authenticated re-resolutions during the outage",
                || async { (pulled(&agent.metrics().await) >= before + 2.0).then_some(()) },
            )
            .await;
        let failed = agent
            .findings()
            .into_iter()
            .filter(|f| f["reason"] == "RunnerImagePullFailed" && f["image"] == image.as_str())
            .count();
        assert_eq!(
            failed,
            0,
            "a pull went without the secret:\n{}",
            agent.logs()
        );
        assert!(
            desired().await,
            "the agent registry's image left the desired set"
        );
        assert_eq!(
            bed.cri_status(&image).await,
            (true, true),
            "still present and pinned"
        );
        away.restart();
        agent
            .wait_metric("runner_warden_api_server_up", S(90), |v| v == 1.0)
            .await;
        k.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }

    /// Fault drill at scale: 200 ProjectSettings over 20 images and 5 credentials (an image's projects
    /// share one; a front before the registry accepts each credential for its own images only) → exactly
    /// 20 resolutions, each with its image's credential, no credential refused, every image pinned.
    #[tokio::test]
    async fn two_hundred_projects_over_twenty_images_pull_each_once_with_its_own_secret() {
        use crate::common::registry_front::CredentialFront;
        use base64::Engine;
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let tenant = |j: usize| format!("tenant-{}", j % 5);
        let users: std::collections::HashMap<String, String> = (0..5)
            .map(|c| (tenant(c), format!("pw-{c}-{run}")))
            .collect();
        let front = CredentialFront::start(
            5003,
            bed.registry_port(),
            &bed.user,
            &bed.password,
            users.clone(),
            move |user, repo| {
                repo.rsplit_once("/img-")
                    .and_then(|(_, j)| j.parse::<usize>().ok())
                    .is_some_and(|j| user == tenant(j))
            },
        )
        .await;
        let repo = |j: usize| format!("many-{run}/img-{j}");
        for j in 0..20 {
            retag(&bed, "runners/compliant:v1", &format!("{}:v1", repo(j)));
        }
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut yaml = String::new();
        for p in 0..200 {
            let j = p % 20;
            let user = tenant(j);
            let config = serde_json::json!({"auths": {"127.0.0.1:5003": {
                "auth": b64(&format!("{user}:{}", users[&user]))
            }}})
            .to_string();
            yaml += &format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: rw-many-{run}-{p}\n  labels: {{rw-drill: many}}\n\
                 ---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: pull\n  namespace: rw-many-{run}-{p}\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {}\n\
                 ---\napiVersion: vteam.ambient-code/v1alpha1\nkind: ProjectSettings\nmetadata:\n  name: projectsettings\n  namespace: rw-many-{run}-{p}\nspec:\n  groupAccess: []\n  runnerImage: \"127.0.0.1:5003/{}:v1\"\n  runnerImagePullSecret: pull\n",
                b64(&config),
                repo(j)
            );
        }
        k.apply(&yaml);
        let agent = k.agent(&bed, &ENV).await;
        let ours: Vec<String> = (0..20)
            .map(|j| format!("127.0.0.1:5003/{}:v1", repo(j)))
            .collect();
        agent
            .wait(S(300), "all 20 images ready", || async {
                let states = image_states(&agent).await?;
                ours.iter()
                    .all(|i| states.get(i).is_some_and(|s| s == "ready"))
                    .then_some(())
            })
            .await;
        // A few more seconds: nothing is pulled again.
        tokio::time::sleep(S(5)).await;
        assert_eq!(front.refused.load(std::sync::atomic::Ordering::Relaxed), 0);
        let mut resolved = front.resolved.lock().unwrap().clone();
        resolved.sort();
        let mut expected: Vec<(String, String)> = (0..20).map(|j| (repo(j), tenant(j))).collect();
        expected.sort();
        assert_eq!(
            resolved, expected,
            "one resolution per image, each with its own credential"
        );
        // The 20 tags name one digest (retagged from one image): with tags resolved once per cluster a
        // node that holds the content under another name only points the tag at it, so at least one
        // pull, and each image present and pinned under its own name below.
        assert!(pulled(&agent.metrics().await) >= 1.0);
        for i in &ours {
            assert_eq!(
                bed.cri_status(i).await,
                (true, true),
                "{i} present and pinned"
            );
        }
        let logs = agent.logs();
        for password in users.values() {
            assert!(
                !logs.contains(password.as_str()),
                "a tenant's password leaked"
            );
        }
        k.kubectl(&["delete", "namespace", "-l", "rw-drill=many", "--wait=false"]);
    }

    #[tokio::test]
    async fn the_agent_recovers_when_the_api_server_comes_back() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        k.project(&bed, "rw-after").await;
        let agent = k.agent(&bed, &ENV).await;
        // Started up: cache synced and the node's object written (a start-up write still in flight while
        // the API server shuts down can be answered on a kept-alive connection: a second outage line).
        agent
            .wait(S(30), "the ProjectSettings cache synced", || async {
                let logs = agent.logs();
                (logs.contains("ProjectSettings cache synced")
                    && logs.contains("NodeRunnerImages written")
                    && logs.contains("runner pods of every node listed"))
                .then_some(())
            })
            .await;
        let away = ApiServerAway::stop();
        // Still serving metrics and alive while the API server is away.
        agent
            .holds(
                S(3),
                "/healthz and /metrics while the API server is away",
                || async {
                    agent.get("/healthz").await.is_some() && !agent.metrics().await.is_empty()
                },
            )
            .await;
        // The outage is a state: /readyz and api_server_up say so, and the log says it once.
        let why = agent
            .wait(S(60), "/readyz naming the API server", || async {
                let (code, body) = agent.get("/readyz").await?;
                (code == 503 && body.contains("API server https://127.0.0.1:6443 not reachable"))
                    .then_some(body)
            })
            .await;
        assert!(!why.contains("containerd"), "{why}");
        assert_eq!(
            metric(&agent.metrics().await, "runner_warden_api_server_up"),
            Some(0.0)
        );
        away.restart();
        agent
            .wait_metric("runner_warden_api_server_up", S(90), |v| v == 1.0)
            .await;
        let logs = agent.logs();
        assert!(logs.contains("API server reachable again"), "{logs}");
        let lost = logs.matches("API server unreachable").count();
        assert_eq!(lost, 1, "one line for one outage:\n{logs}");
        k.project_settings(
            "rw-after",
            &bed.image("runners/compliant:v1"),
            Some("missing"),
        );
        let ev = k
            .wait_event(
                "rw-after",
                "RunnerImagePullSecretInvalid",
                "projectsettings",
                S(90),
            )
            .await;
        assert!(ev.note.unwrap_or_default().contains("does not exist"));
        k.kubectl(&["delete", "namespace", "rw-after", "--wait=false"]);
    }

    /// Fault drill: findings made while the API server is away for a minute are Events once it is back.
    #[tokio::test]
    async fn findings_made_while_the_api_server_is_away_are_delivered_when_it_returns() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let ns = "rw-queued";
        k.project(&bed, ns).await;
        // The image is behind a proxy port that is closed for now: pulls fail (network) until it opens.
        k.kubectl(&[
            "-n",
            ns,
            "create",
            "secret",
            "docker-registry",
            "pull-proxy",
            "--docker-server=127.0.0.1:5004",
            &format!("--docker-username={}", bed.user),
            &format!("--docker-password={}", bed.password),
        ]);
        let image = "127.0.0.1:5004/runners/compliant:v1";
        bed.remove_repo("127.0.0.1:5004/runners/compliant").await;
        k.project_settings(ns, image, Some("pull-proxy"));
        let agent = k.agent(&bed, &ENV).await;
        agent
            .wait_metric(
                "runner_warden_prewarm_pulls_total{result=\"network\"}",
                S(60),
                |v| v >= 1.0,
            )
            .await;
        let away = ApiServerAway::stop();
        let stopped = std::time::Instant::now();
        agent
            .wait_metric("runner_warden_api_server_up", S(60), |v| v == 0.0)
            .await;
        // The registry path heals while the API server is away: the image is prewarmed, the finding queued.
        let _proxy = Proxy::start(5004, bed.registry_port(), 0, 0).await;
        agent
            .wait_finding("RunnerImagePrewarmed", image, S(60))
            .await;
        if let Some(rest) = S(60).checked_sub(stopped.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        away.restart();
        // A timeout shows the agent's log tail (it timed out once on a long-used bed).
        let ev = k
            .wait_event_explained(
                ns,
                "RunnerImagePrewarmed",
                "projectsettings",
                S(120),
                || agent.log_tail(),
            )
            .await;
        assert!(ev.note.unwrap_or_default().contains(image));
        let m = agent.metrics().await;
        assert_eq!(
            metric(&m, "runner_warden_events_total{result=\"dropped\"}"),
            Some(0.0),
            "nothing dropped"
        );
        assert_eq!(
            k.events(ns, "RunnerImagePrewarmed", "projectsettings")
                .await
                .len(),
            1,
            "delivered once"
        );
        k.kubectl(&["delete", "namespace", ns, "--wait=false"]);
    }

    #[tokio::test]
    async fn one_node_writes_cluster_wide_findings_and_another_takes_over() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        k.project(&bed, "rw-lease").await;
        let mut a = k.agent(&bed, &ENV).await;
        a.wait(S(30), "agent a to take the reporter lease", || async {
            a.logs().contains("reporter lease taken").then_some(())
        })
        .await;
        // A second agent as if on another node (same containerd, another NODE_NAME).
        let mut env = ENV.to_vec();
        env.push(("NODE_NAME", "vm-b"));
        let b = k.agent(&bed, &env).await;
        b.wait(S(30), "agent b to find the lease held", || async {
            b.logs()
                .contains("reporter lease held elsewhere")
                .then_some(())
        })
        .await;
        k.project_settings("rw-lease", "quay.io/evil/runner:1", None);
        let ev = k
            .wait_event(
                "rw-lease",
                "RunnerImageRegistryNotAllowed",
                "projectsettings",
                S(30),
            )
            .await;
        assert_eq!(ev.reporting_instance.as_deref(), Some("runner-warden-vm"));
        b.wait_metric(
            "runner_warden_events_total{result=\"other_node\"}",
            S(30),
            |v| v >= 1.0,
        )
        .await;
        let evs = k
            .events(
                "rw-lease",
                "RunnerImageRegistryNotAllowed",
                "projectsettings",
            )
            .await;
        assert_eq!(evs.len(), 1, "one node wrote it: {evs:?}");
        // The holder stops: it releases the lease, so the other node takes it at its next try (every
        // 10 s) instead of after the 30 s expiry.
        a.terminate();
        assert!(a.logs().contains("reporter lease released"), "{}", a.logs());
        b.wait(S(15), "agent b to take the lease over", || async {
            b.logs().contains("reporter lease taken").then_some(())
        })
        .await;
        // What it held back while the other node reported is written now: nothing is lost with a holder
        // (at the price of one repeat after a takeover).
        wait_for(S(30), "agent b's copy of the held-back finding", || async {
            k.events(
                "rw-lease",
                "RunnerImageRegistryNotAllowed",
                "projectsettings",
            )
            .await
            .into_iter()
            .find(|e| e.reporting_instance.as_deref() == Some("runner-warden-vm-b"))
        })
        .await;
        // Hand the lease back so the next test's agent (this node) need not wait for it to expire.
        drop(b);
        k.kubectl(&[
            "-n",
            "runner-warden",
            "delete",
            "lease",
            "runner-warden-reporter",
        ]);
        k.kubectl(&["delete", "namespace", "rw-lease", "--wait=false"]);
    }
}
