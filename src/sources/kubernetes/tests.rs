//! The cluster source against a mock API server: kube's real `Client` over `tower_test::mock`, answering
//! by path from a table the test edits, and recording every request it saw (so the API cost is counted,
//! not assumed). The ProjectSettings cache is fed directly (the reflector is kube's, not ours).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::client::Body;
use kube::runtime::reflector::store::Writer;
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::watch;

use super::secrets::{secret_forbidden, Need, SecretPolicy, AUTH_REREAD_MIN};
use super::source::{KubeSettings, KubeSource, PullNeeds};
use super::{ProjectSettings, ProjectSettingsSpec, PROJECT_SETTINGS_NAME};
use crate::prewarm::DesiredImage;
use crate::report::health::ApiHealth;
use crate::report::metrics::Metrics;
use crate::report::sink::FindingSink;
use crate::sources::desired::ClusterPolicy;

const NS: &str = "team-a";
const IMAGE: &str = "r.io/team/runner:1";
const SECRET_PATH: &str = "/api/v1/namespaces/team-a/secrets/pull";
const REFRESH: Duration = Duration::from_secs(300);

/// How the mock answers a path.
#[derive(Clone)]
enum Reply {
    Status(u16, String),
    /// The connection fails: no answer at all (the API server is away).
    Unreachable,
}

/// The mock API server: answers by path, records `METHOD uri` of every request.
#[derive(Clone, Default)]
struct MockApi {
    replies: Arc<Mutex<HashMap<String, Reply>>>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl MockApi {
    fn start() -> (Client, Self) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = Self::default();
        let me = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                me.seen
                    .lock()
                    .unwrap()
                    .push(format!("{} {}", req.method(), req.uri()));
                let reply = me.replies.lock().unwrap().get(req.uri().path()).cloned();
                match reply.unwrap_or_else(|| status(404, "NotFound")) {
                    Reply::Status(code, body) => send.send_response(
                        Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(Body::from(body.into_bytes()))
                            .unwrap(),
                    ),
                    Reply::Unreachable => {
                        send.send_error(std::io::Error::other("connection refused"))
                    }
                }
            }
        });
        (Client::new(service, "default"), api)
    }

    fn reply(&self, path: &str, reply: Reply) {
        self.replies.lock().unwrap().insert(path.into(), reply);
    }

    /// The requests seen for `path` (with their query).
    fn requests(&self, path: &str) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.split(' ').nth(1).is_some_and(|u| u.starts_with(path)))
            .cloned()
            .collect()
    }
}

/// A `Status` failure as the API server writes it.
fn status(code: u16, reason: &str) -> Reply {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (mock)"), "reason": reason, "code": code,
    });
    Reply::Status(code, body.to_string())
}

fn secret(password: &str) -> Reply {
    let doc = format!(r#"{{"auths":{{"r.io":{{"username":"u","password":"{password}"}}}}}}"#);
    let s = Secret {
        metadata: ObjectMeta {
            name: Some("pull".into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(doc.into_bytes()),
        )])),
        ..Default::default()
    };
    Reply::Status(200, serde_json::to_string(&s).unwrap())
}

fn project_settings(version: &str) -> ProjectSettings {
    ProjectSettings {
        metadata: ObjectMeta {
            name: Some(PROJECT_SETTINGS_NAME.into()),
            namespace: Some(NS.into()),
            resource_version: Some(version.into()),
            uid: Some("uid-1".into()),
            ..Default::default()
        },
        spec: ProjectSettingsSpec {
            runner_image: Some(IMAGE.into()),
            runner_image_pull_secret: Some("pull".into()),
        },
    }
}

/// One KubeSource over the mock, its ProjectSettings cache fed by hand, findings to a file.
struct Bed {
    api: MockApi,
    source: KubeSource,
    writer: Writer<ProjectSettings>,
    memory: super::source::Memory,
    desired: watch::Sender<Vec<DesiredImage>>,
    sink: FindingSink,
    findings: tempfile::NamedTempFile,
    needs: Arc<Mutex<HashMap<String, Need>>>,
}

impl Bed {
    fn new(poll: bool) -> Self {
        Self::with_registry(poll, None)
    }

