//! The cluster's desired runner images: the ProjectSettings cache planned by the pure `desired`, each
//! wanted image with its project's pull Secret (rules in `secrets`), the optional agent-registry
//! ConfigMap, and the projects' problems said once (`problems`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, GetParams};
use kube::runtime::reflector::{self, Store};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::problems::ProblemMemory;
use super::project_settings::{self, ProjectSettings};
use super::secrets::{self, Need, Recorded, SecretCache, SecretKey, SecretPolicy};
use crate::model::{ClusterSecret, DesiredImage, SecretRef};
use crate::report::findings::PULL_SECRET_INVALID;
use crate::report::health::{client_answered, ApiHealth};
use crate::report::messages;
use crate::report::sink::FindingSink;
use crate::sources::desired::{plan, ClusterPolicy, ProjectWant};
use crate::sources::session_images::Published;

const RESYNC: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq)]
pub struct KubeSettings {
    pub node_name: String,
    pub policy: ClusterPolicy,
    /// `namespace/name` of the agent-registry ConfigMap (`agent-registry.json`), if used.
    pub agent_registry: Option<(String, String)>,
    /// Where the agent's ServiceAccount lives (POD_NAMESPACE), for the RoleBinding a project needs.
    pub agent_namespace: String,
    /// When a pull secret is read again (`kubernetes.secret_refresh`; see `secrets`).
    pub secrets: SecretPolicy,
}

/// What the node's pulls say about the images it holds, by image (as configured): the images a pull
/// still needs (waiting, pulling, failed) and those whose last pull or re-resolution failed with class
/// `auth`. Images not named are ready. The agent answers it from the prewarm's state.
pub type PullNeeds = Arc<dyn Fn() -> HashMap<String, Need> + Send + Sync>;

/// Images named by the agent registry: `[].container.image` and `[].sandbox.stateSyncImage`.
pub fn agent_registry_images(json: &str) -> Result<Vec<String>, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
    let arr = v.as_array().ok_or("not a JSON array")?;
    let mut out = Vec::new();
    for entry in arr {
        for ptr in ["/container/image", "/sandbox/stateSyncImage"] {
            if let Some(s) = entry
                .pointer(ptr)
                .and_then(|s| s.as_str())
                .filter(|s| !s.is_empty())
            {
                out.push(s.to_string());
            }
        }
    }
    Ok(out)
}

/// What one reconcile carries to the next.
pub(super) struct Memory {
    secrets: SecretCache,
    problems: ProblemMemory,
    /// Learned session images the allowlist keeps out, as last said.
    refused: Vec<String>,
}

/// Feeds the prewarmer and the shutdown timer from the cluster until `stop`.
pub struct KubeSource {
    client: Client,
    api_health: Arc<ApiHealth>,
    /// The agent registry's images as last read.
    last_registry: std::sync::Mutex<Vec<String>>,
    settings: KubeSettings,
    store: Store<ProjectSettings>,
    writer: Option<reflector::store::Writer<ProjectSettings>>,
    pull_needs: Option<PullNeeds>,
    /// What the platform's session pods pull (`session_images::follow`), if learned.
    session_images: Option<watch::Receiver<Option<Published>>>,
}

impl KubeSource {
    pub fn new(client: Client, settings: KubeSettings, api_health: Arc<ApiHealth>) -> Self {
        let (store, writer) = reflector::store();
        Self {
            client,
            api_health,
            last_registry: Default::default(),
            settings,
            store,
            writer: Some(writer),
            pull_needs: None,
            session_images: None,
        }
    }

    /// Also hold what the platform's session pods pull (`sources::session_images`).
    pub fn with_session_images(mut self, images: watch::Receiver<Option<Published>>) -> Self {
        self.session_images = Some(images);
        self
    }

    /// Which images a pull still needs (a stale pull secret is read again only for those). Without it
    /// every image counts as ready: a Secret is read when first needed, when its ProjectSettings changes,
    /// and by `secret_refresh` when that is written in the config file or the copy is a problem.
    pub fn with_pull_needs(mut self, needs: PullNeeds) -> Self {
        self.pull_needs = Some(needs);
        self
    }

