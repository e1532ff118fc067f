//! Pull-secret parsing and kubelet-style credential matching.
//!
//! Formats: `.dockerconfigjson` (`{"auths": {key: entry}}`) and the legacy `.dockercfg` (`{key: entry}`);
//! an entry has `auth` (base64 `user:password`) or `username`/`password`, and optionally `identitytoken`
//! or `registrytoken`.
//!
//! Matching follows kubelet's `pkg/credentialprovider/keyring.go`: a key matches an image when the hosts
//! have the same number of dot-separated labels and each label matches as a glob (`*`, `?`), the ports are
//! equal, and the key's path is a string prefix of the image's path. Keys are tried most specific first
//! (kubelet's reverse lexical order), every match in turn. `https://index.docker.io/v1/` and `docker.io`
//! keys apply to Docker Hub images only.
//!
//! Nothing here ever prints a secret: `Credential` has a redacting `Debug`, no `Display`, and parse errors
//! carry positions, never the offending text.

use std::fmt;
use std::path::Path;

use base64::Engine;
use serde::Deserialize;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialsError {
    /// Position only: serde_json's own message may quote the secret's text.
    #[error("not valid JSON ({category} at line {line}, column {column}); a pull secret must be a .dockerconfigjson or .dockercfg document")]
    Json {
        category: &'static str,
        line: usize,
        column: usize,
    },
    #[error("entry {key:?}: {problem}")]
    Entry { key: String, problem: &'static str },
    #[error("no registry entries: expected {{\"auths\": {{\"<registry>\": {{\"auth\": \"<base64 user:password>\"}}}}}}")]
    Empty,
}

/// One registry login taken from a pull secret. Wiped from memory when dropped (every copy: keyrings are
/// cloned into merged keyrings and workers), so a core dump or a later heap read finds no tenant's
/// password in freed memory.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Credential {
    /// The key it came from (registry host and optional path); not secret.
    pub key: String,
    pub username: String,
    pub password: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("key", &self.key)
            .field("username", &"<redacted>")
            .field("password", &"<redacted>")
            .finish()
    }
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct RawEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// A parsed pull secret: credentials with the keys they apply to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Keyring {
    entries: Vec<(Pattern, Credential)>,
}

impl Keyring {
    /// Both keyrings' entries, most specific first (kubelet merges every secret of a pod this way).
    pub fn merged<'a>(rings: impl IntoIterator<Item = &'a Keyring>) -> Keyring {
        let mut entries: Vec<(Pattern, Credential)> =
            rings.into_iter().flat_map(|k| k.entries.clone()).collect();
        entries.sort_by(|a, b| b.0.sort_key.cmp(&a.0.sort_key));
        Keyring { entries }
    }

    /// Logins handed over whole (a credential provider's answer): each `key` read as a pull secret's key
    /// would be, most specific first; a key that is not a registry pattern is left out (kubelet logs and
    /// ignores such an entry).
    pub fn from_logins(logins: impl IntoIterator<Item = Credential>) -> Keyring {
        let mut entries: Vec<(Pattern, Credential)> = logins
            .into_iter()
            .filter_map(|c| Some((Pattern::key(&c.key)?, c)))
            .collect();
        entries.sort_by(|a, b| b.0.sort_key.cmp(&a.0.sort_key));
        Keyring { entries }
    }

    /// Parses a `.dockerconfigjson` or a legacy `.dockercfg` document.
    pub fn parse(bytes: &[u8]) -> Result<Self, CredentialsError> {
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(json_error)?;
        let map = match value {
            serde_json::Value::Object(mut top) => match top.remove("auths") {
                Some(serde_json::Value::Object(auths)) => auths,
                Some(_) => {
                    return Err(CredentialsError::Entry {
                        key: "auths".into(),
                        problem: "must be an object mapping registry to credentials",
                    })
                }
                None => top, // legacy .dockercfg: the registries are the top level
            },
            _ => {
                return Err(CredentialsError::Entry {
                    key: "(document)".into(),
                    problem: "must be a JSON object",
                })
            }
        };
        let mut entries = Vec::new();
        for (key, raw) in map {
            let raw: RawEntry =
                serde_json::from_value(raw).map_err(|_| CredentialsError::Entry {
                    key: key.clone(),
                    problem: "must be an object with auth or username/password strings",
                })?;
            let cred = credential_from(&key, raw)?;
            let pattern = Pattern::key(&key).ok_or_else(|| CredentialsError::Entry {
                key: key.clone(),
                problem: "is not a registry host with an optional path",
            })?;
            entries.push((pattern, cred));
        }
        if entries.is_empty() {
            return Err(CredentialsError::Empty);
        }
        // Most specific first: kubelet sorts its index in reverse lexical order.
        entries.sort_by(|a, b| b.0.sort_key.cmp(&a.0.sort_key));
        Ok(Self { entries })
    }

    /// Every credential whose key matches `image_name` (`registry/repository`), most specific first.
    pub fn lookup(&self, image_name: &str) -> Vec<&Credential> {
        let Some(target) = Pattern::parse(image_name) else {
            return Vec::new();
        };
        self.entries
            .iter()
            .filter(|(p, _)| p.matches(&target))
            .map(|(_, c)| c)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The keys (registry patterns) this keyring holds, for messages; never the credentials.
    pub fn keys(&self) -> Vec<&str> {
        self.entries.iter().map(|(_, c)| c.key.as_str()).collect()
    }
}

