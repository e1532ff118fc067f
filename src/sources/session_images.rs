//! Every image a session pod pulls, learned from the platform's runner pods wherever they run (issue:
//! the runner plus `ambient-mcp`, `credential-*`, `state-sync` sidecars and the `init-hydrate` init
//! container), with the pull secrets those pods name. Pure: the reporter (the Lease holder) feeds it
//! what its one cluster-wide watch of runner pods shows and publishes the answer in one ConfigMap;
//! every node follows that ConfigMap and prewarms what it lists (docs/session-images.md).
//!
//! Kept per (image, namespace): when it was last seen in use, rounded to `REFRESH` so a steady fleet
//! writes the ConfigMap once a day, not once per session; forgotten `forget` after the last pod that
//! used it (default 7 days: a project idle over a weekend or a holiday still starts warm on Monday,
//! and a sidecar tag replaced by a platform upgrade is unpinned a week later).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::reference::ImageRef;

/// The ConfigMap (in the agent's namespace) the reporter writes and every node watches.
pub const CONFIGMAP: &str = "runner-warden-session-images";
/// Its data key.
pub const KEY: &str = "session-images.json";
/// How stale a "last seen" may get while its image is still in use before it is written again.
pub const REFRESH: Duration = Duration::from_secs(24 * 3600);
/// The default time an image stays after the last pod that used it (`kubernetes.session_images_forget`).
pub const DEFAULT_FORGET: Duration = Duration::from_secs(7 * 24 * 3600);
/// The published document stays under this (a ConfigMap holds 1 MiB): past it the users seen least
/// recently are left out, and counted.
pub const MAX_BYTES: usize = 768 * 1024;
/// Format of the published document; a reader refuses another major.
pub const VERSION: u32 = 1;

/// One namespace's use of an image: the pull secrets its pods name for it, and when it was last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub namespace: String,
    #[serde(rename = "pullSecrets", default)]
    pub pull_secrets: Vec<String>,
    /// Seconds since the epoch (rounded down to `REFRESH` steps of the writer's clock).
    #[serde(rename = "lastSeen")]
    pub last_seen: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionImage {
    /// containerd's reading of the reference (`ImageRef::as_str`).
    pub image: String,
    pub users: Vec<User>,
}

/// The ConfigMap's document.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    pub version: u32,
    pub images: Vec<SessionImage>,
    /// Users left out to stay under `MAX_BYTES` (0 normally).
    #[serde(rename = "leftOut", default)]
    pub left_out: usize,
}

impl Published {
    /// The document listing nothing (no ConfigMap yet).
    pub fn default_current() -> Self {
        Self {
            version: VERSION,
            ..Self::default()
        }
    }

    pub fn parse(json: &str) -> Result<Self, String> {
        let p: Published = serde_json::from_str(json)
            .map_err(|e| format!("not the document runner-warden writes: {e}"))?;
        if p.version != VERSION {
            return Err(format!(
                "version {} (this agent reads version {VERSION}); upgrade the agents together",
                p.version
            ));
        }
        Ok(p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }
}

/// What one runner pod uses: its namespace, the images of all its containers and init containers, and
/// its `imagePullSecrets` (kubelet tries them for each of its images). `None` for a pod without a
/// namespace or spec. Unparsable references are skipped: kubelet cannot pull them either.
pub fn pod_use(pod: &Pod) -> Option<PodUse> {
    let namespace = pod.metadata.namespace.clone()?;
    let spec = pod.spec.as_ref()?;
    let images = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter_map(|c| ImageRef::parse(c.image.as_deref()?).ok())
        .map(|r| r.as_str().to_string())
        .collect();
    let secrets = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|s| s.name.clone())
        .filter(|s| !s.is_empty())
        .collect();
    Some(PodUse {
        namespace,
        images,
        secrets,
    })
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodUse {
    pub namespace: String,
    pub images: BTreeSet<String>,
    pub secrets: BTreeSet<String>,
}

/// (image, namespace).
type UseKey = (String, String);
/// A namespace's pull secret names for an image, and when it was last seen using it.
type UseSeen = (BTreeSet<String>, i64);

/// The reporter's memory: per (image, namespace) the secrets and when last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    users: BTreeMap<UseKey, UseSeen>,
}

