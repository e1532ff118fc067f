//! The runner image contract as data, and the static checks as pure functions: `ImageFacts` (what an
//! image's config and final filesystem say) → one `CheckResult` per check. No I/O here; the adapter that
//! gathers the facts from containerd is `image_audit::facts`. Process checks live in `process`.

pub mod passwd;
pub mod process;
pub mod shutdown;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// Label keys that carry the contract version: upstream's spec and its implementation disagree.
pub const LABEL_KEYS: [&str; 2] = [
    "io.ambient-code.runner-contract-version",
    "dev.ambient.runner.contract-version",
];
pub const EXPECTED_MAJOR: u64 = 1;

/// Variables the platform injects; an image must not bake them into its config.
pub const INJECTED_ENV: [&str; 13] = [
    "SESSION_ID",
    "PROJECT_NAME",
    "WORKSPACE_PATH",
    "AGUI_PORT",
    "BACKEND_API_URL",
    "AMBIENT_GRPC_URL",
    "AMBIENT_GRPC_USE_TLS",
    "AMBIENT_CP_TOKEN_URL",
    "AMBIENT_CP_TOKEN_PUBLIC_KEY",
    "INITIAL_PROMPT",
    "IS_RESUME",
    "CREDENTIAL_IDS",
    "RUNNER_TYPE",
];

/// Paths every runner image must have.
pub const REQUIRED_PATHS: [&str; 3] = ["/app", "/app/ambient-runner", "/tmp"];
/// Paths the image's facts record: the required ones plus the platform's mount points, which the
/// static checks leave alone (a volume covers them) but the conformance suite reports, because a
/// mount hides whether the image itself kept them.
pub const RECORDED_PATHS: [&str; 5] = [
    "/app",
    "/app/ambient-runner",
    "/tmp",
    "/workspace",
    "/app/vertex",
];

/// Stable check ids (used in findings, metrics and configuration).
pub const CHECKS: [&str; 7] = [
    "contract-label",
    "non-root-user",
    "baked-platform-env",
    "stop-signal",
    "required-paths",
    "setuid-files",
    "credentials-baked",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Violation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warning,
    Violation,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Pass => "pass",
            Outcome::Warning => "warning",
            Outcome::Violation => "violation",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CheckResult {
    pub check: &'static str,
    pub outcome: Outcome,
    /// What was found and, when it fails, what to change in the Dockerfile.
    pub detail: String,
}

/// How the checks are tuned; defaults follow docs/contract.md.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub label_keys: Vec<String>,
    pub expected_major: u64,
    /// Severity of a failing check, by check id.
    pub severities: BTreeMap<String, Severity>,
}

impl Default for Policy {
    fn default() -> Self {
        let mut severities: BTreeMap<String, Severity> = CHECKS
            .iter()
            .map(|c| (c.to_string(), Severity::Violation))
            .collect();
        severities.insert("credentials-baked".into(), Severity::Warning);
        Self {
            label_keys: LABEL_KEYS.iter().map(|s| s.to_string()).collect(),
            expected_major: EXPECTED_MAJOR,
            severities,
        }
    }
}