    fn with_registry(poll: bool, agent_registry: Option<(String, String)>) -> Self {
        let (client, api) = MockApi::start();
        let settings = KubeSettings {
            node_name: "node-1".into(),
            policy: ClusterPolicy {
                custom_images_enabled: true,
                ..Default::default()
            },
            agent_registry,
            agent_namespace: "runner-warden".into(),
            secrets: SecretPolicy {
                refresh: REFRESH,
                poll,
            },
        };
        let needs: Arc<Mutex<HashMap<String, Need>>> = Default::default();
        let probe: PullNeeds = {
            let needs = needs.clone();
            Arc::new(move || needs.lock().unwrap().clone())
        };
        let mut source = KubeSource::new(client, settings, Arc::new(ApiHealth::default()))
            .with_pull_needs(probe);
        let writer = source.take_writer();
        let memory = source.memory();
        let findings = tempfile::NamedTempFile::new().unwrap();
        let sink =
            FindingSink::open(findings.path().to_str().unwrap(), Arc::new(Metrics::new())).unwrap();
        let (desired, _) = watch::channel(Vec::new());
        let mut bed = Self {
            api,
            source,
            writer,
            memory,
            desired,
            sink,
            findings,
            needs,
        };
        bed.apply(project_settings("1"));
        bed
    }

    fn apply(&mut self, ps: ProjectSettings) {
        self.writer.apply_watcher_event(&watcher::Event::Apply(ps));
    }

    async fn reconcile(&mut self) {
        self.source
            .reconcile(&self.desired, &self.sink, &mut self.memory)
            .await;
    }

    fn need(&self, need: Need) {
        let image = crate::reference::ImageRef::parse(IMAGE).unwrap();
        self.needs
            .lock()
            .unwrap()
            .insert(image.as_str().to_string(), need);
    }

    /// The password of the registry credential the desired image carries, if any.
    fn password(&self) -> Option<String> {
        let images = self.desired.borrow();
        assert_eq!(images.len(), 1, "one desired image");
        let secrets = &images[0].cluster_secrets;
        let s = secrets.first()?;
        assert_eq!(s.id.to_string(), "team-a/pull");
        Some(s.keyring.lookup("r.io/team/runner")[0].password.clone())
    }

