//! Which runner images this node should hold, from what the cluster says: every project's ProjectSettings,
//! the cluster defaults, the feature gate and the registry allowlist (docs/contract.md). Pure: the Kubernetes
//! adapter feeds it objects and turns its answer into pulls and findings.

use std::collections::BTreeMap;

use crate::reference::ImageRef;
use crate::sources::session_images::SessionImage;

/// The platform's switches, as the control plane reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterPolicy {
    /// `CUSTOM_RUNNER_IMAGE_ENABLED`: off → `spec.runnerImage` is ignored.
    pub custom_images_enabled: bool,
    /// `RUNNER_IMAGE_ALLOWED_REGISTRIES`, lower-cased; empty = any registry.
    pub allowed_registries: Vec<String>,
    /// `RUNNER_IMAGE` / `AMBIENT_CODE_RUNNER_IMAGE` and the agent registry's images.
    pub default_images: Vec<String>,
}

impl ClusterPolicy {
    /// Exactly `true` or `1` turn the gate on, as the platform reads it (ambient-code/platform PR #1584,
    /// `components/ambient-control-plane/internal/config/config.go` and the operator's `config.go`:
    /// `os.Getenv("CUSTOM_RUNNER_IMAGE_ENABLED") == "true" || … == "1"`): case-sensitive, untrimmed, so
    /// `TRUE` or ` true` leave it off there, and here.
    pub fn gate(value: Option<&str>) -> bool {
        matches!(value, Some("true" | "1"))
    }

    /// Upstream's `imageref.ParseAllowlist`: split at commas, each entry trimmed, empty ones dropped (kept
    /// lower-cased here; the comparison ignores case anyway).
    pub fn allowlist(value: Option<&str>) -> Vec<String> {
        value
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect()
    }

    /// Upstream's `imageref.ValidateRegistryAllowlist`: an empty list allows everything; otherwise the
    /// registry upstream's parser finds in the reference as written — host *and* port — must equal an
    /// entry, ignoring case. What is then pulled is containerd's reading of the reference (`ImageRef`); where
    /// the two readings differ (`localhost/x`, `a/b/c`: upstream's registry `docker.io` and `a`, containerd's
    /// `localhost` and `docker.io`), the platform's decision stands (docs/conformance.md).
    fn allows(&self, reference: &str) -> bool {
        self.allowed_registries.is_empty()
            || upstream_registry(reference).is_some_and(|(registry, _, _)| {
                self.allowed_registries
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(&registry))
            })
    }
}

/// Upstream's `imageref.ParseImageReference` (ambient-code/platform PR #1584,
/// `components/operator/internal/imageref/imageref.go`, the same in the control plane): `(registry,
/// repository, tag or @digest)`, `None` where it returns an error (empty, or no repository). Its own rules,
/// not Docker's: only `@sha256:` is a digest; a one-part name is `docker.io/library/…`; with two parts the
/// first is the registry only when it holds a `.` or a `:`; with three or more the first always is.
pub fn upstream_registry(reference: &str) -> Option<(String, String, String)> {
    let mut r = reference.trim();
    if r.is_empty() {
        return None;
    }
    let mut tag_or_digest = "";
    if let Some(i) = r.find("@sha256:") {
        tag_or_digest = &r[i..];
        r = &r[..i];
    } else if let Some(i) = r.rfind(':') {
        if !r[i + 1..].contains('/') {
            tag_or_digest = &r[i + 1..];
            r = &r[..i];
        }
    }
    let parts: Vec<&str> = r.split('/').collect();
    let (registry, repository) = match parts.as_slice() {
        [one] => ("docker.io".to_string(), format!("library/{one}")),
        [first, _] if !first.contains('.') && !first.contains(':') => {
            ("docker.io".to_string(), r.to_string())
        }
        [first, rest @ ..] => (first.to_string(), rest.join("/")),
        [] => return None,
    };
    if repository.is_empty() {
        return None;
    }
    Some((registry, repository, tag_or_digest.to_string()))
}

