//! Image references, normalised the way the platform (and Docker) do it.
//!
//! Docker's reference grammar and normalisation (distribution/reference): a bare name means
//! `docker.io/library/<name>`; a first path component without `.` or `:` (and not `localhost`) means
//! `docker.io`. Hand-written rather than `oci-spec`'s `Reference`: that one compiles a Unicode regex on
//! first use which costs the agent ~15 MiB of peak heap (heaptrack; BENCHMARKS.md), a third of its budget.
//! This module also gives the canonical string, the registry host used for credential matching and the
//! allowlist, and tag/digest predicates.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

/// A validated, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageRef {
    canonical: String,
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let err = |reason: &str| ReferenceError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(err("empty"));
        }
        if trimmed != input {
            return Err(err("leading or trailing whitespace"));
        }
        if trimmed.len() == 64
            && trimmed
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            // distribution refuses it: it would be read as an image id, not a repository.
            return Err(err(
                "a bare 64-character hexadecimal string is an image id, not a repository; name the registry (docker.io/<hex>) if you mean the repository",
            ));
        }
        if trimmed.contains("://") {
            return Err(err(
                "a reference has no URL scheme; write registry/repository:tag",
            ));
        }
        let (registry, repository, tag, digest) = split(trimmed).map_err(|r| err(&r))?;
        if let Some(d) = &digest {
            validate_digest(d).map_err(|r| err(&r))?;
        }
        let mut canonical = format!("{registry}/{repository}");
        if let Some(t) = &tag {
            canonical.push(':');
            canonical.push_str(t);
        }
        if let Some(d) = &digest {
            canonical.push('@');
            canonical.push_str(d);
        }
        Ok(Self {
            canonical,
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Registry host, with port when given (`docker.io` for Docker Hub).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Registry host without the port, lowercased: what the allowlist compares.
    pub fn registry_hostname(&self) -> String {
        split_port(&self.registry).0.to_ascii_lowercase()
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// True when the reference names content by digest: it never needs re-resolution.
    pub fn is_pinned_by_digest(&self) -> bool {
        self.digest.is_some()
    }

    /// `registry/repository`, the path kubelet's keyring matches credentials against.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({})", self.canonical)
    }
}

impl FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `host[:port]` → (host, port); a bracketed IPv6 host keeps its colons.
fn split_port(r: &str) -> (&str, Option<&str>) {
    let after_host = match r.starts_with('[') {
        true => r.find(']').map_or(r.len(), |i| i + 1),
        false => r.rfind(':').unwrap_or(r.len()),
    };
    match r[after_host..].strip_prefix(':') {
        Some(port) => (&r[..after_host], Some(port)),
        None => (r, None),
    }
}

/// `name[:tag][@digest]` → (registry, repository, tag, digest), normalised: `latest` when neither tag nor
/// digest is given, `docker.io` (and `library/`) for Docker Hub names.
fn split(s: &str) -> Result<(String, String, Option<String>, Option<String>), String> {
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d.to_string())),
        None => (s, None),
    };
    // A tag is after the last ':' that follows the last '/' (a ':' before it is a registry port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (
            &rest[..last_slash + i],
            Some(rest[last_slash + i + 1..].to_string()),
        ),
        None => (rest, None),
    };
    if let Some(t) = &tag {
        let ok = t.len() <= 128
            && t.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(format!(
                "tag {t:?} must be 1-128 characters of letters, digits, '_', '.', '-' (not starting with '.' or '-')"
            ));
        }
    }
    if name.is_empty() || name.len() > 255 {
        return Err("the name must be 1-255 characters".into());
    }
    // distribution's rule: the first component is a registry when it has a '.' or ':', is `localhost`,
    // or has a capital letter (repository components cannot).
    let (registry, path) = match name.split_once('/') {
        Some((first, path))
            if first.contains('.')
                || first.contains(':')
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first.to_string(), path.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    validate_registry(&registry)?;
    for component in path.split('/') {
        validate_component(component)?;
    }
    let registry = if registry == "index.docker.io" {
        "docker.io".to_string()
    } else {
        registry
    };
    let path = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    let tag = tag.or_else(|| digest.is_none().then(|| "latest".to_string()));
    Ok((registry, path, tag, digest))
}

/// `host[:port]`: dot-separated labels of letters, digits and inner '-', or a bracketed IPv6 address of
/// hex digits and colons (distribution accepts no zone and no embedded IPv4 form).
fn validate_registry(r: &str) -> Result<(), String> {
    let (host, port) = split_port(r);
    if let Some(p) = port {
        if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("registry port {p:?} is not a number"));
        }
    }
    if let Some(inner) = host.strip_prefix('[') {
        let ok = inner.strip_suffix(']').is_some_and(|a| {
            a.contains(':') && a.chars().all(|c| c.is_ascii_hexdigit() || c == ':')
        });
        return match ok {
            true => Ok(()),
            false => Err(format!(
                "registry host {host:?} is not an IPv6 address of hex digits and colons in brackets"
            )),
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!("registry host {host:?} is not a valid host name"))
    }
}

