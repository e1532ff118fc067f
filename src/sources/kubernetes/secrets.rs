//! Each project's pull Secret: read with a `get` in the project's own namespace only (never a list or a
//! watch: the namespaced-secrets install grants `get` alone), kept in a [`SecretCache`] whose rules are
//! pure (time is passed in) and tested here.
//!
//! **Steady-state API cost: no Secret request at all**, whatever the number of nodes and projects.
//! A Secret is read when an image first needs it and again when its ProjectSettings changes (the
//! ProjectSettings watch already says so, at no extra request). After that a copy is read again only
//! when it may be stale *and* a pull needs it:
//! - a pull or tag re-resolution of an image using it failed with class `auth` (the registry refused the
//!   credential, perhaps because it was rotated): read at once (unless the copy is under
//!   [`AUTH_REREAD_MIN`] old), then at most every `kubernetes.secret_refresh` while the failure lasts;
//! - an image using it is not ready (waiting, pulling, failed) and the copy is older than
//!   `kubernetes.secret_refresh` (a pull is about to use it);
//! - the copy is itself a problem (missing, wrong type, forbidden, unparsable) and older than
//!   `kubernetes.secret_refresh`: the project may fix it without touching its ProjectSettings. This costs
//!   broken projects only.
//!
//! Before, every node read every project's Secret every `secret_refresh` (5 minutes): at 5,000 nodes ×
//! 1,000 projects ≈ 16,700 GETs/s for nothing changing. Now only changes cost: an agent's start reads
//! each Secret once, a ProjectSettings edit (a rollout) costs one GET of that project's Secret per node,
//! and failing or pulling images at most one GET per Secret per `secret_refresh` per node. Reads that
//! may be stale by seconds (the age-based ones) ask with `resourceVersion=0`, answered from the API
//! server's watch cache rather than etcd; the first read and the reads after a ProjectSettings change or
//! an `auth` failure are quorum reads (they must see what was just written).
//!
//! `kubernetes.secret_refresh` *written in the config file* keeps the old periodic re-read as well: every
//! copy older than it is read again at the next reconcile, needed or not (one GET per project per node
//! per period: for drills and small clusters; the API-server drill in tests/kubernetes.rs relies on it).
//!
//! A read that gets no answer about the Secret (the API server is away, or answers 5xx) keeps the last
//! copy in use, even past its age: dropping it would send the next pulls anonymous. A 403 is an answer:
//! the agent may not read that namespace's Secrets, which is the project's problem to fix (its text names
//! the RoleBinding to create).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, GetParams};
use kube::Client;
use tracing::warn;

use crate::credentials::Keyring;
use crate::report::health::{client_answered, ApiHealth};

/// The ClusterRole deploy/overlays/namespaced-secrets gives the platform to bind in each project namespace.
pub const PROJECT_SECRETS_ROLE: &str = "runner-warden-project-secrets";

/// After an `auth` failure the copy is read again at once, but never more often than this (a registry
/// that refuses every credential must not turn into a stream of reads).
pub const AUTH_REREAD_MIN: Duration = Duration::from_secs(30);

/// (namespace, name) of a pull Secret, as `desired::Want::secrets` names it.
pub type SecretKey = (String, String);

/// A Secret the agent may not read (the namespaced-secrets install): what to create so it can.
pub fn secret_forbidden(ns: &str, name: &str, agent_namespace: &str) -> String {
    format!(
        "runner-warden may not read Secret {ns}/{name} (Forbidden): bind ClusterRole {PROJECT_SECRETS_ROLE} to its ServiceAccount in namespace {ns}: kubectl -n {ns} create rolebinding runner-warden-secrets --clusterrole={PROJECT_SECRETS_ROLE} --serviceaccount={agent_namespace}:runner-warden"
    )
}

/// Why a project's pull Secret cannot be used.
pub(super) fn secret_problem(
    secret: Option<&Secret>,
    ns: &str,
    name: &str,
) -> Result<Keyring, String> {
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

/// What the pulls of the images using a Secret say about it (the strongest over those images).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// Every image using it is ready: nothing will use the copy soon.
    #[default]
    Steady,
    /// An image using it is waiting, pulling or failed: a pull will use the copy.
    Pulling,
    /// A pull or re-resolution with it failed with class `auth`.
    AuthFailed,
}

