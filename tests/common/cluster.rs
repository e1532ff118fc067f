//! The single-node Kubernetes of `scripts/cluster up`: an admin client for the tests, kubectl, and an agent
//! running with the runner-warden ServiceAccount's own token (deploy/rbac), never the admin's.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::Client;

use super::{wait_explained, wait_for, Agent, Bed, BIN};

/// A runner pod pinned to the node, in the platform's shape (labels, container name, the `pull` Secret).
pub fn runner_pod(ns: &str, name: &str, image: &str, extra_spec: &str, security: &str) -> String {
    let node = Cluster::get().node;
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: {ns}
  labels: {{app: ambient-code-runner, agentic-session: {name}}}
spec:
  nodeName: {node}
  imagePullSecrets: [{{name: pull}}]
  {extra_spec}
  containers:
  - name: ambient-code-runner
    image: "{image}"
    imagePullPolicy: IfNotPresent
    securityContext: {security}
"#
    )
}

/// A runner that ignores SIGTERM (the bed's `shutdown-ignore`) with a 3 s grace period, on `port`.
pub fn stubborn_runner_pod(bed: &Bed, ns: &str, name: &str, port: u16) -> String {
    runner_pod(
        ns,
        name,
        &bed.image("runners/shutdown-ignore:v1"),
        "terminationGracePeriodSeconds: 3",
        COMPLIANT,
    )
    .replace(
        "    imagePullPolicy: IfNotPresent\n",
        &format!("    imagePullPolicy: IfNotPresent\n    env: [{{name: AGUI_PORT, value: \"{port}\"}}]\n"),
    )
}

/// What the contract asks of a runner's securityContext.
pub const COMPLIANT: &str =
    "{runAsUser: 1001, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}";

pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub kubectl: PathBuf,
    pub node: String,
    pub dir: PathBuf,
}