impl Policy {
    fn severity(&self, check: &str) -> Severity {
        self.severities
            .get(check)
            .copied()
            .unwrap_or(Severity::Violation)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

/// One entry of the final filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathMeta {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// What the static checks need from the image config and its final filesystem (all layers applied,
/// whiteouts and opaque directories honoured).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageFacts {
    pub labels: BTreeMap<String, String>,
    pub user: String,
    pub env: Vec<String>,
    pub stop_signal: Option<String>,
    /// Content of `/etc/passwd`, when the image has one: bytes, as containerd reads it.
    pub passwd: Option<Vec<u8>>,
    /// The required paths that exist (absent ones are missing from the map).
    pub paths: BTreeMap<String, PathMeta>,
    pub setuid_files: BTreeSet<String>,
    pub credential_files: BTreeSet<String>,
}

/// Runs every check; one result per check, in `CHECKS` order.
pub fn audit(facts: &ImageFacts, policy: &Policy) -> Vec<CheckResult> {
    let identity = resolve_user(facts);
    let checks: [(&'static str, Result<String, String>); 7] = [
        ("contract-label", contract_label(facts, policy)),
        ("non-root-user", non_root_user(&identity)),
        ("baked-platform-env", baked_env(facts)),
        ("stop-signal", stop_signal(facts)),
        ("required-paths", required_paths(facts, &identity)),
        ("setuid-files", setuid_files(facts)),
        ("credentials-baked", credentials(facts)),
    ];
    checks
        .into_iter()
        .map(|(check, r)| match r {
            Ok(detail) => CheckResult {
                check,
                outcome: Outcome::Pass,
                detail,
            },
            Err(detail) => CheckResult {
                check,
                outcome: match severity_for(check, facts, policy) {
                    Severity::Warning => Outcome::Warning,
                    Severity::Violation => Outcome::Violation,
                },
                detail,
            },
        })
        .collect()
}

/// A missing label is a warning whatever the policy (docs/contract.md); every other failure takes the
/// configured severity of its check.
fn severity_for(check: &str, facts: &ImageFacts, policy: &Policy) -> Severity {
    if check == "contract-label" && label_value(facts, policy).is_none() {
        return Severity::Warning;
    }
    policy.severity(check)
}

fn label_value<'a>(facts: &'a ImageFacts, policy: &'a Policy) -> Option<(&'a str, &'a str)> {
    policy
        .label_keys
        .iter()
        .find_map(|k| facts.labels.get(k).map(|v| (k.as_str(), v.as_str())))
}

fn contract_label(facts: &ImageFacts, policy: &Policy) -> Result<String, String> {
    let Some((key, value)) = label_value(facts, policy) else {
        return Err(format!(
            "no contract version label; add LABEL {}=\"{}\"",
            policy
                .label_keys
                .first()
                .map(String::as_str)
                .unwrap_or(LABEL_KEYS[0]),
            policy.expected_major
        ));
    };
    let major = value
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse::<u64>().ok());
    match major {
        Some(m) if m == policy.expected_major => Ok(format!("{key}={value}")),
        Some(m) => Err(format!(
            "{key}={value} is contract major {m}, this platform expects major {}; rebuild FROM a base image of contract {} and set the label to match",
            policy.expected_major, policy.expected_major
        )),
        None => Err(format!(
            "{key}={value:?} is not a version; set it to \"{}\" or \"{}.0.0\"",
            policy.expected_major, policy.expected_major
        )),
    }
}

/// The runtime identity the image's `User` means: uid (and gid when known), or why it cannot tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    Known {
        uid: u64,
        gid: Option<u64>,
        described: String,
    },
    Unknown(String),
}