    /// A reader of the ProjectSettings cache (the events sink looks uids up in it).
    pub fn store(&self) -> Store<ProjectSettings> {
        self.store.clone()
    }

    /// The ProjectSettings cache's writer (the reflector's, or a test's).
    pub(super) fn take_writer(&mut self) -> reflector::store::Writer<ProjectSettings> {
        self.writer.take().expect("run once")
    }

    pub(super) fn memory(&self) -> Memory {
        Memory {
            secrets: SecretCache::new(self.settings.secrets, &self.settings.agent_namespace),
            problems: ProblemMemory::default(),
            refused: Vec::new(),
        }
    }

    pub async fn run(
        mut self,
        desired: watch::Sender<Vec<DesiredImage>>,
        sink: FindingSink,
        stop: CancellationToken,
    ) {
        let writer = self.take_writer();
        let (changed_tx, mut changed_rx) = watch::channel(());
        let reflect = project_settings::reflect(
            self.client.clone(),
            writer,
            changed_tx,
            self.api_health.clone(),
            stop.clone(),
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            r = self.store.wait_until_ready() => if r.is_err() { return },
        }
        info!(
            projects = self.store.state().len(),
            "ProjectSettings cache synced"
        );

        let mut memory = self.memory();
        let mut tick = tokio::time::interval(RESYNC);
        // Without session images, a receiver that never changes.
        let (_keep, idle) = watch::channel(None);
        let mut learned = self.session_images.clone().unwrap_or(idle);
        loop {
            self.reconcile(&desired, &sink, &mut memory).await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                r = learned.changed() => if r.is_err() { break },
                r = changed_rx.changed() => {
                    if r.is_err() { break }
                    // Let a burst of changes settle.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        reflect.abort();
    }

    pub(super) async fn reconcile(
        &self,
        desired: &watch::Sender<Vec<DesiredImage>>,
        sink: &FindingSink,
        memory: &mut Memory,
    ) {
        let objects = self.store.state();
        let versions: HashMap<String, String> = objects
            .iter()
            .filter_map(|o| Some((o.namespace()?, o.resource_version().unwrap_or_default())))
            .collect();
        let projects: Vec<ProjectWant> = objects
            .iter()
            .filter_map(|o| {
                Some(ProjectWant {
                    namespace: o.namespace()?,
                    runner_image: o.spec.runner_image.clone(),
                    pull_secret: o.spec.runner_image_pull_secret.clone(),
                })
            })
            .collect();
        let mut policy = self.settings.policy.clone();
        if let Some((ns, name)) = &self.settings.agent_registry {
            policy
                .default_images
                .extend(self.agent_registry(ns, name).await);
        }
        let learned = self
            .session_images
            .as_ref()
            .and_then(|r| r.borrow().as_ref().map(|p| p.images.clone()))
            .unwrap_or_default();
        let (wants, problems, refused) = plan(&projects, &policy, &learned);
        if memory.refused != refused {
            if !refused.is_empty() {
                info!(images = ?refused, "session pods pulled these images, but their registries are neither in RUNNER_IMAGE_ALLOWED_REGISTRIES nor a default image's: not prewarmed");
            }
            memory.refused = refused;
        }

        let mut report = |ns: &str, reason: &'static str, message: String, image: Option<&str>| {
            if memory.problems.is_news(ns, reason, &message) {
                warn!(project = ns, reason, "{message}");
                sink.publish(&messages::project_problem(ns, reason, &message, image));
            }
        };
        for (ns, p) in &problems {
            report(ns, p.reason(), p.message(ns), None);
        }

        // The Secrets the wanted images name, each with what their pulls say (the strongest).
        let pulls = self.pull_needs.as_ref().map(|f| f()).unwrap_or_default();
        let mut in_use: BTreeMap<SecretKey, Need> = BTreeMap::new();
        for w in &wants {
            let need = pulls.get(w.image.as_str()).copied().unwrap_or_default();
            for key in &w.secrets {
                let n = in_use.entry(key.clone()).or_default();
                *n = (*n).max(need);
            }
        }
        self.refresh_secrets(&in_use, &versions, &mut memory.secrets)
            .await;

        let mut images = Vec::new();
        for w in wants {
            let mut cluster_secrets = Vec::new();
            for key in &w.secrets {
                let (ns, name) = key;
                match memory.secrets.get(key) {
                    Some(Ok(k)) => cluster_secrets.push(ClusterSecret {
                        id: SecretRef::new(ns.clone(), name.clone()),
                        keyring: k.clone(),
                    }),
                    Some(Err(msg)) => report(
                        ns,
                        PULL_SECRET_INVALID,
                        format!("{msg}; runner image {} is pulled without it", w.image),
                        Some(w.image.as_str()),
                    ),
                    // Never read successfully yet (the API server did not answer): tried again next time.
                    None => {}
                }
            }
            images.push(DesiredImage {
                image: w.image,
                pull_secret: None,
                cluster_secrets,
                projects: w.projects.into_iter().collect(),
            });
        }
        // A problem that went away may be reported again if it comes back.
        memory.problems.end_round();
        // A project that no longer wants an image (or changed its secret) leaves no credentials here.
        memory.secrets.retain(|key| in_use.contains_key(key));
        desired.send_if_modified(|cur| {
            if *cur == images {
                false
            } else {
                debug!(
                    images = images.len(),
                    "desired runner images from the cluster changed"
                );
                *cur = images;
                true
            }
        });
    }

    /// Reads the Secrets in use that the cache says are due.
    async fn refresh_secrets(
        &self,
        in_use: &BTreeMap<SecretKey, Need>,
        versions: &HashMap<String, String>,
        cache: &mut SecretCache,
    ) {
        for (key, need) in in_use {
            let version = versions.get(&key.0).map(String::as_str).unwrap_or_default();
            let now = tokio::time::Instant::now().into_std();
            let Some(kind) = cache.due(key, version, *need, now) else {
                continue;
            };
            let answer = secrets::read(&self.client, key, kind, &self.api_health).await;
            if cache.record(key, version, answer, tokio::time::Instant::now().into_std())
                == Recorded::KeptLast
            {
                debug!(secret = %format!("{}/{}", key.0, key.1), "pull secret not refreshed; keeping the last copy");
            }
        }
    }

    /// The agent registry's images. A read that fails or a broken edit keeps the last good list: an API
    /// server blip must not drop (and unpin) the platform's default images on every node. Read at every
    /// reconcile from the API server's cache (`resourceVersion=0`): seconds of staleness do not matter.
    async fn agent_registry(&self, ns: &str, name: &str) -> Vec<String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let last = || self.last_registry.lock().expect("registry lock").clone();
        let read = match api.get_with(name, &GetParams::any()).await {
            Ok(cm) => Ok(Some(cm)),
            Err(kube::Error::Api(st)) if st.is_not_found() => Ok(None),
            Err(e) => Err(e),
        };
        let fresh = match read {
            Ok(Some(cm)) => match cm.data.as_ref().and_then(|d| d.get("agent-registry.json")) {
                Some(json) => match agent_registry_images(json) {
                    Ok(images) => images,
                    Err(e) => {
                        warn!(configmap = %format!("{ns}/{name}"), error = %e, "agent-registry.json is unusable; keeping the images it named before");
                        return last();
                    }
                },
                None => Vec::new(),
            },
            Ok(None) => Vec::new(),
            Err(e) if client_answered(&e) => {
                warn!(configmap = %format!("{ns}/{name}"), error = %e, "cannot read the agent registry; keeping the images it named before");
                return last();
            }
            Err(e) => {
                self.api_health
                    .unreachable("reading the agent registry", &e);
                debug!(configmap = %format!("{ns}/{name}"), "agent registry not read; keeping the images it named before");
                return last();
            }
        };
        self.last_registry
            .lock()
            .expect("registry lock")
            .clone_from(&fresh);
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_registry_lists_runner_and_state_sync_images() {
        let json = r#"[{"container":{"image":"quay.io/a/claude:1"},"sandbox":{"stateSyncImage":"quay.io/a/sync:1"}},
                       {"container":{"image":""}},{"other":1}]"#;
        assert_eq!(
            agent_registry_images(json).unwrap(),
            ["quay.io/a/claude:1", "quay.io/a/sync:1"]
        );
        assert!(agent_registry_images("{}").is_err());
    }
}