/// How to read a Secret.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadKind {
    /// A quorum read: what was just written (first read, ProjectSettings changed, `auth` failure).
    Current,
    /// `resourceVersion=0`: from the API server's cache, possibly seconds old (age-based re-reads).
    Cached,
}

impl ReadKind {
    fn params(self) -> GetParams {
        match self {
            ReadKind::Current => GetParams::default(),
            ReadKind::Cached => GetParams::any(),
        }
    }
}

/// What a read of a Secret got.
pub enum Answer {
    /// The Secret (or `None`: it does not exist).
    Object(Option<Box<Secret>>),
    /// 403: the agent may not read Secrets in that namespace.
    Forbidden,
    /// No answer about the Secret (unreachable, 5xx, timeout): nothing learnt.
    Unavailable,
}

/// What [`SecretCache::record`] did with an answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The answer is the copy now.
    Stored,
    /// No answer: the last copy stays in use.
    KeptLast,
    /// No answer and no copy: the images go without this Secret for now.
    NoCopy,
}

/// `kubernetes.secret_refresh` and whether it was written in the config file (then it also polls).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SecretPolicy {
    /// How old a copy may be before a pull that needs it reads it again.
    pub refresh: Duration,
    /// Read every copy older than `refresh` again, needed or not (the pre-seam behaviour).
    pub poll: bool,
}

struct Entry {
    read_at: Instant,
    /// The ProjectSettings resourceVersion it was read for: a change reads it again at once.
    for_version: String,
    result: Result<Keyring, String>,
    /// The current `auth` failure has had its immediate re-read.
    auth_reread: bool,
}

/// The pull Secrets in use, with the rules for when to read them again. No I/O: the caller asks
/// [`due`](Self::due), reads, and hands the answer to [`record`](Self::record).
pub struct SecretCache {
    policy: SecretPolicy,
    /// Where the agent's ServiceAccount lives, for the RoleBinding a 403 asks for.
    agent_namespace: String,
    entries: HashMap<SecretKey, Entry>,
}

impl SecretCache {
    pub fn new(policy: SecretPolicy, agent_namespace: impl Into<String>) -> Self {
        Self {
            policy,
            agent_namespace: agent_namespace.into(),
            entries: HashMap::new(),
        }
    }

    /// Whether `key`, wanted under ProjectSettings `version` with `need`, must be read now, and how.
    pub fn due(
        &mut self,
        key: &SecretKey,
        version: &str,
        need: Need,
        now: Instant,
    ) -> Option<ReadKind> {
        let Some(e) = self.entries.get_mut(key) else {
            return Some(ReadKind::Current);
        };
        if e.for_version != version {
            return Some(ReadKind::Current);
        }
        let age = now.saturating_duration_since(e.read_at);
        if need == Need::AuthFailed {
            // The registry refused the credential: perhaps rotated. Once per failure, at once.
            if !e.auth_reread && age >= AUTH_REREAD_MIN.min(self.policy.refresh) {
                e.auth_reread = true;
                return Some(ReadKind::Current);
            }
        } else {
            e.auth_reread = false;
        }
        let stale = age >= self.policy.refresh;
        let wanted = self.policy.poll || need >= Need::Pulling || e.result.is_err();
        (stale && wanted).then_some(ReadKind::Cached)
    }

    /// Takes what a read of `key` (for ProjectSettings `version`) got at `now`.
    pub fn record(
        &mut self,
        key: &SecretKey,
        version: &str,
        answer: Answer,
        now: Instant,
    ) -> Recorded {
        let (ns, name) = key;
        let result = match answer {
            Answer::Object(s) => secret_problem(s.as_deref(), ns, name),
            Answer::Forbidden => Err(secret_forbidden(ns, name, &self.agent_namespace)),
            // Not the secret's fault: the last copy stays in use, even past its age, until a read
            // succeeds (dropping it would send the next pull anonymous).
            Answer::Unavailable => {
                return match self.entries.contains_key(key) {
                    true => Recorded::KeptLast,
                    false => Recorded::NoCopy,
                }
            }
        };
        let auth_reread = self
            .entries
            .get(key)
            .is_some_and(|e| e.auth_reread && e.for_version == version);
        self.entries.insert(
            key.clone(),
            Entry {
                read_at: now,
                for_version: version.to_string(),
                result,
                auth_reread,
            },
        );
        Recorded::Stored
    }

    /// The copy in use: credentials, or why the Secret cannot be used.
    pub fn get(&self, key: &SecretKey) -> Option<&Result<Keyring, String>> {
        self.entries.get(key).map(|e| &e.result)
    }