/// Larger "pull secrets" are not read: a dockerconfigjson is a few kB.
pub const SECRET_MAX: u64 = 1 << 20;

/// Reads and parses a pull secret file; the problem says what is wrong, never what is in it.
pub fn read_secret(path: &Path) -> Result<Keyring, String> {
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {} ({e})", path.display()))?;
    if meta.is_dir() {
        return Err(format!(
            "{} is a directory, not a secret file",
            path.display()
        ));
    }
    if meta.len() > SECRET_MAX {
        return Err(format!(
            "{} is {} bytes; a pull secret is at most {SECRET_MAX} bytes (is it the right file?)",
            path.display(),
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {} ({e})", path.display()))?;
    Keyring::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn json_error(e: serde_json::Error) -> CredentialsError {
    use serde_json::error::Category;
    CredentialsError::Json {
        category: match e.classify() {
            Category::Io => "read error",
            Category::Syntax => "syntax error",
            Category::Data => "unexpected value",
            Category::Eof => "unexpected end",
        },
        line: e.line(),
        column: e.column(),
    }
}

fn credential_from(key: &str, mut raw: RawEntry) -> Result<Credential, CredentialsError> {
    let mut username = raw.username.take().unwrap_or_default();
    let mut password = raw.password.take().unwrap_or_default();
    if let Some(auth) = raw.auth.as_deref().filter(|a| !a.is_empty()) {
        // kubelet: a non-empty `auth` wins over username/password.
        let decoded = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| CredentialsError::Entry {
                    key: key.to_string(),
                    problem: "auth is not valid base64 of user:password",
                })?,
        );
        let decoded = Zeroizing::new(
            std::str::from_utf8(&decoded)
                .map_err(|_| CredentialsError::Entry {
                    key: key.to_string(),
                    problem: "auth does not decode to UTF-8 text",
                })?
                .to_string(),
        );
        let (u, p) = decoded.split_once(':').ok_or(CredentialsError::Entry {
            key: key.to_string(),
            problem: "auth must decode to user:password (no colon found)",
        })?;
        username.zeroize();
        password.zeroize();
        username = u.to_string();
        password = p.to_string();
    }
    let identity_token = raw.identitytoken.take().unwrap_or_default();
    let registry_token = raw.registrytoken.take().unwrap_or_default();
    if !username.is_empty()
        && password.is_empty()
        && identity_token.is_empty()
        && registry_token.is_empty()
    {
        return Err(CredentialsError::Entry {
            key: key.to_string(),
            problem: "has a username but no password",
        });
    }
    if username.is_empty() && identity_token.is_empty() && registry_token.is_empty() {
        return Err(CredentialsError::Entry {
            key: key.to_string(),
            problem: "has no auth, username, identitytoken or registrytoken",
        });
    }
    Ok(Credential {
        key: key.to_string(),
        username,
        password,
        identity_token,
        registry_token,
    })
}

/// A key or image name split the way kubelet's `URLsMatch` compares them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Pattern {
    labels: Vec<String>,
    port: Option<String>,
    path: String,
    sort_key: String,
}

const HUB_ALIASES: [&str; 3] = ["index.docker.io", "docker.io", "registry-1.docker.io"];

impl Pattern {
    /// A key of a pull secret. As kubelet (after `docker login`'s habit): a path that starts with the
    /// registry API version `/v1/` or `/v2/` names the registry, not a repository, so that prefix is
    /// dropped (`https://r.io/v1/` is the key `r.io`).
    fn key(raw: &str) -> Option<Self> {
        let mut p = Self::parse(raw)?;
        for version in ["/v1/", "/v2/"] {
            if let Some(rest) = p.path.strip_prefix(version) {
                p.path = if rest.is_empty() {
                    String::new()
                } else {
                    format!("/{rest}")
                };
                p.sort_key = p.sort_key_of();
                break;
            }
        }
        Some(p)
    }

    fn sort_key_of(&self) -> String {
        format!(
            "{}{}{}",
            self.labels.join("."),
            self.port
                .as_deref()
                .map(|p| format!(":{p}"))
                .unwrap_or_default(),
            self.path
        )
    }

    /// A key or an image name (`registry/repository`).
    fn parse(raw: &str) -> Option<Self> {
        Self::read(raw, true)
    }

    /// As kubelet's `ParseSchemelessURL` reads a `matchImages` entry or an image: as written (no scheme
    /// dropped, no case folded, no Docker Hub alias).
    fn exact(raw: &str) -> Option<Self> {
        Self::read(raw, false)
    }

    fn read(raw: &str, normalise: bool) -> Option<Self> {
        let s = match normalise {
            true => {
                let s = raw.trim();
                s.strip_prefix("https://")
                    .or_else(|| s.strip_prefix("http://"))
                    .unwrap_or(s)
            }
            false => raw,
        };
        if !normalise && s.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return None; // Go's url.Parse refuses these
        }
        // url.Parse leaves a query or fragment out of the path.
        let s = match normalise {
            true => s,
            false => s.split(['?', '#']).next().unwrap_or(s),
        };
        let (hostport, path) = match s.find('/') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        };
        if hostport.is_empty() {
            return None;
        }
        // A bracketed IPv6 host keeps its colons; the port is what follows `]:`.
        let port_at = match hostport.starts_with('[') {
            true => hostport.find(']').map(|i| i + 1),
            false => hostport.rfind(':'),
        };
        let (host, port) = match port_at.map(|i| hostport.split_at(i)) {
            Some((h, "")) => (h, None),
            Some((h, p)) => match p.strip_prefix(':') {
                Some(p) if !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) => {
                    (h, Some(p.to_string()))
                }
                _ => return None,
            },
            None => (hostport, None),
        };
        let mut host = match normalise {
            true => host.to_ascii_lowercase(),
            false => host.to_string(),
        };
        let mut path = match normalise {
            true => path.to_string(),
            // url.Parse refuses a `%` in a host name and a bad escape in a path, and decodes the path.
            false if host.contains('%') => return None,
            false => percent_decode(path)?,
        };
        if normalise && HUB_ALIASES.contains(&host.as_str()) && port.is_none() {
            // Docker Hub keys: `https://index.docker.io/v1/` names the API version, not a repository.
            host = "docker.io".into();
            if path == "/v1/" || path == "/v1" || path == "/" {
                path.clear();
            }
        }
        let sort_key = format!(
            "{host}{}{path}",
            port.as_deref().map(|p| format!(":{p}")).unwrap_or_default()
        );
        // Go's net.SplitHostPort drops an IPv6 address's brackets when a port follows (and fails, leaving
        // them, when none does).
        let bare = match (
            &port,
            host.strip_prefix('[').and_then(|h| h.strip_suffix(']')),
        ) {
            (Some(_), Some(inner)) => inner,
            _ => host.as_str(),
        };
        Some(Self {
            labels: bare.split('.').map(str::to_string).collect(),
            port,
            path,
            sort_key,
        })
    }

    /// `self` is the key (may hold globs); `target` the image.
    fn matches(&self, target: &Pattern) -> bool {
        self.labels.len() == target.labels.len()
            && self
                .labels
                .iter()
                .zip(&target.labels)
                .all(|(g, t)| glob_match(g.as_bytes(), t.as_bytes()))
            && self.port == target.port
            && target.path.starts_with(&self.path)
    }
}