    fn findings(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.findings.path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn secret_reads(&self) -> Vec<String> {
        self.api.requests(SECRET_PATH)
    }
}

#[tokio::test(start_paused = true)]
async fn a_project_with_a_pull_secret_gets_the_secrets_credentials() {
    let mut bed = Bed::new(false);
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    bed.reconcile().await;
    assert_eq!(bed.password().as_deref(), Some("s3cret"));
    let reads = bed.secret_reads();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert!(reads[0].starts_with("GET "), "{reads:?}");
    // The first read must see what was just written: a quorum read.
    assert!(!reads[0].contains("resourceVersion=0"), "{reads:?}");
    assert!(bed.findings().is_empty(), "{:?}", bed.findings());
}

#[tokio::test(start_paused = true)]
async fn a_forbidden_secret_is_the_projects_problem_said_once() {
    let mut bed = Bed::new(false);
    bed.api.reply(SECRET_PATH, status(403, "Forbidden"));
    bed.reconcile().await;
    bed.reconcile().await;
    assert_eq!(bed.password(), None, "the image is pulled without it");
    let f = bed.findings();
    assert_eq!(f.len(), 1, "said once: {f:?}");
    assert_eq!(f[0]["reason"], "RunnerImagePullSecretInvalid");
    assert_eq!(f[0]["image"], IMAGE);
    let want = format!(
        "{}; runner image {IMAGE} is pulled without it",
        secret_forbidden(NS, "pull", "runner-warden")
    );
    assert_eq!(f[0]["message"], want.as_str());
    // Once bound (no change to the ProjectSettings), a later read by age picks the secret up.
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    tokio::time::advance(REFRESH).await;
    bed.reconcile().await;
    assert_eq!(bed.password().as_deref(), Some("s3cret"));
}

#[tokio::test(start_paused = true)]
async fn in_steady_state_the_secret_is_not_read_again() {
    let mut bed = Bed::new(false);
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    // Two hours of reconciles every 30 s, every image ready: one read in all.
    for _ in 0..240 {
        bed.reconcile().await;
        tokio::time::advance(Duration::from_secs(30)).await;
    }
    assert_eq!(bed.secret_reads().len(), 1, "{:?}", bed.secret_reads());
    assert_eq!(bed.password().as_deref(), Some("s3cret"));
    // A pull needs the (now old) copy: read again, from the API server's cache.
    bed.need(Need::Pulling);
    bed.reconcile().await;
    bed.reconcile().await;
    let reads = bed.secret_reads();
    assert_eq!(reads.len(), 2, "{reads:?}");
    assert!(reads[1].contains("resourceVersion=0"), "{reads:?}");
}

#[tokio::test(start_paused = true)]
async fn a_changed_project_settings_or_an_auth_failure_reads_the_secret_again() {
    let mut bed = Bed::new(false);
    bed.api.reply(SECRET_PATH, secret("old"));
    bed.reconcile().await;
    bed.api.reply(SECRET_PATH, secret("rotated"));
    bed.apply(project_settings("2"));
    bed.reconcile().await;
    assert_eq!(bed.password().as_deref(), Some("rotated"));
    assert_eq!(bed.secret_reads().len(), 2);

    // The registry refuses the credential: read at once (after the first seconds), once.
    bed.api.reply(SECRET_PATH, secret("rotated-again"));
    tokio::time::advance(AUTH_REREAD_MIN).await;
    bed.need(Need::AuthFailed);
    for _ in 0..5 {
        bed.reconcile().await;
    }
    assert_eq!(bed.password().as_deref(), Some("rotated-again"));
    let reads = bed.secret_reads();
    assert_eq!(reads.len(), 3, "{reads:?}");
    assert!(!reads[2].contains("resourceVersion=0"), "{reads:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_read_after_a_good_one_keeps_the_last_copy() {
    let mut bed = Bed::new(true);
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    bed.reconcile().await;
    // The API server answers 500, then not at all: past the refresh time, the polled reads fail and
    // the copy stays in use.
    for reply in [status(500, "InternalError"), Reply::Unreachable] {
        bed.api.reply(SECRET_PATH, reply);
        tokio::time::advance(REFRESH).await;
        let before = bed.secret_reads().len();
        bed.reconcile().await;
        assert_eq!(bed.secret_reads().len(), before + 1, "it tried");
        assert_eq!(bed.password().as_deref(), Some("s3cret"));
    }
    // A changed ProjectSettings whose read fails keeps it too.
    bed.apply(project_settings("2"));
    bed.reconcile().await;
    assert_eq!(bed.password().as_deref(), Some("s3cret"));
    assert!(bed.findings().is_empty(), "{:?}", bed.findings());
}

#[tokio::test(start_paused = true)]
async fn a_project_that_drops_its_secret_leaves_no_credentials() {
    let mut bed = Bed::new(false);
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    bed.reconcile().await;
    let mut ps = project_settings("2");
    ps.spec.runner_image_pull_secret = None;
    bed.apply(ps);
    bed.reconcile().await;
    assert_eq!(bed.password(), None);
    // Named again: read again (the copy was forgotten).
    bed.apply(project_settings("3"));
    bed.reconcile().await;
    assert_eq!(bed.password().as_deref(), Some("s3cret"));
    assert_eq!(bed.secret_reads().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_agent_registry_is_read_from_the_cache_and_kept_through_a_failed_read() {
    const PATH: &str = "/api/v1/namespaces/platform/configmaps/ambient-agent-registry";
    let mut bed = Bed::with_registry(
        false,
        Some(("platform".into(), "ambient-agent-registry".into())),
    );
    bed.api.reply(SECRET_PATH, secret("s3cret"));
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ambient-agent-registry", "namespace": "platform"},
        "data": {"agent-registry.json": r#"[{"container":{"image":"r.io/platform/claude:2"}}]"#},
    });
    bed.api.reply(PATH, Reply::Status(200, cm.to_string()));
    let images = |bed: &Bed| -> Vec<String> {
        bed.desired
            .borrow()
            .iter()
            .map(|d| d.image.as_str().to_string())
            .collect()
    };
    bed.reconcile().await;
    let first = images(&bed);
    assert!(
        first.iter().any(|i| i.contains("platform/claude:2")),
        "{first:?}"
    );
    let reads = bed.api.requests(PATH);
    assert!(reads[0].contains("resourceVersion=0"), "{reads:?}");
    for reply in [status(500, "InternalError"), Reply::Unreachable] {
        bed.api.reply(PATH, reply);
        bed.reconcile().await;
        assert_eq!(images(&bed), first, "kept");
    }
}