/// One project's ProjectSettings, reduced to what is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectWant {
    pub namespace: String,
    pub runner_image: Option<String>,
    pub pull_secret: Option<String>,
}

/// An image to hold, with every project wanting it and the secrets to try (namespace, secret name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub image: ImageRef,
    pub projects: Vec<String>,
    pub secrets: Vec<(String, String)>,
}

pub use crate::report::messages::ProjectProblem as Problem;

/// A Secret name must be a DNS-1123 subdomain: anything else (`ns/name`, `../x`) is rejected, never followed.
pub fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl ClusterPolicy {
    /// Whether an image learned from the platform's own session pods (`session_images`) is prewarmed:
    /// with no allowlist, yes (as upstream); otherwise its registry (host and port, as `allows`) must be
    /// an entry or the registry of one of the defaults (the platform's own sidecars come from there). A
    /// pod a tenant labels as a runner cannot make every node pull from a registry the platform would
    /// refuse as a runner image.
    pub fn allows_learned(&self, reference: &str) -> bool {
        self.allows(reference)
            || upstream_registry(reference).is_some_and(|(registry, _, _)| {
                self.default_images.iter().any(|d| {
                    upstream_registry(d).is_some_and(|(r, _, _)| r.eq_ignore_ascii_case(&registry))
                })
            })
    }
}

