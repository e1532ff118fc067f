//! The cluster as a source: ProjectSettings (a reflector over every namespace, managed fields stripped),
//! each project's pull Secret (`get` in the project's own namespace only, cached for 5 minutes and fetched
//! again at once when the ProjectSettings changes), the optional agent-registry ConfigMap, and the runner
//! pods on this node (their deletion time is the shutdown timer's stop clock).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::desired::{plan, ClusterPolicy, ProjectWant};
use super::retry::WatchRetry;
use crate::credentials::Keyring;
use crate::model::{ClusterSecret, DesiredImage, SecretRef};
use crate::report::findings::PULL_SECRET_INVALID;
use crate::report::health::{client_answered, ApiHealth};
use crate::report::messages;
use crate::report::sink::FindingSink;
use crate::shutdown::stop_clock::{PodStops, StopRequest};

pub const PROJECT_SETTINGS_NAME: &str = "projectsettings";
const RESYNC: Duration = Duration::from_secs(30);
/// Runner pods of both provisioning paths (docs/contract.md): the control plane's and the legacy operator's.
pub const RUNNER_POD_SELECTORS: [&str; 2] =
    ["ambient-code.io/managed=true", "app=ambient-code-runner"];

/// `vteam.ambient-code/v1alpha1` ProjectSettings, with only the fields runner-warden reads.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ProjectSettings {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ProjectSettingsSpec,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSettingsSpec {
    #[serde(default)]
    pub runner_image: Option<String>,
    #[serde(default)]
    pub runner_image_pull_secret: Option<String>,
}