pub fn resolve_user(facts: &ImageFacts) -> Identity {
    let user = facts.user.trim();
    if user.is_empty() {
        return Identity::Known {
            uid: 0,
            gid: Some(0),
            described: "no USER (runs as root)".into(),
        };
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // containerd (`oci.WithUser`) reads each part with Go's `strconv.Atoi` and narrows it to 32 bits.
    let group = g
        .and_then(|g| passwd::atoi(g.as_bytes()).ok())
        .map(|g| u64::from(passwd::narrow(g)));
    if let Ok(v) = passwd::atoi(u.as_bytes()) {
        let uid = passwd::narrow(v);
        let described = if i64::from(uid) == v && u.parse::<u64>().is_ok() {
            format!("USER {user}")
        } else {
            format!("USER {user} (containerd reads it as uid {uid})")
        };
        // With no group, containerd takes the primary group of the first passwd line with that uid, else 0.
        let gid = match (g, facts.passwd.as_deref()) {
            (Some(_), _) => group,
            (None, None) => Some(0),
            (None, Some(p)) => match passwd::by_uid(p, uid) {
                Ok(e) => Some(e.map_or(0, |e| u64::from(e.runtime_gid()))),
                Err(why) => {
                    return Identity::Unknown(format!(
                        "USER {user}: {why}, so the container cannot start; fix /etc/passwd"
                    ))
                }
            },
        };
        return Identity::Known {
            uid: u64::from(uid),
            gid,
            described,
        };
    }
    match facts.passwd.as_deref() {
        None => Identity::Unknown(format!(
            "USER {user} is a name but the image has no /etc/passwd to map it; use a numeric USER (e.g. 1001)"
        )),
        Some(p) => match passwd::by_name(p, u) {
            Ok(Some(e)) => {
                let uid = e.runtime_uid();
                let exact = e.uid_field == uid.to_string().as_bytes();
                Identity::Known {
                    uid: u64::from(uid),
                    gid: group.or(Some(u64::from(e.runtime_gid()))),
                    described: if exact {
                        format!("USER {user} (uid {uid} in the image's /etc/passwd)")
                    } else {
                        format!(
                            "USER {user} (uid field {:?} in the image's /etc/passwd, which containerd reads as uid {uid})",
                            String::from_utf8_lossy(e.uid_field)
                        )
                    },
                }
            }
            Ok(None) => Identity::Unknown(format!(
                "USER {user} is not in the image's /etc/passwd, so the container cannot start; add the user or use a numeric USER"
            )),
            Err(why) => Identity::Unknown(format!(
                "USER {user}: {why}, so the container cannot start; fix /etc/passwd or use a numeric USER"
            )),
        },
    }
}

fn non_root_user(identity: &Identity) -> Result<String, String> {
    match identity {
        Identity::Known {
            uid: 0, described, ..
        } => Err(format!(
            "{described} is root; add `USER 1001` (a non-zero UID) at the end of the Dockerfile"
        )),
        Identity::Known { described, .. } => Ok(described.clone()),
        Identity::Unknown(why) => Err(why.clone()),
    }
}

fn baked_env(facts: &ImageFacts) -> Result<String, String> {
    let baked: Vec<&str> = facts
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, _)| k).or(Some(e.as_str())))
        .filter(|k| INJECTED_ENV.contains(k))
        .collect();
    if baked.is_empty() {
        Ok("no platform-injected variable set".into())
    } else {
        Err(format!(
            "ENV sets {} which the platform injects at run time; remove them from the Dockerfile's ENV",
            baked.join(", ")
        ))
    }
}

fn stop_signal(facts: &ImageFacts) -> Result<String, String> {
    match facts.stop_signal.as_deref().map(str::trim) {
        None | Some("") => Ok("default (SIGTERM)".into()),
        Some(s) if ["SIGTERM", "TERM", "15"].contains(&s.to_ascii_uppercase().as_str()) => {
            Ok(s.to_string())
        }
        Some(s) => Err(format!(
            "STOPSIGNAL {s}: containerd sends {s} instead of SIGTERM, so the runner may never get the signal it handles; remove STOPSIGNAL"
        )),
    }
}