/// A URL path with its `%XX` escapes decoded; `None` for a bad escape (Go's "invalid URL escape").
fn percent_decode(path: &str) -> Option<String> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Makes this process non-dumpable: it holds tenants' registry passwords, so no core dump may carry them
/// and no other process of the same UID may ptrace it or read its memory through /proc. Every command
/// calls it first (the kernel resets it only on exec of a setuid binary or a credential change).
pub fn forbid_core_dumps() -> std::io::Result<()> {
    // SAFETY: PR_SET_DUMPABLE takes plain integers.
    match unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The longest host label DNS allows; a longer key or image label never matches (and bounds the work).
const LABEL_MAX: usize = 63;

/// One element of a host-label glob.
enum Glob {
    Star,
    Any,
    Char(char),
    /// `[...]`: ranges (a single character is a range of one), negated by a leading `^`.
    Class(bool, Vec<(char, char)>),
}

/// A label glob as Go's `filepath.Match` reads it (kubelet matches each host label with it): `*`, `?`,
/// `[a-z]`, `[^a-z]` and `\` escapes. `None` for a malformed pattern, which Go reports as
/// `ErrBadPattern` and kubelet as no match.
fn glob_parse(pattern: &str) -> Option<Vec<Glob>> {
    let mut out = Vec::new();
    let mut chars = pattern.chars().peekable();
    while let Some(c) = chars.next() {
        out.push(match c {
            '*' => Glob::Star,
            '?' => Glob::Any,
            '\\' => Glob::Char(chars.next()?),
            '[' => {
                let negated = chars.next_if_eq(&'^').is_some();
                let mut ranges = Vec::new();
                loop {
                    let lo = match chars.next()? {
                        ']' if !ranges.is_empty() => break,
                        '-' | ']' => return None,
                        '\\' => chars.next()?,
                        c => c,
                    };
                    let hi = match chars.next_if_eq(&'-') {
                        Some(_) => match chars.next()? {
                            '-' | ']' => return None,
                            '\\' => chars.next()?,
                            c => c,
                        },
                        None => lo,
                    };
                    ranges.push((lo, hi));
                }
                Glob::Class(negated, ranges)
            }
            c => Glob::Char(c),
        });
    }
    Some(out)
}

/// `filepath.Match(pattern, text)` on one host label (no separators occur in a label). Iterative,
/// remembering only the last `*`: at most `pattern × text` steps (a recursive matcher backtracks
/// exponentially on `*a*a*a…`, and a workspace admin writes the pattern).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    if pattern.len() > LABEL_MAX || text.len() > LABEL_MAX {
        return false;
    }
    let (Ok(pattern), Ok(text)) = (std::str::from_utf8(pattern), std::str::from_utf8(text)) else {
        return false;
    };
    let Some(pattern) = glob_parse(pattern) else {
        return false;
    };
    let text: Vec<char> = text.chars().collect();
    let one = |g: &Glob, c: char| match g {
        Glob::Any => true,
        Glob::Char(p) => *p == c,
        Glob::Class(negated, ranges) => {
            ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
        }
        Glob::Star => false,
    };
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was, and the text position it now stands for the end of.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(Glob::Star) => {
                star = Some((p, t));
                p += 1;
            }
            Some(g) if one(g, text[t]) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                // Let the last `*` swallow one more character and retry from after it.
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|g| matches!(g, Glob::Star))
}