impl Cluster {
    pub fn get() -> Cluster {
        let dir = PathBuf::from(
            std::env::var("RW_TESTBED").unwrap_or_else(|_| "/var/tmp/runner-warden-testbed".into()),
        )
        .join("k8s");
        let env = std::fs::read_to_string(dir.join("env"))
            .expect("the cluster is not up: run scripts/cluster up (scripts/test does)");
        let get = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing in the cluster env"))
                .to_string()
        };
        Cluster {
            kubeconfig: get("RW_KUBECONFIG").into(),
            kubectl: get("RW_KUBECTL").into(),
            node: get("RW_NODE_NAME"),
            dir,
        }
    }

    pub async fn client_for(kubeconfig: &Path) -> Client {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    pub async fn admin(&self) -> Client {
        Self::client_for(&self.kubeconfig).await
    }

    /// kubectl as admin, whatever it answers.
    pub fn try_kubectl(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl")
    }

    /// kubectl as admin; panics with its output on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.try_kubectl(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?}: {text}");
        text
    }

    pub fn apply(&self, yaml: &str) {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(yaml.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl apply: {}{}\n{yaml}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A namespace with the bed's registry credentials as Secret `pull` (dockerconfigjson) and a default
    /// ServiceAccount.
    pub async fn project(&self, bed: &Bed, ns: &str) {
        let _ = self.try_kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=60s"]);
        self.kubectl(&["create", "namespace", ns]);
        self.kubectl(&[
            "-n",
            ns,
            "create",
            "secret",
            "docker-registry",
            "pull",
            &format!("--docker-server={}", bed.registry),
            &format!("--docker-username={}", bed.user),
            &format!("--docker-password={}", bed.password),
        ]);
        let sa: Api<ServiceAccount> = Api::namespaced(self.admin().await, ns);
        // The controller-manager makes it; right after a test stopped the API server its informers may
        // still be in their relist backoff, which took over 30 s here. Wait for its token too: 1.20's
        // ServiceAccount admission refuses pods ("No API token found for service account") until the
        // token controller has attached the token Secret, which comes after the account itself.
        wait_for(
            Duration::from_secs(120),
            "ServiceAccount default and its token",
            || {
                let sa = sa.clone();
                async move {
                    let sa = sa.get_opt("default").await.ok().flatten()?;
                    sa.secrets.filter(|s| !s.is_empty())
                }
            },
        )
        .await;
    }

    pub fn project_settings(&self, ns: &str, image: &str, secret: Option<&str>) {
        let secret = secret
            .map(|s| format!("\n  runnerImagePullSecret: \"{s}\""))
            .unwrap_or_default();
        self.apply(&format!(
            "apiVersion: vteam.ambient-code/v1alpha1\nkind: ProjectSettings\nmetadata:\n  name: projectsettings\n  namespace: {ns}\nspec:\n  groupAccess: []\n  runnerImage: \"{image}\"{secret}\n"
        ));
    }

    /// A kubeconfig with the runner-warden ServiceAccount's token (RBAC from deploy/rbac applied first).
    pub async fn agent_kubeconfig(&self, dir: &Path) -> PathBuf {
        self.kubectl(&[
            "apply",
            "-f",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rbac/rbac.yaml"),
        ]);
        let admin = self.admin().await;
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "runner-warden");
        let secrets: Api<Secret> = Api::namespaced(admin, "runner-warden");
        let token = wait_for(Duration::from_secs(30), "the runner-warden token", || {
            let (sas, secrets) = (sas.clone(), secrets.clone());
            async move {
                let sa = sas.get_opt("runner-warden").await.ok()??;
                let name = sa.secrets?.first()?.name.clone()?;
                let s = secrets.get_opt(&name).await.ok()??;
                let t = s.data?.get("token")?.0.clone();
                String::from_utf8(t).ok()
            }
        })
        .await;
        let path = dir.join("agent.kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"https://127.0.0.1:6443\", certificate-authority: \"{}\"}}\nusers:\n- name: runner-warden\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: runner-warden}}\ncurrent-context: c\n",
                self.dir.join("pki/ca.crt").display()
            ),
        )
        .unwrap();
        path
    }

    /// `runner-warden run --kubernetes` as the ServiceAccount, with the platform's environment.
    pub async fn agent(&self, bed: &Bed, env: &[(&str, &str)]) -> Agent {
        self.agent_with(bed, env, "").await
    }

    /// `agent` with more TOML appended to its config file.
    pub async fn agent_with(&self, bed: &Bed, env: &[(&str, &str)], extra: &str) -> Agent {
        self.agent_configured(bed, env, "", extra).await
    }

    /// `agent_with` plus extra `[prewarm]` keys.
    pub async fn agent_configured(
        &self,
        bed: &Bed,
        env: &[(&str, &str)],
        prewarm: &str,
        extra: &str,
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = self.agent_kubeconfig(dir.path()).await;
        let port = super::free_port();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "{}[runtime_audit]\ninterval = \"2s\"\nnamespace_uid_range = true\n{extra}",
                Agent::config_text(bed, port, dir.path(), prewarm, "")
            ),
        )
        .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args([
            "--log-level",
            "runner_warden=debug,info",
            "run",
            "--kubernetes",
            "--config",
        ])
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", &self.node)
        .env("POD_NAMESPACE", "runner-warden")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start agent");
        Agent {
            child,
            dir,
            config,
            port,
        }
    }

    /// events.k8s.io Events in `ns` with `reason` regarding an object named `name`.
    pub async fn events(&self, ns: &str, reason: &str, name: &str) -> Vec<Event> {
        let api: Api<Event> = Api::namespaced(self.admin().await, ns);
        api.list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .collect()
    }

    /// Waits until the runnerd stand-in in `pod` says "listening": its SIGTERM handler is installed.
    pub async fn wait_listening(&self, ns: &str, pod: &str) {
        wait_for(
            Duration::from_secs(60),
            &format!("{pod}'s SIGTERM handler"),
            || async {
                self.try_kubectl(&["-n", ns, "logs", pod])
                    .stdout
                    .windows(9)
                    .any(|w| w == b"listening")
                    .then_some(())
            },
        )
        .await;
    }

    pub async fn wait_event(&self, ns: &str, reason: &str, name: &str, limit: Duration) -> Event {
        self.wait_event_explained(ns, reason, name, limit, String::new)
            .await
    }

    /// `wait_event`, a timeout adding `context()` (an agent's log tail) to its message.
    pub async fn wait_event_explained(
        &self,
        ns: &str,
        reason: &str,
        name: &str,
        limit: Duration,
        context: impl Fn() -> String,
    ) -> Event {
        wait_explained(
            limit,
            &format!("Event {reason} on {ns}/{name}"),
            || async { self.events(ns, reason, name).await.into_iter().next() },
            context,
        )
        .await
    }
}
