//! Image references, normalised the way the platform (and Docker) do it.
//!
//! Parsing is `oci-spec`'s `Reference`, which already applies Docker's rules: a bare name means
//! `docker.io/library/<name>`; a first path component without `.` or `:` (and not `localhost`) means
//! `docker.io`. This module adds what the agent needs on top: a canonical string, the registry host
//! used for credential matching and the allowlist, and tag/digest predicates.

use std::fmt;
use std::str::FromStr;

use oci_spec::distribution::Reference;

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
        if trimmed.contains("://") {
            return Err(err(
                "a reference has no URL scheme; write registry/repository:tag",
            ));
        }
        let parsed = Reference::from_str(trimmed).map_err(|e| err(&e.to_string()))?;
        let digest = parsed.digest().map(str::to_string);
        if let Some(d) = &digest {
            validate_digest(d).map_err(|r| err(&r))?;
        }
        // oci-spec fills in `latest` for a bare name; with a digest and no tag it leaves the tag empty.
        let tag = parsed.tag().map(str::to_string);
        let registry = parsed.registry().to_string();
        let repository = parsed.repository().to_string();
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
        let host = match self.registry.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        host.to_ascii_lowercase()
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
        ] {
            let e = ImageRef::parse(bad).expect_err(bad);
            assert!(!e.reason.is_empty(), "{bad}");
            assert!(e.to_string().contains("invalid image reference"), "{e}");
        }
    }
}
