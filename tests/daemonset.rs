//! runner-warden as it runs in production: the DaemonSet pod that `scripts/cluster deploy` starts on the test
//! cluster's node from deploy/overlays/testbed (its own image, its ServiceAccount and RBAC, hostPID,
//! hostNetwork, the proc connector inside the pod). A real Prometheus scrapes it with the shipped alert rules,
//! and every dashboard query is evaluated there. `scripts/test` runs this after `scripts/cluster deploy`.

mod common;

/// Named so `scripts/test` can run it apart (`--skip as_a_daemonset::`).
mod as_a_daemonset {
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use crate::common::cluster::{runner_pod, stubborn_runner_pod, Cluster};
    use crate::common::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    /// deploy/overlays/testbed: the agent's metrics on the node's loopback.
    const AGENT_PORT: u16 = 9477;
    const ROOT: &str = env!("CARGO_MANIFEST_DIR");

    fn agent_logs(k: &Cluster) -> String {
        k.kubectl(&["-n", "runner-warden", "logs", "ds/runner-warden"])
    }

    /// A Prometheus on loopback scraping the pod agent every second with deploy/monitoring's rules.
    struct Prometheus {
        child: Child,
        port: u16,
        _dir: tempfile::TempDir,
    }

    impl Prometheus {
        fn start(node: &str) -> Prometheus {
            let dir = tempfile::tempdir().unwrap();
            let rules = dir.path().join("rules.yaml");
            let out = Command::new(format!("{ROOT}/scripts/check-deploy"))
                .arg("rules")
                .arg(&rules)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let port = free_port();
            let config = dir.path().join("prometheus.yml");
            std::fs::write(
                &config,
                format!(
                    "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: runner-warden\n    static_configs:\n      - targets: [\"127.0.0.1:{AGENT_PORT}\"]\n        labels: {{node: \"{node}\", namespace: runner-warden}}\n",
                    rules.display()
                ),
            )
            .unwrap();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
                .spawn()
                .expect("prometheus (scripts/deploy-install installs it)");
            Prometheus {
                child,
                port,
                _dir: dir,
            }
        }

        async fn api(&self, path: &str) -> serde_json::Value {
            let (code, body) = http_get(self.port, path).await.unwrap_or_default();
            serde_json::from_str(&body).unwrap_or_else(
                |_| serde_json::json!({"status": "error", "http": code, "body": body}),
            )
        }

        async fn query(&self, expr: &str) -> serde_json::Value {
            let q: String = url_encode(expr);
            self.api(&format!("/api/v1/query?query={q}")).await
        }
    }