    /// Forgets every Secret no wanted image names (a project that changed or dropped its secret leaves
    /// no credentials here).
    pub fn retain(&mut self, in_use: impl Fn(&SecretKey) -> bool) {
        self.entries.retain(|k, _| in_use(k));
    }
}

/// Reads `key` from the API server. Health is recorded here; what the answer means is the cache's.
pub(super) async fn read(
    client: &Client,
    key: &SecretKey,
    kind: ReadKind,
    api_health: &ApiHealth,
) -> Answer {
    let (ns, name) = key;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    match api.get_with(name, &kind.params()).await {
        Ok(s) => Answer::Object(Some(Box::new(s))),
        Err(kube::Error::Api(st)) if st.is_not_found() => Answer::Object(None),
        // Not bound in this namespace (namespaced-secrets): the project must act.
        Err(kube::Error::Api(st)) if st.code == 403 => {
            api_health.answered();
            Answer::Forbidden
        }
        Err(e) => {
            if client_answered(&e) {
                api_health.answered();
                warn!(secret = %format!("{ns}/{name}"), error = %e, "cannot read the pull secret; keeping the last copy");
            } else {
                api_health.unreachable("reading a pull secret", &e);
            }
            Answer::Unavailable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    const MIN: Duration = Duration::from_secs(60);

    fn key() -> SecretKey {
        ("team-a".into(), "pull".into())
    }

    fn good(password: &str) -> Secret {
        let doc = format!(r#"{{"auths":{{"r.io":{{"username":"u","password":"{password}"}}}}}}"#);
        Secret {
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                ByteString(doc.into_bytes()),
            )])),
            ..Default::default()
        }
    }

    fn found(password: &str) -> Answer {
        Answer::Object(Some(Box::new(good(password))))
    }

    fn password(c: &SecretCache) -> String {
        let ring = c.get(&key()).unwrap().as_ref().unwrap();
        ring.lookup("r.io/a/b")[0].password.clone()
    }

    fn cache(poll: bool) -> SecretCache {
        SecretCache::new(
            SecretPolicy {
                refresh: 5 * MIN,
                poll,
            },
            "runner-warden",
        )
    }

    #[test]
    fn a_secret_is_read_when_first_needed_and_when_its_project_settings_change() {
        let (mut c, t0) = (cache(false), Instant::now());
        assert_eq!(
            c.due(&key(), "1", Need::Steady, t0),
            Some(ReadKind::Current)
        );
        c.record(&key(), "1", found("p1"), t0);
        assert_eq!(c.due(&key(), "1", Need::Steady, t0), None);
        assert_eq!(
            c.due(&key(), "2", Need::Steady, t0 + Duration::from_secs(1)),
            Some(ReadKind::Current)
        );
    }

    #[test]
    fn a_copy_in_steady_use_is_never_read_again_by_age_alone() {
        let (mut c, t0) = (cache(false), Instant::now());
        c.record(&key(), "1", found("p1"), t0);
        for hours in [1, 24, 24 * 30] {
            let t = t0 + Duration::from_secs(3600 * hours);
            assert_eq!(c.due(&key(), "1", Need::Steady, t), None, "{hours} h");
        }
    }

    /// (need, age of the copy, poll) → read?
    #[test]
    fn a_stale_copy_is_read_again_from_the_cache_only_when_a_pull_needs_it_or_polling_is_set() {
        let cases = [
            (Need::Steady, 4 * MIN, false, None),
            (Need::Steady, 6 * MIN, false, None),
            (Need::Pulling, 4 * MIN, false, None),
            (Need::Pulling, 6 * MIN, false, Some(ReadKind::Cached)),
            (Need::Steady, 4 * MIN, true, None),
            (Need::Steady, 6 * MIN, true, Some(ReadKind::Cached)),
        ];
        for (need, age, poll, want) in cases {
            let (mut c, t0) = (cache(poll), Instant::now());
            c.record(&key(), "1", found("p1"), t0);
            assert_eq!(
                c.due(&key(), "1", need, t0 + age),
                want,
                "{need:?} {age:?} poll={poll}"
            );
        }
    }

    #[test]
    fn an_auth_failure_reads_at_once_then_at_most_every_refresh_while_it_lasts() {
        let (mut c, t0) = (cache(false), Instant::now());
        c.record(&key(), "1", found("old"), t0);
        // Not within the first seconds of a read (that copy is what just failed or is about to be tried).
        let t1 = t0 + AUTH_REREAD_MIN;
        assert_eq!(
            c.due(&key(), "1", Need::AuthFailed, t1 - Duration::from_secs(1)),
            None
        );
        assert_eq!(
            c.due(&key(), "1", Need::AuthFailed, t1),
            Some(ReadKind::Current)
        );
        c.record(&key(), "1", found("rotated"), t1);
        assert_eq!(password(&c), "rotated");
        // Still failing: no read until the copy is older than the refresh.
        assert_eq!(c.due(&key(), "1", Need::AuthFailed, t1 + 4 * MIN), None);
        assert_eq!(
            c.due(&key(), "1", Need::AuthFailed, t1 + 5 * MIN),
            Some(ReadKind::Cached)
        );
        // The failure ended (the image is ready) and a new one begins: read at once again.
        let t2 = t1 + 5 * MIN;
        c.record(&key(), "1", found("rotated"), t2);
        assert_eq!(c.due(&key(), "1", Need::Steady, t2 + MIN), None);
        assert_eq!(
            c.due(&key(), "1", Need::AuthFailed, t2 + MIN),
            Some(ReadKind::Current)
        );
    }

    #[test]
    fn a_read_without_an_answer_keeps_the_last_copy_past_its_age() {
        let (mut c, t0) = (cache(true), Instant::now());
        assert_eq!(
            c.record(&key(), "1", Answer::Unavailable, t0),
            Recorded::NoCopy
        );
        assert!(c.get(&key()).is_none());
        c.record(&key(), "1", found("p1"), t0);
        let t = t0 + 6 * MIN;
        assert_eq!(c.due(&key(), "1", Need::Steady, t), Some(ReadKind::Cached));
        assert_eq!(
            c.record(&key(), "1", Answer::Unavailable, t),
            Recorded::KeptLast
        );
        assert_eq!(password(&c), "p1");
        // Still due: the next reconcile tries again.
        assert_eq!(
            c.due(&key(), "1", Need::Steady, t + Duration::from_secs(30)),
            Some(ReadKind::Cached)
        );
        // Even a changed ProjectSettings keeps the copy until a read answers.
        assert_eq!(
            c.record(&key(), "2", Answer::Unavailable, t),
            Recorded::KeptLast
        );
        assert_eq!(password(&c), "p1");
    }

    #[test]
    fn forbidden_is_the_projects_problem_with_the_rolebinding_to_create() {
        let (mut c, t0) = (cache(false), Instant::now());
        c.record(&key(), "1", Answer::Forbidden, t0);
        let e = c.get(&key()).unwrap().as_ref().unwrap_err();
        assert_eq!(*e, secret_forbidden("team-a", "pull", "runner-warden"));
        // A problem copy is read again by age (the platform may bind the role without touching the
        // ProjectSettings), not before.
        assert_eq!(c.due(&key(), "1", Need::Steady, t0 + 4 * MIN), None);
        assert_eq!(
            c.due(&key(), "1", Need::Steady, t0 + 5 * MIN),
            Some(ReadKind::Cached)
        );
        c.record(&key(), "1", found("p1"), t0 + 5 * MIN);
        assert_eq!(password(&c), "p1");
    }

    #[test]
    fn a_secret_no_image_names_any_more_is_forgotten() {
        let (mut c, t0) = (cache(false), Instant::now());
        c.record(&key(), "1", found("p1"), t0);
        c.retain(|k| k.1 != "pull");
        assert!(c.get(&key()).is_none());
        assert_eq!(
            c.due(&key(), "1", Need::Steady, t0),
            Some(ReadKind::Current)
        );
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
        assert!(secret_problem(Some(&good("hunter2")), "p", "pull").is_ok());
    }

    #[test]
    fn a_secret_from_the_cluster_never_prints_its_password() {
        use crate::model::{ClusterSecret, DesiredImage, SecretRef};
        let pw = "hunter2-cluster-secret";
        let keyring = secret_problem(Some(&good(pw)), "p", "pull").unwrap();
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
        let mut s = good(pw);
        s.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(broken.into_bytes()),
        )]));
        let e = secret_problem(Some(&s), "p", "pull").unwrap_err();
        assert!(e.contains("Secret p/pull") && !e.contains(pw), "{e}");
    }
}
