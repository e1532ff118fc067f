//! Tags resolved once per cluster (`crate::sources::resolved_tags` decides; this file talks to the
//! registry and the API server): while this node holds the reporter Lease it asks the registry which
//! digest each desired tag names — every `prewarm.resolve_interval`, and at once for a tag it has not
//! published yet — with the project's pull secrets (and the node's credential providers), and writes the
//! answers to one ConfigMap (`runner-warden-resolved-tags`) that every node follows
//! (`published::follow`). Nodes pull those digests and never ask the registry about a tag themselves
//! while the document is fresh (docs/fleet.md).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use kube::Client;
use prometheus::IntCounterVec;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::published::{self, Document};
use crate::credential_providers::CredentialProviders;
use crate::credentials::Credential;
use crate::model::DesiredImage;
use crate::reference::ImageRef;
use crate::report::health::{client_answered, ApiHealth};
use crate::sources::resolved_tags::{ResolvedTags, Rounds, CONFIGMAP, KEEP_FAILING_ROUNDS, KEY};

/// How often a node that is not the reporter checks whether it has become it (and the reporter
/// whether it still is).
const POLL: Duration = Duration::from_secs(2);
/// How long a change of the desired set settles before its new tags are resolved: every node waits
/// for the digest of a new tag, so it is asked at once, but one edit's images together.
const SETTLE: Duration = Duration::from_millis(200);
/// Tags resolved at once (a round of 100 tags is 25 registry round trips deep).
const CONCURRENCY: usize = 4;

impl Document for ResolvedTags {
    const CONFIGMAP: &'static str = CONFIGMAP;
    const KEY: &'static str = KEY;
    const WHAT: &'static str =
        "resolved tags (each desired tag's digest, resolved by the reporter)";
    const WATCHED: &'static str = "the resolved-tags ConfigMap";
    fn parse(json: &str) -> Result<Self, String> {
        ResolvedTags::parse(json)
    }
    fn empty() -> Self {
        ResolvedTags::default()
    }
    fn to_json(&self) -> String {
        ResolvedTags::to_json(self)
    }
}

/// The registry, as the reporter needs it: the digest a tag names now. Errors are already free of
/// secrets (they are logged).
pub trait TagResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        image: &ImageRef,
        credentials: &[&Credential],
    ) -> impl Future<Output = Result<String, String>> + Send;
}