/// The images to hold and the problems found, deduplicated by normalised reference; deterministic order.
/// `learned`: the images the platform's session pods pulled (`session_images`), each with the
/// namespaces that used it and the pull secrets their pods named; returned in the third part are those
/// the allowlist keeps out.
pub fn plan(
    projects: &[ProjectWant],
    policy: &ClusterPolicy,
    learned: &[SessionImage],
) -> (Vec<Want>, Vec<(String, Problem)>, Vec<String>) {
    let mut wants: BTreeMap<String, Want> = BTreeMap::new();
    let mut problems = Vec::new();
    let mut add = |image: ImageRef, project: Option<&str>, secret: Option<(String, String)>| {
        let w = wants
            .entry(image.as_str().to_string())
            .or_insert_with(|| Want {
                image: image.clone(),
                projects: Vec::new(),
                secrets: Vec::new(),
            });
        if let Some(p) = project {
            if !w.projects.iter().any(|q| q == p) {
                w.projects.push(p.to_string());
            }
        }
        if let Some(s) = secret {
            if !w.secrets.contains(&s) {
                w.secrets.push(s);
            }
        }
    };
    for d in &policy.default_images {
        if let Ok(image) = ImageRef::parse(d) {
            add(image, None, None);
        }
    }
    if policy.custom_images_enabled {
        let mut sorted: Vec<&ProjectWant> = projects.iter().collect();
        sorted.sort_by(|a, b| a.namespace.cmp(&b.namespace));
        for p in sorted {
            let Some(raw) = p
                .runner_image
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
            else {
                continue;
            };
            let image = match ImageRef::parse(raw) {
                Ok(i) => i,
                Err(e) => {
                    problems.push((
                        p.namespace.clone(),
                        Problem::BadReference {
                            image: raw.to_string(),
                            why: e.to_string(),
                        },
                    ));
                    continue;
                }
            };
            if !policy.allows(raw) {
                problems.push((
                    p.namespace.clone(),
                    Problem::RegistryNotAllowed {
                        image: image.as_str().to_string(),
                        registry: upstream_registry(raw)
                            .map(|(r, _, _)| r)
                            .unwrap_or_else(|| image.registry().to_string()),
                    },
                ));
                continue;
            }
            let secret = match p
                .pull_secret
                .as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                None => None,
                Some(s) if valid_secret_name(s) => Some((p.namespace.clone(), s.to_string())),
                Some(s) => {
                    problems.push((
                        p.namespace.clone(),
                        Problem::SecretName {
                            secret: s.to_string(),
                        },
                    ));
                    None
                }
            };
            add(image, Some(&p.namespace), secret);
        }
    }
    let mut refused = Vec::new();
    for l in learned {
        let Ok(image) = ImageRef::parse(&l.image) else {
            continue;
        };
        if !policy.allows_learned(&l.image) {
            refused.push(l.image.clone());
            continue;
        }
        for u in &l.users {
            add(image.clone(), Some(&u.namespace), None);
            for name in u.pull_secrets.iter().filter(|n| valid_secret_name(n)) {
                add(
                    image.clone(),
                    Some(&u.namespace),
                    Some((u.namespace.clone(), name.clone())),
                );
            }
        }
    }
    (wants.into_values().collect(), problems, refused)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(ns: &str, image: Option<&str>, secret: Option<&str>) -> ProjectWant {
        ProjectWant {
            namespace: ns.into(),
            runner_image: image.map(Into::into),
            pull_secret: secret.map(Into::into),
        }
    }

    /// `plan` without learned images.
    fn plan_(
        projects: &[ProjectWant],
        policy: &ClusterPolicy,
    ) -> (Vec<Want>, Vec<(String, Problem)>) {
        let (w, p, refused) = plan(projects, policy, &[]);
        assert!(refused.is_empty());
        (w, p)
    }

    fn learned(image: &str, users: &[(&str, &[&str])]) -> SessionImage {
        SessionImage {
            image: image.into(),
            users: users
                .iter()
                .map(|(ns, secrets)| crate::sources::session_images::User {
                    namespace: ns.to_string(),
                    pull_secrets: secrets.iter().map(|s| s.to_string()).collect(),
                    last_seen: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn images_learned_from_session_pods_are_held_with_each_namespaces_secrets() {
        let pol = policy(false, "");
        let (w, p, refused) = plan(
            &[],
            &pol,
            &[
                learned(
                    "quay.io/ambient_code/mcp:1",
                    &[("b", &["pull"]), ("a", &["x", "../bad"])],
                ),
                learned(
                    "quay.io/ambient_code/vteam_claude_runner:latest",
                    &[("a", &["x"])],
                ),
            ],
        );
        assert!(p.is_empty() && refused.is_empty());
        assert_eq!(w.len(), 2);
        let mcp = w.iter().find(|w| w.image.as_str().contains("mcp")).unwrap();
        assert_eq!(mcp.projects, ["b", "a"]);
        assert_eq!(
            mcp.secrets,
            [
                ("b".to_string(), "pull".to_string()),
                ("a".into(), "x".into())
            ],
            "an invalid secret name is never followed"
        );
        // A default learned again: one want, and the namespace's secret joins it (the gate is off, yet
        // the platform's own pods pulled it).
        let runner = w
            .iter()
            .find(|w| w.image.as_str().contains("runner"))
            .unwrap();
        assert_eq!(runner.secrets, [("a".to_string(), "x".to_string())]);
    }

    #[test]
    fn with_an_allowlist_learned_images_come_from_it_or_from_the_defaults_registry() {
        let pol = policy(true, "reg.io:5000");
        let (w, _, refused) = plan(
            &[],
            &pol,
            &[
                learned("quay.io/ambient_code/mcp:1", &[("a", &[])]),
                learned("reg.io:5000/team/sidecar:1", &[("a", &[])]),
                learned("reg.io/team/sidecar:1", &[("a", &[])]),
                learned("evil.example/x:1", &[("a", &[])]),
            ],
        );
        let held: Vec<&str> = w.iter().map(|w| w.image.as_str()).collect();
        assert!(held.contains(&"quay.io/ambient_code/mcp:1"));
        assert!(held.contains(&"reg.io:5000/team/sidecar:1"));
        assert_eq!(refused, ["reg.io/team/sidecar:1", "evil.example/x:1"]);
    }

    fn policy(enabled: bool, allow: &str) -> ClusterPolicy {
        ClusterPolicy {
            custom_images_enabled: enabled,
            allowed_registries: ClusterPolicy::allowlist(Some(allow)),
            default_images: vec!["quay.io/ambient_code/vteam_claude_runner:latest".into()],
        }
    }

    #[test]
    fn gate_off_ignores_project_images_but_keeps_defaults() {
        let (w, p) = plan_(&[want("a", Some("reg.io/x/r:1"), None)], &policy(false, ""));
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].image.as_str(),
            "quay.io/ambient_code/vteam_claude_runner:latest"
        );
        assert!(w[0].projects.is_empty());
        assert!(p.is_empty());
        assert!(ClusterPolicy::gate(Some("true")) && ClusterPolicy::gate(Some("1")));
        for off in [
            "TRUE", "True", " true", "true ", "yes", "on", "0", "false", "",
        ] {
            assert!(
                !ClusterPolicy::gate(Some(off)),
                "{off:?}: upstream compares exactly"
            );
        }
        assert!(!ClusterPolicy::gate(None));
    }

    #[test]
    fn same_image_from_two_projects_is_one_want_with_both_secrets() {
        let (w, p) = plan_(
            &[
                want("b", Some("reg.io/x/r:1"), Some("pull")),
                want("a", Some("reg.io/x/r:1"), Some("creds")),
                want("c", Some("docker.io/library/busybox:1"), None),
            ],
            &policy(true, ""),
        );
        assert!(p.is_empty());
        let r = w
            .iter()
            .find(|w| w.image.as_str() == "reg.io/x/r:1")
            .unwrap();
        assert_eq!(r.projects, ["a", "b"]);
        assert_eq!(
            r.secrets,
            [
                ("a".to_string(), "creds".to_string()),
                ("b".into(), "pull".into())
            ]
        );
        assert!(w
            .iter()
            .any(|w| w.image.as_str() == "docker.io/library/busybox:1"));
    }

    /// Upstream's `TestParseImageReference` (PR #1584, `internal/imageref/imageref_test.go`), row by row:
    /// (name, ref, registry, repository, tag or digest, error).
    #[test]
    fn upstream_parse_image_reference_table() {
        let table: &[(&str, &str, &str, &str, &str, bool)] = &[
            ("empty", "", "", "", "", true),
            ("simple", "nginx", "docker.io", "library/nginx", "", false),
            (
                "with tag",
                "nginx:latest",
                "docker.io",
                "library/nginx",
                "latest",
                false,
            ),
            (
                "docker hub user",
                "myuser/myimage:v1",
                "docker.io",
                "myuser/myimage",
                "v1",
                false,
            ),
            (
                "full registry",
                "quay.io/ambient_code/runner:v2",
                "quay.io",
                "ambient_code/runner",
                "v2",
                false,
            ),
            (
                "digest",
                "quay.io/ambient_code/runner@sha256:abc123",
                "quay.io",
                "ambient_code/runner",
                "@sha256:abc123",
                false,
            ),
            (
                "registry with port",
                "localhost:5000/myimage:dev",
                "localhost:5000",
                "myimage",
                "dev",
                false,
            ),
            (
                "deep path",
                "registry.example.com/org/team/image:latest",
                "registry.example.com",
                "org/team/image",
                "latest",
                false,
            ),
            (
                "no tag",
                "quay.io/ambient_code/runner",
                "quay.io",
                "ambient_code/runner",
                "",
                false,
            ),
        ];
        for (name, r, reg, repo, tag, err) in table {
            let got = upstream_registry(r);
            match err {
                true => assert_eq!(got, None, "{name}"),
                false => assert_eq!(
                    got,
                    Some((reg.to_string(), repo.to_string(), tag.to_string())),
                    "{name}"
                ),
            }
        }
        // Where upstream's parser and Docker's (containerd's) disagree: the platform decides what is
        // allowed, containerd what is pulled.
        assert_eq!(
            upstream_registry("localhost/img:dev").unwrap().0,
            "docker.io"
        );
        assert_eq!(upstream_registry("a/b/c").unwrap().0, "a");
        assert_eq!(upstream_registry("quay.io/").map(|r| r.0), None);
    }

    /// Upstream's `TestValidateRegistryAllowlist` and `TestParseAllowlist` (same file), and the port rule:
    /// an entry without the port does not allow the registry with one.
    #[test]
    fn upstream_allowlist_tables_and_the_port() {
        let table: &[(&str, &str, &[&str], bool)] = &[
            ("empty allowlist allows all", "quay.io/img:v1", &[], true),
            (
                "allowed registry",
                "quay.io/img:v1",
                &["quay.io", "docker.io"],
                true,
            ),
            (
                "denied registry",
                "evil.io/img:v1",
                &["quay.io", "docker.io"],
                false,
            ),
            ("case insensitive", "Quay.IO/img:v1", &["quay.io"], true),
            ("docker hub implicit", "nginx:latest", &["docker.io"], true),
            (
                "docker hub implicit denied",
                "nginx:latest",
                &["quay.io"],
                false,
            ),
            (
                "host without the port",
                "registry.internal:5000/x:1",
                &["registry.internal"],
                false,
            ),
            (
                "host and port",
                "registry.internal:5000/x:1",
                &["registry.internal:5000"],
                true,
            ),
            (
                "a path is never a registry",
                "quay.io/org/x:1",
                &["quay.io/org"],
                false,
            ),
        ];
        for (name, r, list, allowed) in table {
            let pol = ClusterPolicy {
                allowed_registries: ClusterPolicy::allowlist(Some(&list.join(","))),
                ..Default::default()
            };
            assert_eq!(pol.allows(r), *allowed, "{name}");
        }
        for (csv, n) in [
            ("", 0),
            ("quay.io", 1),
            ("quay.io,docker.io", 2),
            ("quay.io, docker.io , gcr.io ", 3),
            (",,,", 0),
        ] {
            assert_eq!(ClusterPolicy::allowlist(Some(csv)).len(), n, "{csv:?}");
        }
    }

    #[test]
    fn allowlist_matches_the_host_exactly_and_case_insensitively() {
        let pol = policy(true, " Reg.IO , quay.io");
        let (w, p) = plan_(
            &[
                want("a", Some("REG.io/x/r:1"), None),
                want("b", Some("evil.reg.io/x/r:1"), None),
                want("c", Some("busybox"), None),
            ],
            &pol,
        );
        assert!(w.iter().any(|w| w.projects == ["a"]));
        assert_eq!(
            p,
            [
                (
                    "b".to_string(),
                    Problem::RegistryNotAllowed {
                        image: "evil.reg.io/x/r:1".into(),
                        registry: "evil.reg.io".into()
                    }
                ),
                (
                    "c".to_string(),
                    Problem::RegistryNotAllowed {
                        image: "docker.io/library/busybox:latest".into(),
                        registry: "docker.io".into()
                    }
                ),
            ]
        );
        assert!(p[0]
            .1
            .message("b")
            .contains("RUNNER_IMAGE_ALLOWED_REGISTRIES"));
    }

    #[test]
    fn cross_namespace_and_malformed_secret_names_are_rejected() {
        for bad in ["other/pull", "../pull", "Pull", "-x", "a..b"] {
            let (w, p) = plan_(
                &[want("a", Some("reg.io/x/r:1"), Some(bad))],
                &policy(true, ""),
            );
            assert!(w[1].secrets.is_empty() || w[0].secrets.is_empty(), "{bad}");
            assert_eq!(
                p,
                [("a".to_string(), Problem::SecretName { secret: bad.into() })],
                "{bad}"
            );
        }
        assert!(valid_secret_name("regcred.v2-x"));
        let (_, p) = plan_(&[want("a", Some("not a ref"), None)], &policy(true, ""));
        assert!(matches!(p[0].1, Problem::BadReference { .. }));
    }
}