fn required_paths(facts: &ImageFacts, identity: &Identity) -> Result<String, String> {
    let mut problems = Vec::new();
    for p in REQUIRED_PATHS {
        match facts.paths.get(p) {
            None => problems.push(format!("{p} is missing (create it in the Dockerfile)")),
            Some(m) if m.kind != Kind::Dir => problems.push(format!("{p} is not a directory")),
            Some(_) => {}
        }
    }
    if let Identity::Known { uid, gid, .. } = identity {
        if let Some(tmp) = facts.paths.get("/tmp") {
            let ok = tmp.mode & 0o002 != 0 || (tmp.uid == *uid && tmp.mode & 0o200 != 0);
            if !ok {
                problems.push(format!(
                    "/tmp (mode {:o}, owner {}) is not writable by uid {uid}; `chmod 1777 /tmp`",
                    tmp.mode & 0o7777,
                    tmp.uid
                ));
            }
        }
        if let Some(app) = facts.paths.get("/app") {
            let by_owner = app.uid == *uid && app.mode & 0o200 != 0;
            // Arbitrary-UID platforms (OpenShift) run with group 0: group-writable for 0 counts too.
            let by_group = app.mode & 0o020 != 0 && (Some(app.gid) == *gid || app.gid == 0);
            if !(by_owner || by_group || app.mode & 0o002 != 0) {
                problems.push(format!(
                    "/app (mode {:o}, owner {}:{}) is not writable by uid {uid} or its group; `chown {uid}:0 /app && chmod g+rwX /app`",
                    app.mode & 0o7777,
                    app.uid,
                    app.gid
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(REQUIRED_PATHS.join(", ") + " present and writable where required")
    } else {
        Err(problems.join("; "))
    }
}

fn setuid_files(facts: &ImageFacts) -> Result<String, String> {
    if facts.setuid_files.is_empty() {
        Ok("none".into())
    } else {
        Err(format!(
            "setuid/setgid files: {}; remove them or `chmod u-s,g-s` in the Dockerfile",
            list(&facts.setuid_files)
        ))
    }
}

fn credentials(facts: &ImageFacts) -> Result<String, String> {
    if facts.credential_files.is_empty() {
        Ok("none found".into())
    } else {
        Err(format!(
            "credential files baked in: {}; remove them and mount credentials at run time",
            list(&facts.credential_files)
        ))
    }
}

fn list(paths: &BTreeSet<String>) -> String {
    const SHOWN: usize = 10;
    let mut s: Vec<&str> = paths.iter().take(SHOWN).map(String::as_str).collect();
    if paths.len() > SHOWN {
        s.push("…");
    }
    format!("{} ({} in all)", s.join(", "), paths.len())
}

/// True for paths of well-known credential files.
pub fn is_credential_path(path: &str) -> bool {
    const SUFFIXES: [&str; 6] = [
        "/.docker/config.json",
        "/.netrc",
        "/.git-credentials",
        "/.aws/credentials",
        "/.kube/config",
        "/.pgpass",
    ];
    if SUFFIXES.iter().any(|s| path.ends_with(s)) {
        return true;
    }
    if let Some((dir, name)) = path.rsplit_once('/') {
        if dir.ends_with("/.ssh") && name.starts_with("id_") && !name.ends_with(".pub") {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(mode: u32, uid: u64, gid: u64) -> PathMeta {
        PathMeta {
            kind: Kind::Dir,
            mode,
            uid,
            gid,
        }
    }

    fn compliant() -> ImageFacts {
        ImageFacts {
            labels: [(LABEL_KEYS[0].to_string(), "1".to_string())].into(),
            user: "1001".into(),
            env: vec!["PATH=/usr/bin".into(), "HOME=/app".into()],
            stop_signal: None,
            passwd: Some("root:x:0:0::/root:/bin/sh\nrunner:x:1001:0::/app:/bin/sh\n".into()),
            paths: [
                ("/app".to_string(), dir(0o775, 0, 0)),
                ("/app/ambient-runner".to_string(), dir(0o755, 0, 0)),
                ("/tmp".to_string(), dir(0o1777, 0, 0)),
            ]
            .into(),
            ..Default::default()
        }
    }

    fn outcome(facts: &ImageFacts, check: &str) -> (Outcome, String) {
        let r = audit(facts, &Policy::default())
            .into_iter()
            .find(|r| r.check == check)
            .unwrap();
        (r.outcome, r.detail)
    }

    #[test]
    fn compliant_image_passes_everything() {
        let results = audit(&compliant(), &Policy::default());
        assert_eq!(results.len(), CHECKS.len());
        for r in results {
            assert_eq!(r.outcome, Outcome::Pass, "{r:?}");
        }
    }

    #[test]
    fn contract_label_versions() {
        let mut f = compliant();
        for (k, v, want) in [
            (LABEL_KEYS[1], "1.0.0", Outcome::Pass),
            (LABEL_KEYS[0], "1", Outcome::Pass),
            (LABEL_KEYS[0], "2", Outcome::Violation),
            (LABEL_KEYS[1], "2.1.0", Outcome::Violation),
            (LABEL_KEYS[0], "latest", Outcome::Violation),
        ] {
            f.labels = [(k.to_string(), v.to_string())].into();
            assert_eq!(outcome(&f, "contract-label").0, want, "{k}={v}");
        }
        f.labels.clear();
        let (o, d) = outcome(&f, "contract-label");
        assert_eq!(o, Outcome::Warning);
        assert!(
            d.contains("add LABEL io.ambient-code.runner-contract-version=\"1\""),
            "{d}"
        );
    }

    #[test]
    fn user_resolution() {
        let mut f = compliant();
        for (user, want) in [
            ("", Outcome::Violation),
            ("0", Outcome::Violation),
            ("root", Outcome::Violation),
            ("1001", Outcome::Pass),
            ("1001:0", Outcome::Pass),
            ("runner", Outcome::Pass),
            ("runner:0", Outcome::Pass),
            ("ghost", Outcome::Violation),
        ] {
            f.user = user.into();
            assert_eq!(outcome(&f, "non-root-user").0, want, "USER {user:?}");
        }
        // A name mapped to 0 by the image's own passwd is root.
        f.passwd = Some("admin:x:0:0::/:/bin/sh\n".into());
        f.user = "admin".into();
        let (o, d) = outcome(&f, "non-root-user");
        assert_eq!(o, Outcome::Violation);
        assert!(d.contains("uid 0"), "{d}");
        f.passwd = None;
        assert_eq!(outcome(&f, "non-root-user").0, Outcome::Violation);
    }

    /// Issue 24 item 3: passwd and USER read as containerd reads them (moby/sys/user, `strconv.Atoi`,
    /// `uint32`). Each of these ran as root under containerd while the old reader judged it non-root.
    #[test]
    fn user_resolution_as_containerd() {
        let runner = |first: &[u8]| {
            let mut p = first.to_vec();
            p.extend_from_slice(b"runner:x:1001:1001::/app:/bin/sh\n");
            p
        };
        // (USER, passwd, outcome, uid containerd runs with)
        type Case = (&'static str, Option<Vec<u8>>, Outcome, Option<u64>);
        let cases: Vec<Case> = vec![
            (
                "runner",
                Some(runner(b"runner:x:x:x::/:/bin/sh\n")),
                Outcome::Violation,
                Some(0),
            ),
            (
                "runner",
                Some(runner(b" runner:x:0:0::/:/bin/sh\n")),
                Outcome::Violation,
                Some(0),
            ),
            (
                "runner",
                Some(runner(b"\trunner:x:0:0::/:/bin/sh\r\n")),
                Outcome::Violation,
                Some(0),
            ),
            (
                "runner",
                Some(b"runner:x:4294967296:0::/:/bin/sh\n".to_vec()),
                Outcome::Violation,
                Some(0),
            ),
            (
                "runner",
                Some(b"runner:x:-4294967296:0::/:/bin/sh\n".to_vec()),
                Outcome::Violation,
                Some(0),
            ),
            (
                "runner",
                Some(b"runner:x:1001\n".to_vec()),
                Outcome::Pass,
                Some(1001),
            ),
            ("4294967296", None, Outcome::Violation, Some(0)),
            ("4294967296:1001", None, Outcome::Violation, Some(0)),
            ("-1", None, Outcome::Pass, Some(u64::from(u32::MAX))),
            // A byte that is not UTF-8 does not stop the read: the next line is still found.
            (
                "runner",
                Some(runner(b"caf\xe9:x:0:0::/:/bin/sh\n")),
                Outcome::Pass,
                Some(1001),
            ),
            (
                "root",
                Some(runner(b"caf\xe9:x:1:1\nroot:x:0:0\n")),
                Outcome::Violation,
                Some(0),
            ),
            // A line too long for containerd's scanner: the container cannot start.
            (
                "runner",
                Some([runner(b""), vec![b'a'; 70_000]].concat()),
                Outcome::Violation,
                None,
            ),
        ];
        for (user, passwd, want, uid) in cases {
            let mut f = compliant();
            f.user = user.into();
            f.passwd = passwd;
            let (o, d) = outcome(&f, "non-root-user");
            assert_eq!(o, want, "USER {user:?}: {d}");
            match (resolve_user(&f), uid) {
                (Identity::Known { uid: got, .. }, Some(uid)) => {
                    assert_eq!(got, uid, "{user:?}: {d}")
                }
                (Identity::Unknown(why), None) => assert!(why.contains("cannot start"), "{why}"),
                (other, _) => panic!("USER {user:?}: {other:?}"),
            }
        }
        let mut f = compliant();
        f.user = "runner".into();
        f.passwd = Some(runner(b"runner:x:x:x::/:/bin/sh\n"));
        assert_eq!(
            outcome(&f, "non-root-user").1,
            "USER runner (uid field \"x\" in the image's /etc/passwd, which containerd reads as uid 0) is root; add `USER 1001` (a non-zero UID) at the end of the Dockerfile"
        );
        f.user = "4294967296".into();
        assert!(outcome(&f, "non-root-user")
            .1
            .starts_with("USER 4294967296 (containerd reads it as uid 0) is root"));
    }

    #[test]
    fn baked_env_and_stop_signal() {
        let mut f = compliant();
        f.env.push("SESSION_ID=abc".into());
        f.env.push("RUNNER_TYPE=claude".into());
        let (o, d) = outcome(&f, "baked-platform-env");
        assert_eq!(o, Outcome::Violation);
        assert!(d.contains("SESSION_ID, RUNNER_TYPE"), "{d}");
        let mut p = Policy::default();
        p.severities
            .insert("baked-platform-env".into(), Severity::Warning);
        let r = audit(&f, &p);
        assert_eq!(r[2].outcome, Outcome::Warning);

        for (sig, want) in [
            ("SIGTERM", Outcome::Pass),
            ("15", Outcome::Pass),
            ("SIGINT", Outcome::Violation),
            ("SIGKILL", Outcome::Violation),
        ] {
            f.stop_signal = Some(sig.into());
            assert_eq!(outcome(&f, "stop-signal").0, want, "{sig}");
        }
    }

    #[test]
    fn required_paths_and_writability() {
        let mut f = compliant();
        f.paths.remove("/app/ambient-runner");
        let (o, d) = outcome(&f, "required-paths");
        assert_eq!(o, Outcome::Violation);
        assert!(d.contains("/app/ambient-runner is missing"), "{d}");

        let mut f = compliant();
        f.paths.insert("/tmp".into(), dir(0o755, 0, 0));
        f.paths.insert("/app".into(), dir(0o755, 0, 0));
        let (_, d) = outcome(&f, "required-paths");
        assert!(
            d.contains("/tmp (mode 755") && d.contains("/app (mode 755"),
            "{d}"
        );

        // Owned by the runtime user, or group-writable for group 0, both pass.
        let mut f = compliant();
        f.paths.insert("/app".into(), dir(0o755, 1001, 1001));
        assert_eq!(outcome(&f, "required-paths").0, Outcome::Pass);
        f.paths.insert("/app".into(), dir(0o770, 0, 0));
        assert_eq!(outcome(&f, "required-paths").0, Outcome::Pass);
    }

    #[test]
    fn setuid_and_credentials() {
        let mut f = compliant();
        f.setuid_files.insert("/usr/bin/su".into());
        f.credential_files
            .insert("/root/.docker/config.json".into());
        assert_eq!(outcome(&f, "setuid-files").0, Outcome::Violation);
        let (o, d) = outcome(&f, "credentials-baked");
        assert_eq!(o, Outcome::Warning);
        assert!(d.contains("/root/.docker/config.json"), "{d}");
    }

    #[test]
    fn a_required_path_that_is_not_a_directory_fails() {
        let mut f = compliant();
        let file = PathMeta {
            kind: Kind::File,
            ..dir(0o755, 0, 0)
        };
        f.paths.insert("/app/ambient-runner".into(), file);
        let (o, d) = outcome(&f, "required-paths");
        assert_eq!(o, Outcome::Violation);
        assert_eq!(d, "/app/ambient-runner is not a directory");
    }

    #[test]
    fn writability_by_the_owner_needs_the_owner_write_bit_and_by_the_group_its_gid() {
        let paths = |f: &ImageFacts| outcome(f, "required-paths").0;
        // /tmp owned by the runtime user: writable only with u+w.
        let mut f = compliant();
        f.paths.insert("/tmp".into(), dir(0o755, 1001, 0));
        assert_eq!(paths(&f), Outcome::Pass);
        f.paths.insert("/tmp".into(), dir(0o555, 1001, 0));
        assert_eq!(paths(&f), Outcome::Violation);
        // /app owned by the runtime user: the same.
        let mut f = compliant();
        f.paths.insert("/app".into(), dir(0o555, 1001, 1001));
        assert_eq!(paths(&f), Outcome::Violation);
        // /app group-writable: for the user's own group, not another non-zero one.
        f.user = "1001:1001".into();
        f.paths.insert("/app".into(), dir(0o770, 0, 1001));
        assert_eq!(paths(&f), Outcome::Pass);
        f.paths.insert("/app".into(), dir(0o770, 0, 2000));
        assert_eq!(paths(&f), Outcome::Violation);
    }

    #[test]
    fn long_lists_show_ten_then_an_ellipsis_and_the_count() {
        let mut f = compliant();
        f.setuid_files = (0..10).map(|i| format!("/bin/s{i:02}")).collect();
        let (_, d) = outcome(&f, "setuid-files");
        assert!(d.starts_with("setuid/setgid files: /bin/s00, "), "{d}");
        assert!(d.contains(", /bin/s09 (10 in all)"), "{d}");
        f.setuid_files.insert("/bin/s10".into());
        let (_, d) = outcome(&f, "setuid-files");
        assert!(d.contains(", /bin/s09, … (11 in all)"), "{d}");
        assert!(!d.contains("/bin/s10"), "{d}");
    }

    #[test]
    fn outcomes_print_as_check_image_shows_them() {
        assert_eq!(
            [Outcome::Pass, Outcome::Warning, Outcome::Violation].map(|o| o.to_string()),
            ["pass", "warning", "violation"]
        );
    }

    #[test]
    fn a_numeric_user_takes_its_primary_group_from_its_own_passwd_line() {
        let mut f = compliant();
        f.passwd = Some("root:x:0:0::/root:/bin/sh\nrunner:x:1001:1001::/app:/bin/sh\n".into());
        assert_eq!(
            resolve_user(&f),
            Identity::Known {
                uid: 1001,
                gid: Some(1001),
                described: "USER 1001".into()
            }
        );
        // Not listed: group 0, as containerd gives it.
        f.passwd = Some("root:x:0:0::/root:/bin/sh\n".into());
        assert!(matches!(
            resolve_user(&f),
            Identity::Known {
                uid: 1001,
                gid: Some(0),
                ..
            }
        ));
    }

    #[test]
    fn credential_paths() {
        for (p, want) in [
            ("/root/.docker/config.json", true),
            ("/app/.netrc", true),
            ("/home/u/.ssh/id_ed25519", true),
            ("/home/u/.ssh/id_ed25519.pub", false),
            ("/home/u/.ssh/known_hosts", false),
            ("/etc/docker/config.json", false),
        ] {
            assert_eq!(is_credential_path(p), want, "{p}");
        }
    }
}