impl TagResolver for crate::registry::Resolver {
    async fn resolve(
        &self,
        image: &ImageRef,
        credentials: &[&Credential],
    ) -> Result<String, String> {
        crate::registry::Resolver::resolve(self, image, credentials)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Every node: follows the reporter's document.
pub async fn follow(
    client: Client,
    namespace: String,
    out: watch::Sender<Option<ResolvedTags>>,
    api_health: Arc<ApiHealth>,
    stop: CancellationToken,
) {
    published::follow(client, namespace, out, api_health, stop).await
}

/// The reporter's side.
pub struct Publisher<R> {
    pub client: Client,
    pub namespace: String,
    pub is_leader: Arc<AtomicBool>,
    /// What the ConfigMap says now (`follow`).
    pub current: watch::Receiver<Option<ResolvedTags>>,
    /// The node's desired images (every node's desired set is the cluster's).
    pub desired: watch::Receiver<Vec<DesiredImage>>,
    pub resolver: Arc<R>,
    pub providers: Option<Arc<CredentialProviders>>,
    pub interval: Duration,
    /// `runner_warden_tag_resolutions_total{result}`.
    pub resolutions: IntCounterVec,
    pub api_health: Arc<ApiHealth>,
}

impl<R: TagResolver> Publisher<R> {
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            while !self.is_leader.load(Ordering::Relaxed) {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(POLL) => {}
                }
            }
            info!(
                every = %humantime::format_duration(self.interval),
                "reporter: resolving every desired tag once for the cluster"
            );
            if !self.term(&stop).await {
                return;
            }
            info!("no longer the reporter: stopped resolving tags for the cluster");
        }
    }

    /// One term as reporter; false when the agent stops.
    async fn term(&mut self, stop: &CancellationToken) -> bool {
        let mut rounds = Rounds::default();
        let mut written: Option<ResolvedTags> = None;
        let mut full_due = Instant::now();
        loop {
            if !self.is_leader.load(Ordering::Relaxed) {
                return true;
            }
            // What is published: this term's last write, else the ConfigMap (a new reporter keeps its
            // predecessor's answers until it has its own). Not listed yet: wait for it.
            let Some(prev) = written.clone().or_else(|| self.current.borrow().clone()) else {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(POLL) => continue,
                }
            };
            let wanted = tags_of(&self.desired.borrow());
            let full = Instant::now() >= full_due;
            let ask: Vec<DesiredImage> = wanted
                .values()
                .filter(|d| full || !prev.tags.contains_key(d.image.as_str()))
                .cloned()
                .collect();
            if full {
                full_due = Instant::now() + self.interval;
            }
            let results = self.resolve_all(ask, &rounds).await;
            let keys: BTreeSet<String> = wanted.keys().cloned().collect();
            let doc = rounds.next(&prev, &keys, &results, unix_now(), self.interval);
            for (tag, r) in &results {
                if r.is_err() && rounds.failing(tag) == KEEP_FAILING_ROUNDS {
                    warn!(image = %tag, "the reporter could not resolve this tag {KEEP_FAILING_ROUNDS} times in a row: its digest is no longer published, and nodes resolve it themselves (slowly) until it resolves again");
                }
            }
            if doc != prev {
                match published::write(&self.client, &self.namespace, &doc).await {
                    Ok(()) => {
                        info!(
                            tags = doc.tags.len(),
                            left_out = doc.left_out,
                            "published the resolved tags"
                        );
                        if doc.left_out > 0 {
                            warn!(left_out = doc.left_out, "resolved tags: more desired tags than the document holds; those left out are resolved by each node itself");
                        }
                        written = Some(doc);
                    }
                    Err(e) if client_answered(&e) => {
                        warn!(configmap = %format!("{}/{CONFIGMAP}", self.namespace), error = %e, "cannot write the resolved tags; tried again at the next round (check the Role runner-warden-resolved-tags)")
                    }
                    Err(e) => self.api_health.unreachable("writing the resolved tags", &e),
                }
            }
            let asked_for = keys;
            // Until the next full round, or a desired tag this round did not know (settled over SETTLE).
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return false,
                    _ = tokio::time::sleep(POLL) => {}
                    changed = self.desired.changed() => {
                        // A closed channel (the agent stopping) would answer at once forever.
                        tokio::time::sleep(if changed.is_ok() { SETTLE } else { POLL }).await;
                    }
                }
                if !self.is_leader.load(Ordering::Relaxed) || Instant::now() >= full_due {
                    break;
                }
                let now: BTreeSet<String> = tags_of(&self.desired.borrow()).into_keys().collect();
                if !now.is_subset(&asked_for) {
                    break;
                }
            }
        }
    }

    /// Asks the registry about each of `ask`, `CONCURRENCY` at a time.
    async fn resolve_all(
        &self,
        ask: Vec<DesiredImage>,
        rounds: &Rounds,
    ) -> BTreeMap<String, Result<String, String>> {
        let results: Vec<(String, Result<String, String>)> = futures::stream::iter(ask)
            .map(|d| async move {
                let r = self.resolve_one(&d).await;
                (d.image.as_str().to_string(), r)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for (tag, r) in &results {
            match r {
                Ok(digest) => {
                    self.resolutions.with_label_values(&["resolved"]).inc();
                    debug!(image = %tag, digest = %digest, "resolved for the cluster");
                }
                Err(e) => {
                    self.resolutions.with_label_values(&["failed"]).inc();
                    // Said once per failure streak (the round after the first keeps quiet).
                    if rounds.failing(tag) == 0 {
                        warn!(image = %tag, error = %e, "the reporter cannot resolve this tag for the cluster; nodes keep the digest published before (if any)");
                    }
                }
            }
        }
        results.into_iter().collect()
    }

    async fn resolve_one(&self, d: &DesiredImage) -> Result<String, String> {
        let mut creds = crate::prewarm::credentials_for(d).map_err(|f| f.message)?;
        if let Some(p) = &self.providers {
            creds.extend(p.lookup(&d.image.name()).await.logins);
        }
        let refs: Vec<&Credential> = creds.iter().collect();
        let digest = self.resolver.resolve(&d.image, &refs).await?;
        match crate::sources::resolved_tags::is_digest(&digest) {
            true => Ok(digest),
            false => Err(format!("the registry answered {digest:?}, not a digest")),
        }
    }
}

/// The desired images that name a tag, by reference.
fn tags_of(desired: &[DesiredImage]) -> BTreeMap<String, DesiredImage> {
    desired
        .iter()
        .filter(|d| !d.image.is_pinned_by_digest())
        .map(|d| (d.image.as_str().to_string(), d.clone()))
        .collect()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use http::{Request, Response};
    use kube::client::Body;

    use super::*;
    use crate::report::metrics::Metrics;

    const TAG: &str = "r.io/team/runner:v1";
    const NEW: &str = "r.io/team/other:v1";
    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[derive(Default)]
    struct FakeResolver {
        answers: Mutex<HashMap<String, Result<String, String>>>,
        asked: Mutex<Vec<String>>,
    }

    impl FakeResolver {
        fn answer(&self, tag: &str, r: Result<&str, &str>) {
            self.answers
                .lock()
                .unwrap()
                .insert(tag.into(), r.map(String::from).map_err(String::from));
        }
        fn asked(&self) -> Vec<String> {
            self.asked.lock().unwrap().clone()
        }
    }

    impl TagResolver for FakeResolver {
        async fn resolve(&self, image: &ImageRef, _: &[&Credential]) -> Result<String, String> {
            self.asked.lock().unwrap().push(image.as_str().into());
            self.answers
                .lock()
                .unwrap()
                .get(image.as_str())
                .cloned()
                .unwrap_or(Err("not found".into()))
        }
    }

    /// (method path, body) of every request.
    type Seen = Arc<Mutex<Vec<(String, String)>>>;

    /// A mock API server that accepts every write and records each request.
    fn mock_api() -> (Client, Seen) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let me = seen.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let line = format!("{} {}", req.method(), req.uri().path());
                let body = http_body_util::BodyExt::collect(req.into_body())
                    .await
                    .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                    .unwrap_or_default();
                me.lock().unwrap().push((line, body));
                send.send_response(
                    Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(Body::from(
                            br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"runner-warden-resolved-tags","namespace":"rw"}}"#.to_vec(),
                        ))
                        .unwrap(),
                );
            }
        });
        (Client::new(service, "default"), seen)
    }

    fn desired(images: &[&str]) -> Vec<DesiredImage> {
        images
            .iter()
            .map(|i| DesiredImage::new(ImageRef::parse(i).unwrap(), None, Some("team".into())))
            .collect()
    }

    /// The documents written so far.
    fn written(seen: &Mutex<Vec<(String, String)>>) -> Vec<ResolvedTags> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(l, _)| {
                l == "PATCH /api/v1/namespaces/rw/configmaps/runner-warden-resolved-tags"
            })
            .map(|(_, body)| {
                let v: serde_json::Value = serde_json::from_str(body).unwrap();
                ResolvedTags::parse(v["data"][KEY].as_str().unwrap()).unwrap()
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_reporter_resolves_each_tag_once_per_interval_and_writes_only_changes() {
        let (client, seen) = mock_api();
        let resolver = Arc::new(FakeResolver::default());
        resolver.answer(TAG, Ok(D1));
        resolver.answer(NEW, Ok(D1));
        let digest_image = format!("r.io/team/pinned@{D1}");
        let (desired_tx, desired_rx) = watch::channel(desired(&[TAG, &digest_image]));
        let (_current_tx, current) = watch::channel(Some(ResolvedTags::default()));
        let is_leader = Arc::new(AtomicBool::new(true));
        let metrics = Metrics::new();
        let publisher = Publisher {
            client,
            namespace: "rw".into(),
            is_leader: is_leader.clone(),
            current,
            desired: desired_rx,
            resolver: resolver.clone(),
            providers: None,
            interval: Duration::from_secs(600),
            resolutions: metrics.tag_resolutions_total.clone(),
            api_health: Arc::new(ApiHealth::default()),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(publisher.run(stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        // The tag, not the digest reference; written once.
        assert_eq!(resolver.asked(), [TAG]);
        let docs = written(&seen);
        assert_eq!(docs.len(), 1, "{docs:?}");
        assert_eq!(
            docs[0].tags,
            BTreeMap::from([(TAG.to_string(), D1.to_string())])
        );
        assert_eq!(docs[0].resolve_seconds, 600);
        // Nothing new for five minutes: nothing asked, nothing written.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(resolver.asked().len(), 1);
        // A new desired tag is resolved at once (nodes wait for its digest), alone.
        desired_tx.send_replace(desired(&[TAG, NEW]));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(resolver.asked(), [TAG, NEW]);
        assert_eq!(written(&seen).len(), 2);
        // The full round at 10 minutes asks both again; unchanged: no write.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert_eq!(resolver.asked().len(), 4, "{:?}", resolver.asked());
        assert_eq!(written(&seen).len(), 2);
        // A moved tag is written at the next round.
        resolver.answer(TAG, Ok(D2));
        tokio::time::sleep(Duration::from_secs(600)).await;
        let docs = written(&seen);
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[2].tags[TAG], D2);
        // A failing tag keeps its digest, and it is counted.
        resolver.answer(NEW, Err("registry r.io refused r.io/team/other:v1: 401"));
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(written(&seen).len(), 3);
        assert_eq!(
            metrics
                .tag_resolutions_total
                .with_label_values(&["failed"])
                .get(),
            1
        );
        // No longer the reporter: no more registry requests.
        is_leader.store(false, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let asked = resolver.asked().len();
        tokio::time::sleep(Duration::from_secs(1800)).await;
        assert_eq!(resolver.asked().len(), asked);
        stop.cancel();
        task.await.unwrap();
    }
}