impl Resource for ProjectSettings {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "ProjectSettings".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "vteam.ambient-code".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "projectsettings".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct KubeSettings {
    pub node_name: String,
    pub policy: ClusterPolicy,
    /// `namespace/name` of the agent-registry ConfigMap (`agent-registry.json`), if used.
    pub agent_registry: Option<(String, String)>,
    /// Where the agent's ServiceAccount lives (POD_NAMESPACE), for the RoleBinding a project needs.
    pub agent_namespace: String,
    /// How long a pull secret is used before it is read again (`kubernetes.secret_refresh`).
    pub secret_ttl: Duration,
}

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

/// Why a project's pull Secret cannot be used.
fn secret_problem(secret: Option<&Secret>, ns: &str, name: &str) -> Result<Keyring, String> {
    let Some(s) = secret else {
        return Err(format!(
            "Secret {ns}/{name} (spec.runnerImagePullSecret) does not exist: create it in namespace {ns} with type kubernetes.io/dockerconfigjson"
        ));
    };
    let ty = s.type_.as_deref().unwrap_or("Opaque");
    if ty != "kubernetes.io/dockerconfigjson" {
        return Err(format!(
            "Secret {ns}/{name} has type {ty}, not kubernetes.io/dockerconfigjson: recreate it with `kubectl create secret docker-registry`"
        ));
    }
    let data = s
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .ok_or_else(|| format!("Secret {ns}/{name} has no .dockerconfigjson key"))?;
    Keyring::parse(&data.0).map_err(|e| format!("Secret {ns}/{name}: .dockerconfigjson {e}"))
}

/// The ClusterRole deploy/overlays/namespaced-secrets gives the platform to bind in each project namespace.
pub const PROJECT_SECRETS_ROLE: &str = "runner-warden-project-secrets";

/// A Secret the agent may not read (the namespaced-secrets install): what to create so it can.
pub fn secret_forbidden(ns: &str, name: &str, agent_namespace: &str) -> String {
    format!(
        "runner-warden may not read Secret {ns}/{name} (Forbidden): bind ClusterRole {PROJECT_SECRETS_ROLE} to its ServiceAccount in namespace {ns}: kubectl -n {ns} create rolebinding runner-warden-secrets --clusterrole={PROJECT_SECRETS_ROLE} --serviceaccount={agent_namespace}:runner-warden"
    )
}

struct CachedSecret {
    fetched: Instant,
    /// The ProjectSettings resourceVersion it was fetched for: a change refetches at once.
    for_version: String,
    result: Result<Keyring, String>,
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
        }
    }

    /// A reader of the ProjectSettings cache (the events sink looks uids up in it).
    pub fn store(&self) -> Store<ProjectSettings> {
        self.store.clone()
    }

    pub async fn run(
        mut self,
        desired: watch::Sender<Vec<DesiredImage>>,
        sink: FindingSink,
        stop: CancellationToken,
    ) {
        let api: Api<ProjectSettings> = Api::all(self.client.clone());
        let writer = self.writer.take().expect("run once");
        let (changed_tx, mut changed_rx) = watch::channel(());
        let stream = watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={PROJECT_SETTINGS_NAME}")),
        )
        .modify(|ps: &mut ProjectSettings| {
            ps.managed_fields_mut().clear();
        })
        .reflect(writer);
        let reflect = tokio::spawn({
            let stop = stop.clone();
            let mut retry = WatchRetry::new("ProjectSettings", self.api_health.clone());
            async move {
                let mut stream = std::pin::pin!(stream);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = stream.next() => match ev {
                            Some(Ok(ev)) => {
                                // `Init` comes before the list request: not an answer.
                                if !matches!(ev, watcher::Event::Init) {
                                    retry.answered();
                                }
                                let _ = changed_tx.send(());
                            }
                            Some(Err(e)) => if !retry.pause(&e, &stop).await { return },
                            None => return,
                        }
                    }
                }
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            r = self.store.wait_until_ready() => if r.is_err() { return },
        }
        info!(
            projects = self.store.state().len(),
            "ProjectSettings cache synced"
        );

        let mut secrets: HashMap<(String, String), CachedSecret> = HashMap::new();
        let mut reported: HashSet<(String, &'static str, String)> = HashSet::new();
        let mut tick = tokio::time::interval(RESYNC);
        loop {
            self.reconcile(&desired, &sink, &mut secrets, &mut reported)
                .await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
                r = changed_rx.changed() => {
                    if r.is_err() { break }
                    // Let a burst of changes settle.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        reflect.abort();
    }

    async fn reconcile(
        &self,
        desired: &watch::Sender<Vec<DesiredImage>>,
        sink: &FindingSink,
        secrets: &mut HashMap<(String, String), CachedSecret>,
        reported: &mut HashSet<(String, &'static str, String)>,
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
        let (wants, problems) = plan(&projects, &policy);

        let mut now_reported = HashSet::new();
        let mut report = |ns: &str, reason: &'static str, message: String, image: Option<&str>| {
            let key = (ns.to_string(), reason, message.clone());
            if !reported.contains(&key) {
                warn!(project = ns, reason, "{message}");
                sink.publish(&messages::project_problem(ns, reason, &message, image));
            }
            now_reported.insert(key);
        };
        for (ns, p) in &problems {
            report(ns, p.reason(), p.message(ns), None);
        }

        let mut images = Vec::new();
        // The Secrets some wanted image still names: the cache keeps only those.
        let mut in_use: std::collections::HashSet<(String, String)> = Default::default();
        for w in wants {
            let mut cluster_secrets = Vec::new();
            for (ns, name) in &w.secrets {
                in_use.insert((ns.clone(), name.clone()));
                let version = versions.get(ns).cloned().unwrap_or_default();
                let fresh = secrets.get(&(ns.clone(), name.clone())).is_some_and(|c| {
                    c.fetched.elapsed() < self.settings.secret_ttl && c.for_version == version
                });
                if !fresh {
                    let api: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                    let fetched = match api.get_opt(name).await {
                        Ok(s) => Some(secret_problem(s.as_ref(), ns, name)),
                        // Not bound in this namespace (namespaced-secrets): the project must act.
                        Err(kube::Error::Api(st)) if st.code == 403 => {
                            self.api_health.answered();
                            Some(Err(secret_forbidden(
                                ns,
                                name,
                                &self.settings.agent_namespace,
                            )))
                        }
                        Err(e) => {
                            if client_answered(&e) {
                                self.api_health.answered();
                                warn!(secret = %format!("{ns}/{name}"), error = %e, "cannot read the pull secret; keeping the last copy");
                            } else {
                                self.api_health.unreachable("reading a pull secret", &e);
                            }
                            None
                        }
                    };
                    let key = (ns.clone(), name.clone());
                    match fetched {
                        Some(result) => {
                            secrets.insert(
                                key,
                                CachedSecret {
                                    fetched: Instant::now(),
                                    for_version: version,
                                    result,
                                },
                            );
                        }
                        // Not the secret's fault: the last copy stays in use, even past its TTL, until a
                        // read succeeds (dropping it would send the next pull anonymous).
                        None if secrets.contains_key(&key) => {
                            debug!(secret = %format!("{ns}/{name}"), "pull secret not refreshed; keeping the last copy");
                        }
                        None => continue,
                    }
                }
                match &secrets[&(ns.clone(), name.clone())].result {
                    Ok(k) => cluster_secrets.push(ClusterSecret {
                        id: SecretRef::new(ns.clone(), name.clone()),
                        keyring: k.clone(),
                    }),
                    Err(msg) => report(
                        ns,
                        PULL_SECRET_INVALID,
                        format!("{msg}; runner image {} is pulled without it", w.image),
                        Some(w.image.as_str()),
                    ),
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
        *reported = now_reported;
        // A project that no longer wants an image (or changed its secret) leaves no credentials here.
        secrets.retain(|key, _| in_use.contains(key));
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

    /// The agent registry's images. A read that fails or a broken edit keeps the last good list: an API
    /// server blip must not drop (and unpin) the platform's default images on every node.
    async fn agent_registry(&self, ns: &str, name: &str) -> Vec<String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let last = || self.last_registry.lock().expect("registry lock").clone();
        let fresh = match api.get_opt(name).await {
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

/// Watches the runner pods on this node and keeps their stop requests (deletion time − grace) for the
/// shutdown timer.
pub async fn watch_runner_pods(
    client: Client,
    api_health: Arc<ApiHealth>,
    node: String,
    stops: Arc<PodStops>,
    stop: CancellationToken,
) {
    let api: Api<Pod> = Api::all(client);
    let streams = RUNNER_POD_SELECTORS.map(|sel| {
        watcher(
            api.clone(),
            watcher::Config::default()
                .fields(&format!("spec.nodeName={node}"))
                .labels(sel),
        )
        .applied_objects()
        .boxed()
    });
    let mut merged = futures::stream::select_all(streams);
    let mut retry = WatchRetry::new("runner pods on this node", api_health);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = merged.try_next() => match ev {
                Ok(Some(pod)) => {
                    retry.answered();
                    if let Some(req) = stop_request(&pod) {
                        if let Some(uid) = pod.uid() {
                            debug!(pod = %pod.name_any(), "runner pod deleted; its stop clock runs");
                            stops.set(&uid, req);
                        }
                    }
                }
                Ok(None) => return,
                Err(e) => if !retry.pause(&e, &stop).await { return },
            }
        }
    }
}

/// The annotation OpenShift sets on a namespace with the UIDs its pods may run as.
pub const UID_RANGE_ANNOTATION: &str = "openshift.io/sa.scc.uid-range";

/// Keeps every namespace's UID range for the runtime audit.
pub async fn watch_namespace_ranges(
    client: Client,
    api_health: Arc<ApiHealth>,
    ranges: Arc<crate::process_audit::scanner::NamespaceRanges>,
    stop: CancellationToken,
) {
    use k8s_openapi::api::core::v1::Namespace;
    let api: Api<Namespace> = Api::all(client);
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    let mut retry = WatchRetry::new("namespaces (UID ranges)", api_health);
    let apply = |ns: &Namespace| {
        let name = ns.name_any();
        let raw = ns.annotations().get(UID_RANGE_ANNOTATION);
        let range = raw.and_then(|r| crate::contract::process::parse_uid_range(r));
        if raw.is_some() && range.is_none() {
            warn!(namespace = %name, annotation = UID_RANGE_ANNOTATION, "unparsable UID range; the default UID policy applies");
        }
        ranges.set(&name, range);
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ev = stream.next() => match ev {
                Some(Ok(watcher::Event::Init)) => {}
                Some(Ok(ev)) => {
                    retry.answered();
                    match ev {
                        watcher::Event::Apply(ns) | watcher::Event::InitApply(ns) => apply(&ns),
                        watcher::Event::Delete(ns) => ranges.set(&ns.name_any(), None),
                        _ => {}
                    }
                }
                Some(Err(e)) => if !retry.pause(&e, &stop).await { return },
                None => return,
            }
        }
    }
}

/// `deletionTimestamp − deletionGracePeriodSeconds`: when kubelet was asked to stop the pod.
pub fn stop_request(pod: &Pod) -> Option<StopRequest> {
    let deleted = pod.metadata.deletion_timestamp.as_ref()?.0;
    let grace = pod.metadata.deletion_grace_period_seconds?.max(0) as u64;
    let deleted_ns = deleted.as_nanosecond();
    if deleted_ns < 0 {
        return None;
    }
    let at = UNIX_EPOCH + Duration::from_nanos(deleted_ns as u64) - Duration::from_secs(grace);
    Some(StopRequest {
        at,
        grace: Duration::from_secs(grace),
    })
}

/// uid of the regarded ProjectSettings from the cache (Pods carry theirs from CRI's labels).
pub fn project_uid(store: &Store<ProjectSettings>, namespace: &str) -> Option<String> {
    store
        .get(&reflector::ObjectRef::new(PROJECT_SETTINGS_NAME).within(namespace))
        .and_then(|o| o.uid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

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

    #[test]
    fn a_forbidden_secret_names_the_rolebinding_to_create() {
        let m = secret_forbidden("team-a", "pull", "runner-warden");
        assert!(m.contains("Secret team-a/pull (Forbidden)"), "{m}");
        assert!(
            m.contains("kubectl -n team-a create rolebinding runner-warden-secrets --clusterrole=runner-warden-project-secrets --serviceaccount=runner-warden:runner-warden"),
            "{m}"
        );
    }

    #[test]
    fn secrets_of_the_wrong_type_or_shape_say_what_to_do() {
        let mut s = Secret {
            type_: Some("Opaque".into()),
            ..Default::default()
        };
        let e = secret_problem(Some(&s), "p", "pull").unwrap_err();
        assert!(
            e.contains("type Opaque, not kubernetes.io/dockerconfigjson"),
            "{e}"
        );
        assert!(secret_problem(None, "p", "pull")
            .unwrap_err()
            .contains("does not exist"));
        s.type_ = Some("kubernetes.io/dockerconfigjson".into());
        s.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(b"{\"auths\":{\"r.io\":{\"auth\":\"!!\"}}}".to_vec()),
        )]));
        let e = secret_problem(Some(&s), "p", "pull").unwrap_err();
        assert!(e.starts_with("Secret p/pull: .dockerconfigjson"), "{e}");
        s.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(
                b"{\"auths\":{\"r.io\":{\"username\":\"u\",\"password\":\"hunter2\"}}}".to_vec(),
            ),
        )]));
        assert!(secret_problem(Some(&s), "p", "pull").is_ok());
    }

    #[test]
    fn a_secret_from_the_cluster_never_prints_its_password() {
        let pw = "hunter2-cluster-secret";
        let good = format!(r#"{{"auths":{{"r.io":{{"username":"u","password":"{pw}"}}}}}}"#);
        let mut s = Secret {
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                ByteString(good.into_bytes()),
            )])),
            ..Default::default()
        };
        let keyring = secret_problem(Some(&s), "p", "pull").unwrap();
        let d = DesiredImage {
            cluster_secrets: vec![ClusterSecret {
                id: SecretRef::new("p", "pull"),
                keyring,
            }],
            ..DesiredImage::new(
                crate::reference::ImageRef::parse("r.io/a:1").unwrap(),
                None,
                None,
            )
        };
        assert!(!format!("{d:?}").contains(pw), "{d:?}");
        // A broken document: the error names the secret and the position, not its text.
        let broken = format!(r#"{{"auths":{{"r.io":{{"password":"{pw}", "auth": 7}}}}}}"#);
        s.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(broken.into_bytes()),
        )]));
        let e = secret_problem(Some(&s), "p", "pull").unwrap_err();
        assert!(e.contains("Secret p/pull") && !e.contains(pw), "{e}");
    }

    #[test]
    fn the_stop_clock_is_deletion_time_minus_grace() {
        let t = k8s_openapi::jiff::Timestamp::from_second(1_800_000_060).unwrap();
        let pod = Pod {
            metadata: ObjectMeta {
                deletion_timestamp: Some(Time(t)),
                deletion_grace_period_seconds: Some(60),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = stop_request(&pod).unwrap();
        assert_eq!(r.at, UNIX_EPOCH + Duration::from_secs(1_800_000_000));
        assert_eq!(r.grace, Duration::from_secs(60));
        assert!(stop_request(&Pod::default()).is_none());
    }
}