/// A repository path component: lowercase letters and digits, joined by '.', '_', '__' or runs of '-'.
fn validate_component(c: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "repository component {c:?} must be lowercase letters and digits separated by '.', '_', '__' or '-'"
        ))
    };
    let alnum = |ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit();
    let (Some(first), Some(last)) = (c.chars().next(), c.chars().last()) else {
        return bad();
    };
    if !alnum(first) || !alnum(last) {
        return bad();
    }
    let mut sep = String::new();
    for ch in c.chars() {
        if alnum(ch) {
            if !(sep.is_empty()
                || sep == "."
                || sep == "_"
                || sep == "__"
                || sep.chars().all(|x| x == '-'))
            {
                return bad();
            }
            sep.clear();
        } else if ".-_".contains(ch) {
            sep.push(ch);
        } else {
            return bad();
        }
    }
    Ok(())
}

fn validate_digest(d: &str) -> Result<(), String> {
    let (algo, hex) = d
        .split_once(':')
        .ok_or_else(|| format!("digest {d:?} has no algorithm"))?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        other => return Err(format!("unsupported digest algorithm {other:?}")),
    };
    if hex.len() != want
        || !hex
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return Err(format!(
            "digest must be {algo}: followed by {want} lowercase hex characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalises_like_the_platform() {
        let cases = [
            ("busybox", "docker.io/library/busybox:latest"),
            ("library/busybox:1", "docker.io/library/busybox:1"),
            ("ambient/runner:v2", "docker.io/ambient/runner:v2"),
            ("localhost/runner:v2", "localhost/runner:v2"),
            ("localhost:5000/runner", "localhost:5000/runner:latest"),
            (
                "quay.io/ambient_code/vteam_claude_runner:latest",
                "quay.io/ambient_code/vteam_claude_runner:latest",
            ),
            ("127.0.0.1:5000/runners/a:v1", "127.0.0.1:5000/runners/a:v1"),
            ("index.docker.io/foo/bar:1", "docker.io/foo/bar:1"),
            ("docker.io/busybox", "docker.io/library/busybox:latest"),
            ("a.io/x/y__z-w--v.q:1.0_rc-1", "a.io/x/y__z-w--v.q:1.0_rc-1"),
            ("localhost:5000/runner:v1", "localhost:5000/runner:v1"),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().as_str(), want, "{input}");
        }
    }

    #[test]
    fn keeps_tag_and_digest() {
        let r = ImageRef::parse(&format!("quay.io/a/b:v1@{D}")).unwrap();
        assert_eq!(r.tag(), Some("v1"));
        assert_eq!(r.digest(), Some(D));
        assert!(r.is_pinned_by_digest());
        let r = ImageRef::parse(&format!("quay.io/a/b@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.as_str(), format!("quay.io/a/b@{D}"));
    }

    #[test]
    fn registry_hostname_drops_port_and_case() {
        let r = ImageRef::parse("Registry.Example.com:5000/a/b:v1");
        // Upper case in the host is invalid in a reference; the allowlist sees lowercase hosts only.
        assert!(r.is_err() || r.unwrap().registry_hostname() == "registry.example.com");
        let r = ImageRef::parse("registry.example.com:5000/a/b:v1").unwrap();
        assert_eq!(r.registry_hostname(), "registry.example.com");
        assert_eq!(r.registry(), "registry.example.com:5000");
        assert_eq!(r.name(), "registry.example.com:5000/a/b");
    }

    #[test]
    fn rejects_invalid_with_reason() {
        for bad in [
            "",
            " busybox",
            "https://quay.io/a/b:v1",
            "quay.io/A/b:v1",
            "quay.io/a/b:v1@sha256:abc",
            "quay.io/a/b@md5:0123",
            "quay.io/a/b:bad tag",
            "quay.io/a/b:",
            "quay.io/a//b",
            "quay.io/a/-b",
            "quay.io/a/b..c",
            "quay.io/a/b___c",
            "-bad.io/a",
            "quay.io:port/a",
            "not a ref",
        ] {
            let e = ImageRef::parse(bad).expect_err(bad);
            assert!(!e.reason.is_empty(), "{bad}");
            assert!(e.to_string().contains("invalid image reference"), "{e}");
        }
    }

    #[test]
    fn a_tag_starts_with_a_letter_a_digit_or_an_underscore() {
        assert_eq!(ImageRef::parse("busybox:_x").unwrap().tag(), Some("_x"));
        for bad in ["busybox:.x", "busybox:-x"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
#[path = "reference_conformance.rs"]
mod conformance;