/// Kubelet's `URLsMatchStr(glob, target)` exactly, as it matches a credential provider's `matchImages`
/// entry (and the keys of a provider's answer) against an image (`registry/repository`): the host split
/// at dots with the same number of labels, each label a `filepath.Match` glob, equal ports (none on both
/// counts as equal), and the glob's path a string prefix of the target's. Case-sensitive and without
/// Docker Hub aliases, unlike a pull secret's key (`Keyring`), because kubelet compares these as written.
pub fn urls_match(glob: &str, target: &str) -> bool {
    match (Pattern::exact(glob), Pattern::exact(target)) {
        (Some(g), Some(t)) => g.matches(&t),
        _ => false,
    }
}

/// Whether kubelet could read `pattern` as a `matchImages` entry (`ParseSchemelessURL` succeeds).
pub fn is_url_pattern(pattern: &str) -> bool {
    Pattern::exact(pattern).is_some()
}

#[cfg(test)]
mod tests {
    /// Credentials, the parse's intermediate and the CRI copy are all wiped on drop: removing it is a
    /// compile error here.
    #[test]
    fn every_credential_holder_is_wiped_on_drop() {
        fn wiped_on_drop<T: ZeroizeOnDrop>() {}
        wiped_on_drop::<Credential>();
        wiped_on_drop::<RawEntry>();
        let mut c = Keyring::parse(br#"{"auths":{"r.io":{"auth":"dTpwdy1zZWNyZXQ="}}}"#)
            .unwrap()
            .lookup("r.io/a")[0]
            .clone();
        assert_eq!(c.password, "pw-secret");
        c.zeroize();
        assert!(c.password.is_empty() && c.username.is_empty());
    }

    use super::*;

    /// The recursive definition, for comparison on small inputs.
    fn glob_reference(pattern: &[u8], text: &[u8]) -> bool {
        match (pattern.first(), text.first()) {
            (None, None) => true,
            (Some(b'*'), _) => {
                glob_reference(&pattern[1..], text)
                    || (!text.is_empty() && glob_reference(pattern, &text[1..]))
            }
            (Some(b'?'), Some(_)) => glob_reference(&pattern[1..], &text[1..]),
            (Some(p), Some(t)) if p == t => glob_reference(&pattern[1..], &text[1..]),
            _ => false,
        }
    }

    #[test]
    fn the_process_holding_credentials_is_not_dumpable() {
        forbid_core_dumps().unwrap();
        // SAFETY: PR_GET_DUMPABLE takes no argument.
        assert_eq!(unsafe { libc::prctl(libc::PR_GET_DUMPABLE) }, 0);
    }

    #[test]
    fn glob_matching_agrees_with_the_definition_on_every_small_case() {
        // Every pattern over {a, b, *, ?} up to 5 long against every text over {a, b} up to 6 long.
        fn words(alphabet: &[u8], max: usize) -> Vec<Vec<u8>> {
            let mut all = vec![vec![]];
            let mut layer = vec![vec![]];
            for _ in 0..max {
                layer = layer
                    .iter()
                    .flat_map(|w: &Vec<u8>| {
                        alphabet.iter().map(move |&c| {
                            let mut w = w.clone();
                            w.push(c);
                            w
                        })
                    })
                    .collect();
                all.extend(layer.iter().cloned());
            }
            all
        }
        let (patterns, texts) = (words(b"ab*?", 5), words(b"ab", 6));
        for p in &patterns {
            for t in &texts {
                assert_eq!(
                    glob_match(p, t),
                    glob_reference(p, t),
                    "{:?} vs {:?}",
                    String::from_utf8_lossy(p),
                    String::from_utf8_lossy(t)
                );
            }
        }
    }

    #[test]
    fn a_hostile_glob_ends_and_labels_are_capped() {
        // `*a*a*…*b` against `aaaa…`: 2^31 steps for a backtracking matcher (this test would not end),
        // at most 63 × 63 here (timed in benches/keyring.rs).
        let pattern = "*a".repeat(31) + "b";
        let text = "a".repeat(63);
        assert!(!glob_match(pattern.as_bytes(), text.as_bytes()));
        let long = "a".repeat(64);
        assert!(
            !glob_match(b"*", long.as_bytes()),
            "longer than a DNS label"
        );
        assert!(glob_match(b"*", "a".repeat(63).as_bytes()));
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn keyring(keys: &[&str]) -> Keyring {
        let auths: serde_json::Map<String, serde_json::Value> = keys
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    serde_json::json!({"auth": b64(&format!("user-{k}:pw"))}),
                )
            })
            .collect();
        Keyring::parse(serde_json::json!({ "auths": auths }).to_string().as_bytes()).unwrap()
    }

    fn matched(keys: &[&str], image: &str) -> Vec<String> {
        keyring(keys)
            .lookup(image)
            .into_iter()
            .map(|c| c.key.clone())
            .collect()
    }

    /// The examples from the Kubernetes documentation ("Interpretation of config.json").
    #[test]
    fn kubernetes_documentation_examples() {
        let table: &[(&str, &str, bool)] = &[
            ("*.kubernetes.io", "kubernetes.io/img", false),
            ("*.kubernetes.io", "abc.kubernetes.io/img", true),
            ("*.*.kubernetes.io", "abc.kubernetes.io/img", false),
            ("*.*.kubernetes.io", "abc.def.kubernetes.io/img", true),
            ("prefix.*.io", "prefix.kubernetes.io/img", true),
            (
                "*-good.kubernetes.io",
                "prefix-good.kubernetes.io/img",
                true,
            ),
            ("my-registry.io/images", "my-registry.io/images", true),
            (
                "my-registry.io/images",
                "my-registry.io/images/my-image",
                true,
            ),
            (
                "my-registry.io/images",
                "my-registry.io/images/another-image",
                true,
            ),
            (
                "*.my-registry.io/images",
                "sub.my-registry.io/images/my-image",
                true,
            ),
            (
                "*.my-registry.io/images",
                "a.sub.my-registry.io/images/my-image",
                false,
            ),
            (
                "*.my-registry.io/images",
                "a.b.sub.my-registry.io/images/my-image",
                false,
            ),
            (
                "my-registry.io/images",
                "my-registry.io/other/my-image",
                false,
            ),
        ];
        for (key, image, want) in table {
            assert_eq!(
                !matched(&[key], image).is_empty(),
                *want,
                "{key} vs {image}"
            );
        }
    }

    #[test]
    fn every_match_is_returned_most_specific_first() {
        // From the docs: both `my-registry.io/images` and `my-registry.io/images/subpath` apply to
        // `my-registry.io/images/subpath/my-image`; the longer path is tried first.
        let got = matched(
            &[
                "my-registry.io/images",
                "my-registry.io/images/subpath",
                "other.io",
            ],
            "my-registry.io/images/subpath/my-image",
        );
        assert_eq!(
            got,
            ["my-registry.io/images/subpath", "my-registry.io/images"]
        );
    }

    #[test]
    fn ports_must_be_equal() {
        assert!(matched(&["my-registry.io:5000"], "my-registry.io/a").is_empty());
        assert!(matched(&["my-registry.io"], "my-registry.io:5000/a").is_empty());
        assert_eq!(
            matched(&["127.0.0.1:5000"], "127.0.0.1:5000/runners/a"),
            ["127.0.0.1:5000"]
        );
        assert!(matched(&["127.0.0.1:5001"], "127.0.0.1:5000/runners/a").is_empty());
    }

    #[test]
    fn scheme_is_ignored() {
        assert_eq!(
            matched(&["https://quay.io"], "quay.io/ambient_code/runner"),
            ["https://quay.io"]
        );
        assert_eq!(
            matched(
                &["http://quay.io/ambient_code"],
                "quay.io/ambient_code/runner"
            )
            .len(),
            1
        );
    }

    #[test]
    fn docker_hub_keys_apply_to_docker_hub_only() {
        for key in [
            "https://index.docker.io/v1/",
            "docker.io",
            "index.docker.io",
        ] {
            assert_eq!(
                matched(&[key], "docker.io/library/busybox").len(),
                1,
                "{key}"
            );
            assert!(
                matched(&[key], "quay.io/library/busybox").is_empty(),
                "{key}"
            );
            assert!(matched(&[key], "docker.io.evil.com/x").is_empty(), "{key}");
        }
    }

    #[test]
    fn parses_username_password_and_tokens() {
        let doc = serde_json::json!({"auths": {
            "a.io": {"username": "u", "password": "p"},
            "b.io": {"auth": b64("user:pa:ss")},
            "c.io": {"identitytoken": "tok"},
            "d.io": {"registrytoken": "rt"},
        }});
        let k = Keyring::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(k.len(), 4);
        let b = k.lookup("b.io/x")[0];
        assert_eq!(
            (b.username.as_str(), b.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(k.lookup("c.io/x")[0].identity_token, "tok");
        assert_eq!(k.lookup("d.io/x")[0].registry_token, "rt");
    }

    #[test]
    fn parses_legacy_dockercfg() {
        let doc = serde_json::json!({"quay.io": {"auth": b64("u:p"), "email": "x@y"}});
        let k = Keyring::parse(doc.to_string().as_bytes()).unwrap();
        assert_eq!(k.lookup("quay.io/a/b")[0].username, "u");
    }

    #[test]
    fn errors_never_quote_secret_text() {
        let secret = "hunter2-SECRET";
        let docs = [
            format!("{{\"auths\": \"{secret}\"}}"),
            format!("{{\"auths\": {{\"a.io\": {{\"auth\": \"{secret}!!\"}}}}}}"),
            format!(
                "{{\"auths\": {{\"a.io\": {{\"auth\": \"{}\"}}}}}}",
                b64(secret)
            ),
            format!(
                "{{\"auths\": {{\"a.io\": {{\"password\": 12, \"username\": \"{secret}\"}}}}}}"
            ),
            format!("{{\"auths\": {{\"a.io\": {{\"auth\": \"{secret}"),
            format!("[\"{secret}\"]"),
            secret.to_string(),
        ];
        for doc in &docs {
            let e = Keyring::parse(doc.as_bytes()).expect_err(doc);
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2"), "leaked in {text}");
        }
        let ok = Keyring::parse(
            format!(
                "{{\"auths\": {{\"a.io\": {{\"auth\": \"{}\"}}}}}}",
                b64(&format!("u:{secret}"))
            )
            .as_bytes(),
        )
        .unwrap();
        assert!(!format!("{ok:?}").contains("hunter2"));
    }

    #[test]
    fn empty_and_incomplete_entries_are_errors() {
        assert_eq!(
            Keyring::parse(b"{\"auths\": {}}").unwrap_err(),
            CredentialsError::Empty
        );
        let e = Keyring::parse(b"{\"auths\": {\"a.io\": {\"email\": \"x\"}}}").unwrap_err();
        assert!(e.to_string().contains("a.io"), "{e}");
    }
}

#[cfg(test)]
#[path = "credentials_conformance.rs"]
mod conformance;
