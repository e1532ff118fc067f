//! Which runner images this node should hold, from what the cluster says: every project's ProjectSettings,
//! the cluster defaults, the feature gate and the registry allowlist (docs/contract.md). Pure: the Kubernetes
//! adapter feeds it objects and turns its answer into pulls and findings.

use std::collections::BTreeMap;

use crate::reference::ImageRef;

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
    /// `true`/`1` (any case) turn the gate on, as upstream reads it.
    pub fn gate(value: Option<&str>) -> bool {
        value.is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
    }

    /// Comma-separated hostnames, trimmed and lower-cased.
    pub fn allowlist(value: Option<&str>) -> Vec<String> {
        value
            .unwrap_or("")
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect()
    }

    /// The host (without port) is what upstream compares; an entry with a port must match host and port.
    fn allows(&self, image: &ImageRef) -> bool {
        let host = image.registry_hostname();
        self.allowed_registries.is_empty()
            || self
                .allowed_registries
                .iter()
                .any(|h| *h == host || h.eq_ignore_ascii_case(image.registry()))
    }
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

/// The images to hold and the problems found, deduplicated by normalised reference; deterministic order.
pub fn plan(
    projects: &[ProjectWant],
    policy: &ClusterPolicy,
) -> (Vec<Want>, Vec<(String, Problem)>) {
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
            if !policy.allows(&image) {
                problems.push((
                    p.namespace.clone(),
                    Problem::RegistryNotAllowed {
                        image: image.as_str().to_string(),
                        registry: image.registry().to_string(),
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
    (wants.into_values().collect(), problems)
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

    fn policy(enabled: bool, allow: &str) -> ClusterPolicy {
        ClusterPolicy {
            custom_images_enabled: enabled,
            allowed_registries: ClusterPolicy::allowlist(Some(allow)),
            default_images: vec!["quay.io/ambient_code/vteam_claude_runner:latest".into()],
        }
    }

    #[test]
    fn gate_off_ignores_project_images_but_keeps_defaults() {
        let (w, p) = plan(&[want("a", Some("reg.io/x/r:1"), None)], &policy(false, ""));
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].image.as_str(),
            "quay.io/ambient_code/vteam_claude_runner:latest"
        );
        assert!(w[0].projects.is_empty());
        assert!(p.is_empty());
        assert!(ClusterPolicy::gate(Some("TRUE")) && ClusterPolicy::gate(Some("1")));
        assert!(!ClusterPolicy::gate(Some("yes")) && !ClusterPolicy::gate(None));
    }

    #[test]
    fn same_image_from_two_projects_is_one_want_with_both_secrets() {
        let (w, p) = plan(
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

    #[test]
    fn allowlist_matches_the_host_exactly_and_case_insensitively() {
        let pol = policy(true, " Reg.IO , quay.io");
        let (w, p) = plan(
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
            let (w, p) = plan(
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
        let (_, p) = plan(&[want("a", Some("not a ref"), None)], &policy(true, ""));
        assert!(matches!(p[0].1, Problem::BadReference { .. }));
    }
}