impl Learned {
    /// What an earlier reporter published (its history survives a change of reporter).
    pub fn from_published(p: &Published) -> Self {
        let mut users = BTreeMap::new();
        for i in &p.images {
            for u in &i.users {
                users.insert(
                    (i.image.clone(), u.namespace.clone()),
                    (u.pull_secrets.iter().cloned().collect(), u.last_seen),
                );
            }
        }
        Self { users }
    }

    /// Takes in the pods in use `now` (seconds) and forgets users unseen for `forget`. Returns whether
    /// what would be published changed: a new user, other secrets, a last-seen older than `REFRESH`
    /// renewed, or a user forgotten.
    pub fn update<'a>(
        &mut self,
        pods: impl IntoIterator<Item = &'a PodUse>,
        now: i64,
        forget: Duration,
    ) -> bool {
        let refresh = REFRESH.as_secs() as i64;
        let stamp = now - now.rem_euclid(refresh);
        let mut in_use: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
        for p in pods {
            for image in &p.images {
                in_use
                    .entry((image.clone(), p.namespace.clone()))
                    .or_default()
                    .extend(p.secrets.iter().cloned());
            }
        }
        let mut changed = false;
        for (key, secrets) in in_use.iter() {
            match self.users.get_mut(key) {
                Some((s, seen)) => {
                    if s != secrets {
                        s.clone_from(secrets);
                        changed = true;
                    }
                    if *seen < stamp {
                        *seen = stamp;
                        changed = true;
                    }
                }
                None => {
                    self.users.insert(key.clone(), (secrets.clone(), stamp));
                    changed = true;
                }
            }
        }
        let forget = forget.as_secs() as i64;
        let before = self.users.len();
        self.users
            .retain(|key, (_, seen)| in_use.contains_key(key) || now - *seen < forget);
        changed || self.users.len() != before
    }

    /// The document to publish, under `MAX_BYTES` (users seen least recently left out first).
    pub fn published(&self) -> Published {
        let mut kept: Vec<(&UseKey, &UseSeen)> = self.users.iter().collect();
        let mut left_out = 0;
        loop {
            let doc = Self::document(&kept, left_out);
            if doc.to_json().len() <= MAX_BYTES || kept.is_empty() {
                return doc;
            }
            // Drop the oldest eighth (at least one) and try again: a few rounds at most.
            let drop = (kept.len() / 8).max(1);
            kept.sort_by_key(|(k, (_, seen))| (std::cmp::Reverse(*seen), (*k).clone()));
            kept.truncate(kept.len() - drop);
            kept.sort_by(|a, b| a.0.cmp(b.0));
            left_out += drop;
        }
    }

    fn document(users: &[(&UseKey, &UseSeen)], left_out: usize) -> Published {
        let mut images: BTreeMap<&str, Vec<User>> = BTreeMap::new();
        for ((image, ns), (secrets, seen)) in users {
            images.entry(image).or_default().push(User {
                namespace: ns.clone(),
                pull_secrets: secrets.iter().cloned().collect(),
                last_seen: *seen,
            });
        }
        Published {
            version: VERSION,
            images: images
                .into_iter()
                .map(|(image, users)| SessionImage {
                    image: image.to_string(),
                    users,
                })
                .collect(),
            left_out,
        }
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    fn pod(ns: &str, images: &[&str], secrets: &[&str]) -> PodUse {
        PodUse {
            namespace: ns.into(),
            images: images.iter().map(|s| s.to_string()).collect(),
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_pods_containers_init_containers_and_pull_secrets_are_read() {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s-runner", "namespace": "team"},
            "spec": {
                "initContainers": [{"name": "init-hydrate", "image": "quay.io/ac/hydrate:1"}],
                "containers": [
                    {"name": "ambient-code-runner", "image": "r.io/team/runner:2"},
                    {"name": "ambient-mcp", "image": "quay.io/ac/mcp:1"},
                    {"name": "broken", "image": "UPPER/case::x"}
                ],
                "imagePullSecrets": [{"name": "pull"}, {"name": ""}, {}]
            }
        }))
        .unwrap();
        let u = pod_use(&p).unwrap();
        assert_eq!(u.namespace, "team");
        assert_eq!(
            u.images.into_iter().collect::<Vec<_>>(),
            [
                "quay.io/ac/hydrate:1",
                "quay.io/ac/mcp:1",
                "r.io/team/runner:2"
            ]
        );
        assert_eq!(u.secrets.into_iter().collect::<Vec<_>>(), ["pull"]);
        let mut no_ns = p.clone();
        no_ns.metadata.namespace = None;
        assert_eq!(pod_use(&no_ns), None);
    }

    #[test]
    fn users_are_kept_a_week_after_their_last_pod_and_written_once_a_day_while_in_use() {
        let forget = DEFAULT_FORGET;
        let mut l = Learned::default();
        assert!(l.is_empty());
        let t0 = 100 * DAY + 3600;
        let a = pod("a", &["r.io/mcp:1", "r.io/run:1"], &["pull"]);
        let b = pod("b", &["r.io/mcp:1"], &[]);
        assert!(l.update([&a, &b], t0, forget), "new users");
        assert_eq!(l.len(), 3);
        assert!(!l.is_empty());
        assert!(!l.update([&a, &b], t0 + 60, forget), "nothing new");
        assert!(
            !l.update([&a, &b], t0 + DAY - 3600 - 1, forget),
            "same day: no write"
        );
        assert!(l.update([&a, &b], t0 + DAY, forget), "a day on: renewed");
        // b's pod is gone: b (last seen on day 101) stays until day 108.
        let has_b = |l: &Learned| {
            l.published()
                .images
                .iter()
                .any(|i| i.users.iter().any(|u| u.namespace == "b"))
        };
        l.update([&a], t0 + DAY + 3600, forget);
        l.update([&a], 108 * DAY - 1, forget);
        assert!(has_b(&l), "kept for the week");
        assert!(l.update([&a], 108 * DAY, forget), "b forgotten");
        assert!(!has_b(&l));
        let p = l.published();
        assert_eq!(p.images.len(), 2);
        assert!(p
            .images
            .iter()
            .all(|i| i.users.iter().all(|u| u.namespace == "a")));
        // Secrets follow the pods in use.
        let a2 = pod("a", &["r.io/mcp:1", "r.io/run:1"], &["other"]);
        assert!(l.update([&a2], 108 * DAY + 1, forget));
        assert_eq!(l.published().images[0].users[0].pull_secrets, ["other"]);
    }

    #[test]
    fn a_new_reporter_keeps_what_the_last_one_published() {
        let mut l = Learned::default();
        l.update([&pod("a", &["r.io/x:1"], &["s"])], 10 * DAY, DEFAULT_FORGET);
        let json = l.published().to_json();
        let back = Learned::from_published(&Published::parse(&json).unwrap());
        assert_eq!(back, l);
        assert!(!back.clone().update([], 11 * DAY, DEFAULT_FORGET));
        assert!(Published::parse("{\"version\":2,\"images\":[]}")
            .unwrap_err()
            .contains("version 2"));
        assert!(Published::parse("[").is_err());
        // What a node holds before any ConfigMap exists reads back as the current format.
        let empty = Published::default_current();
        assert!(empty.images.is_empty());
        assert_eq!(Published::parse(&empty.to_json()), Ok(empty));
    }

    #[test]
    fn the_document_stays_under_its_bound_leaving_out_the_least_recently_seen() {
        let mut l = Learned::default();
        // 12,000 namespaces each with a long secret name: over 768 KiB.
        let secret = "s".repeat(40);
        let pods: Vec<PodUse> = (0..12_000)
            .map(|i| pod(&format!("ns-{i:05}"), &["r.io/mcp:1"], &[secret.as_str()]))
            .collect();
        l.update(pods[..6_000].iter(), 10 * DAY, DEFAULT_FORGET);
        l.update(pods[6_000..].iter(), 12 * DAY, DEFAULT_FORGET);
        let p = l.published();
        assert!(p.to_json().len() <= MAX_BYTES);
        assert!(p.left_out > 0);
        let users = &p.images[0].users;
        assert_eq!(users.len() + p.left_out, 12_000);
        // The recent half is all there.
        assert_eq!(
            users.iter().filter(|u| u.last_seen == 12 * DAY).count(),
            6_000
        );
    }
}