    impl Drop for Prometheus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn url_encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// Every dashboard query with its variables set to "all".
    fn dashboard_queries() -> Vec<(String, String)> {
        let path = PathBuf::from(ROOT).join("deploy/dashboards/runner-warden.json");
        let d: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut out = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap()
                    .replace("$node", ".*")
                    .replace("$namespace", ".*")
                    .replace("$__rate_interval", "1m")
                    .replace("$__range", "1h");
                out.push((p["title"].as_str().unwrap().to_string(), expr));
            }
        }
        out
    }

    #[tokio::test]
    async fn the_pod_prewarms_audits_times_shutdowns_and_fires_alerts_on_the_node() {
        let _g = serial().await;
        let (bed, k) = (Bed::get(), Cluster::get());
        let (code, ready) = http_get(AGENT_PORT, "/readyz")
            .await
            .expect("the DaemonSet's agent on 127.0.0.1:9477 (scripts/cluster deploy first)");
        assert_eq!(code, 200, "{ready}");
        let prometheus = Prometheus::start(&k.node);

        // A project's image and secret → pinned on the node, RunnerImagePrewarmed on its ProjectSettings.
        let image = bed.image("k8s/daemonset-a:v1");
        retag(&bed, "runners/audit-root:v1", "k8s/daemonset-a:v1");
        bed.remove_repo(&format!("{}/k8s/daemonset-a", bed.registry))
            .await;
        k.project(&bed, "rw-ds").await;
        k.project_settings("rw-ds", &image, Some("pull"));
        wait_for(
            S(90),
            "the project's image pinned in containerd",
            || async { (bed.cri_status(&image).await == (true, true)).then_some(()) },
        )
        .await;
        let ev = k
            .wait_event("rw-ds", "RunnerImagePrewarmed", "projectsettings", S(30))
            .await;
        assert_eq!(
            ev.reporting_instance.as_deref(),
            Some(format!("runner-warden-{}", k.node).as_str())
        );
        // The README's query finds them.
        let listed = k.kubectl(&[
            "get",
            "events",
            "-n",
            "rw-ds",
            "--field-selector",
            "reportingComponent=ambient-code.io/runner-warden",
            "-o",
            "name",
        ]);
        assert!(!listed.trim().is_empty(), "no events by reportingComponent");
        // The static audit of that (root) image.
        let violation = k
            .wait_event(
                "rw-ds",
                "RunnerImageContractViolation",
                "projectsettings",
                S(60),
            )
            .await;
        let note = violation.note.unwrap_or_default();
        assert!(note.contains("root"), "the non-root-user check");
        // The pod sees the snapshotter's layer directories (the hostPath at the path containerd names).
        assert!(
            note.contains("filesystem read from the unpacked overlayfs snapshot"),
            "{note}"
        );

        // A root runner → RunnerRunningAsRoot on the Pod.
        k.apply(&runner_pod(
            "rw-ds",
            "session-root-runner",
            &bed.image("runners/runtime:v1"),
            "terminationGracePeriodSeconds: 1",
            "{runAsUser: 0, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}",
        ));
        k.wait_event("rw-ds", "RunnerRunningAsRoot", "session-root-runner", S(60))
            .await;

        // A runner that gains root through a setuid helper 3 s after it starts: with the default 30 s
        // poll, only the proc connector inside the pod explains a report within seconds.
        k.apply(
            &runner_pod(
                "rw-ds",
                "session-drift-runner",
                &bed.image("runners/runtime:v1"),
                "terminationGracePeriodSeconds: 1",
                "{runAsUser: 1001, capabilities: {drop: [ALL]}}",
            )
            .replace(
                "    imagePullPolicy: IfNotPresent\n",
                "    imagePullPolicy: IfNotPresent\n    command: [/bin/sh, -c, \"sleep 3; exec /usr/bin/gainroot\"]\n",
            ),
        );
        wait_for(S(60), "the drifting runner running", || async {
            let phase = k.kubectl(&[
                "-n",
                "rw-ds",
                "get",
                "pod",
                "session-drift-runner",
                "-o",
                "jsonpath={.status.phase}",
            ]);
            (phase == "Running").then_some(())
        })
        .await;
        let running = Instant::now();
        k.wait_event("rw-ds", "RunnerUIDDrift", "session-drift-runner", S(30))
            .await;
        let seen = running.elapsed();
        assert!(seen < S(8), "drift reported {seen:?} after Running");

        // A runner that ignores SIGTERM, deleted with a 3 s grace → RunnerShutdownKilled.
        let port = free_port();
        k.apply(&stubborn_runner_pod(
            &bed,
            "rw-ds",
            "session-stubborn-runner",
            port,
        ));
        k.wait_listening("rw-ds", "session-stubborn-runner").await;
        k.kubectl(&[
            "-n",
            "rw-ds",
            "delete",
            "pod",
            "session-stubborn-runner",
            "--wait=false",
        ]);
        k.wait_event(
            "rw-ds",
            "RunnerShutdownKilled",
            "session-stubborn-runner",
            S(30),
        )
        .await;

        // The shipped alert fires on the live Prometheus.
        let firing = wait_for(S(60), "RunnerShutdownKilled firing", || async {
            let alerts = prometheus.api("/api/v1/alerts").await;
            alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| {
                    a["labels"]["alertname"] == "RunnerShutdownKilled" && a["state"] == "firing"
                })
                .cloned()
        })
        .await;
        assert_eq!(firing["labels"]["node"], k.node.as_str(), "{firing}");
        let root_alert = wait_for(S(90), "RunnerNotCompliantAtRuntime firing", || async {
            let alerts = prometheus.api("/api/v1/alerts").await;
            alerts["data"]["alerts"]
                .as_array()?
                .iter()
                .find(|a| a["labels"]["alertname"] == "RunnerNotCompliantAtRuntime")
                .cloned()
        })
        .await;
        assert!(
            ["pending", "firing"].contains(&root_alert["state"].as_str().unwrap()),
            "{root_alert}"
        );

        // Every dashboard query parses there; those this scenario exercised return data.
        let exercised = [
            "Agents up",
            "containerd / API server reachable",
            "Runner images by prewarm state",
            "Desired images violating the contract, by check",
            "Non-compliant runner containers",
            "Shutdown outcomes",
            "Findings written / limited / dropped",
            "Pins honoured",
        ];
        for (title, expr) in dashboard_queries() {
            let r = prometheus.query(&expr).await;
            assert_eq!(r["status"], "success", "{title}: {expr}: {r}");
            if exercised.contains(&title.as_str()) {
                let n = r["data"]["result"].as_array().map(Vec::len).unwrap_or(0);
                assert!(n > 0, "{title}: {expr} returned nothing");
            }
        }

        // Nothing the agent needed was refused.
        let logs = agent_logs(&k);
        // RBAC's denial reads `… is forbidden: User "system:serviceaccount:…" cannot …`.
        assert!(
            !logs.contains("is forbidden: User"),
            "RBAC refused the agent something:\n{logs}"
        );
        assert!(
            !logs.contains(&bed.password),
            "the registry password leaked"
        );
        k.kubectl(&["delete", "namespace", "rw-ds", "--wait=false"]);
    }
}
