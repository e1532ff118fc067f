//! One run of a credential provider plugin, as kubelet's `execPlugin` runs it
//! (`pkg/credentialprovider/plugin/plugin.go`): the binary `<bin_dir>/<name>` with the configured `args`,
//! the agent's environment plus the configured `env` (configured names win), a `CredentialProviderRequest`
//! on standard input, a `CredentialProviderResponse` of the same `apiVersion` on standard output.
//!
//! Bounded where kubelet is not: the run is killed (its whole process group) after the timeout, standard
//! output is read up to 1 MiB and standard error is drained and dropped. Nothing the plugin prints is
//! ever put in a message: an error says what was wrong (exit status, size, which field), never the text.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::cache::KeyType;
use super::config::{go_duration, ProviderConfig};
use crate::credentials::Credential;

/// A plugin's answer is a few hundred bytes; anything past this is not read.
pub const OUTPUT_MAX: usize = 1 << 20;

/// The logins of one answer: its `auth` entries, each key a registry pattern.
#[derive(Debug, Default)]
pub struct Logins(pub Vec<Credential>);

#[cfg(test)]
impl Logins {
    pub fn for_test(tag: &str) -> Self {
        Logins(vec![Credential {
            key: tag.to_string(),
            username: "u".into(),
            password: "p".into(),
            identity_token: String::new(),
            registry_token: String::new(),
        }])
    }

    pub fn tag(&self) -> &str {
        &self.0[0].key
    }
}

/// What a plugin answered.
#[derive(Debug)]
pub struct Answer {
    pub key_type: KeyType,
    /// `cacheDuration` as given; `None` when absent (the provider's `defaultCacheDuration` applies).
    pub duration: Option<Duration>,
    pub logins: Logins,
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("cannot start {path} ({source})")]
    Start {
        path: String,
        source: std::io::Error,
    },
    #[error("did not answer within {}; killed", humantime::format_duration(*.0))]
    TimedOut(Duration),
    #[error("exited with {0}")]
    Exit(String),
    #[error("printed more than {OUTPUT_MAX} bytes")]
    TooLarge,
    /// Says which part is wrong, never what it holds.
    #[error("its answer is not a CredentialProviderResponse: {0}")]
    Answer(String),
}

impl PluginError {
    /// The metric label and log field.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Start { .. } => "start",
            PluginError::TimedOut(_) => "timeout",
            PluginError::Exit(_) => "exit",
            PluginError::TooLarge | PluginError::Answer(_) => "answer",
        }
    }
}

/// The request kubelet writes: `{"kind", "apiVersion", "image"}`.
pub fn request(api_version: &str, image: &str) -> Vec<u8> {
    serde_json::json!({
        "kind": "CredentialProviderRequest",
        "apiVersion": api_version,
        "image": image,
    })
    .to_string()
    .into_bytes()
    .into_iter()
    // Go's JSON encoder ends the document with a newline; plugins may read a line.
    .chain(*b"\n")
    .collect()
}

/// Runs `provider`'s plugin from `bin_dir` for `image` and reads its answer.
pub async fn run(
    bin_dir: &Path,
    provider: &ProviderConfig,
    image: &str,
    timeout: Duration,
) -> Result<Answer, PluginError> {
    let path = bin_dir.join(&provider.name);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.args(&provider.args)
        .envs(provider.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a timeout kills whatever the plugin started too.
        .process_group(0);
    let mut child = cmd.spawn().map_err(|source| PluginError::Start {
        path: path.display().to_string(),
        source,
    })?;
    let pid = child.id();
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let body = request(&provider.api_version, image);
    let work = async {
        let write = async {
            if let Some(mut s) = stdin {
                // A plugin that exits without reading its input is not an error (Go ignores EPIPE too).
                let _ = s.write_all(&body).await;
            }
        };
        let (_, out, _, status) = tokio::join!(
            write,
            read_capped(stdout, OUTPUT_MAX),
            read_capped(stderr, 0),
            child.wait()
        );
        (out, status)
    };
    let (out, status) = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: kill(2) with a negative pid signals the group the plugin leads; it is not yet
                // reaped (its wait never returned), so the group id is still its own.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            return Err(PluginError::TimedOut(timeout));
        }
    };
    let status = status.map_err(|e| PluginError::Exit(format!("an unknown status ({e})")))?;
    if !status.success() {
        return Err(PluginError::Exit(status.to_string()));
    }
    let (out, over) = out;
    if over {
        return Err(PluginError::TooLarge);
    }
    parse_answer(&out, &provider.api_version)
}

/// Reads `from` to its end, keeping at most `cap` bytes (wiped when dropped: they hold passwords); true
/// when there was more. Draining the rest keeps a chatty plugin from blocking on a full pipe.
async fn read_capped(
    from: Option<impl AsyncRead + Unpin>,
    cap: usize,
) -> (Zeroizing<Vec<u8>>, bool) {
    let mut kept = Zeroizing::new(Vec::new());
    let mut over = false;
    let Some(mut from) = from else {
        return (kept, over);
    };
    let mut buf = Zeroizing::new(vec![0u8; 16 * 1024]);
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                over |= n > room;
            }
        }
    }
    (kept, over)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawAnswer {
    kind: Option<String>,
    api_version: Option<String>,
    cache_key_type: Option<String>,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: BTreeMap<String, RawAuth>,
}

#[derive(Deserialize, Zeroize, ZeroizeOnDrop)]
struct RawAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

impl fmt::Debug for RawAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RawAuth(<redacted>)")
    }
}

/// Reads an answer as kubelet does: its `apiVersion` must be the provider's, its kind
/// `CredentialProviderResponse`, its `cacheKeyType` one of `Image`, `Registry`, `Global`.
pub fn parse_answer(out: &[u8], api_version: &str) -> Result<Answer, PluginError> {
    let raw: RawAnswer = serde_json::from_slice(out).map_err(|e| {
        PluginError::Answer(format!(
            "not the expected JSON ({} at line {}, column {})",
            match e.classify() {
                serde_json::error::Category::Io => "read error",
                serde_json::error::Category::Syntax => "syntax error",
                serde_json::error::Category::Data => "unexpected value",
                serde_json::error::Category::Eof => "unexpected end",
            },
            e.line(),
            e.column()
        ))
    })?;
    if raw.api_version.as_deref() != Some(api_version) {
        return Err(PluginError::Answer(format!(
            "its apiVersion is not {api_version}, the provider's configured apiVersion"
        )));
    }
    if raw.kind.as_deref() != Some("CredentialProviderResponse") {
        return Err(PluginError::Answer(
            "its kind is not CredentialProviderResponse".into(),
        ));
    }
    let key_type = match raw.cache_key_type.as_deref() {
        Some("Image") => KeyType::Image,
        Some("Registry") => KeyType::Registry,
        Some("Global") => KeyType::Global,
        _ => {
            return Err(PluginError::Answer(
                "its cacheKeyType is not Image, Registry or Global".into(),
            ))
        }
    };
    let duration = match raw.cache_duration.as_deref() {
        None => None,
        // Kubelet keeps an answer with a negative duration already expired: not cached.
        Some(d) if d.starts_with('-') => Some(Duration::ZERO),
        Some(d) => Some(
            go_duration(d)
                .map_err(|_| PluginError::Answer("its cacheDuration is not a duration".into()))?,
        ),
    };
    let mut raw = raw;
    let logins = std::mem::take(&mut raw.auth)
        .into_iter()
        .map(|(key, mut a)| Credential {
            key,
            username: std::mem::take(&mut a.username),
            password: std::mem::take(&mut a.password),
            identity_token: String::new(),
            registry_token: String::new(),
        })
        .collect();
    Ok(Answer {
        key_type,
        duration,
        logins: Logins(logins),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = "credentialprovider.kubelet.k8s.io/v1";

    #[test]
    fn reads_an_answer() {
        let a = parse_answer(
            br#"{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1",
                 "cacheKeyType":"Registry","cacheDuration":"6h0m0s",
                 "auth":{"*.dkr.ecr.*.amazonaws.com":{"username":"AWS","password":"tok-secret"}}}"#,
            V1,
        )
        .unwrap();
        assert_eq!(a.key_type, KeyType::Registry);
        assert_eq!(a.duration, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(a.logins.0.len(), 1);
        assert_eq!(a.logins.0[0].key, "*.dkr.ecr.*.amazonaws.com");
        assert_eq!(a.logins.0[0].password, "tok-secret");
        assert!(!format!("{a:?}").contains("tok-secret"));
    }

    #[test]
    fn durations_absent_zero_and_negative() {
        let with = |d: &str| {
            parse_answer(
                format!(r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"Image"{d},"auth":{{}}}}"#)
                    .as_bytes(),
                V1,
            )
            .unwrap()
            .duration
        };
        assert_eq!(with(""), None);
        assert_eq!(with(r#","cacheDuration":null"#), None);
        assert_eq!(with(r#","cacheDuration":"0s""#), Some(Duration::ZERO));
        assert_eq!(with(r#","cacheDuration":"-5m""#), Some(Duration::ZERO));
        assert_eq!(
            with(r#","cacheDuration":"90s""#),
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn a_wrong_answer_is_refused_without_quoting_it() {
        let secret = "hunter2";
        for (out, want) in [
            (format!("not json {secret}"), "not the expected JSON"),
            (
                format!(
                    r#"{{"kind":"CredentialProviderResponse","apiVersion":"credentialprovider.kubelet.k8s.io/v1alpha1","cacheKeyType":"Image","auth":{{"r.io":{{"username":"u","password":"{secret}"}}}}}}"#
                ),
                "apiVersion is not credentialprovider.kubelet.k8s.io/v1",
            ),
            (
                format!(r#"{{"kind":"{secret}","apiVersion":"{V1}","cacheKeyType":"Image"}}"#),
                "kind is not",
            ),
            (
                format!(
                    r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"{secret}"}}"#
                ),
                "cacheKeyType is not",
            ),
            (
                format!(r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}"}}"#),
                "cacheKeyType is not",
            ),
            (
                format!(
                    r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"Image","cacheDuration":"{secret}"}}"#
                ),
                "cacheDuration is not",
            ),
            (
                format!(
                    r#"{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"Image","auth":{{"r.io":{{"password":12,"username":"{secret}"}}}}}}"#
                ),
                "unexpected value",
            ),
        ] {
            let e = parse_answer(out.as_bytes(), V1).unwrap_err().to_string();
            assert!(e.contains(want), "{want:?} not in {e}");
            assert!(!e.contains(secret), "leaked: {e}");
        }
    }

    #[test]
    fn the_request_is_what_kubelet_writes() {
        let r: serde_json::Value =
            serde_json::from_slice(&request(V1, "r.io:5000/team/runner")).unwrap();
        assert_eq!(
            r,
            serde_json::json!({"kind": "CredentialProviderRequest", "apiVersion": V1, "image": "r.io:5000/team/runner"})
        );
    }

    fn provider(name: &str, args: &[&str], env: &[(&str, &str)]) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            match_images: vec!["r.io".into()],
            default_cache_duration: Duration::ZERO,
            api_version: V1.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wants_pod_token: false,
        }
    }

    fn script(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// Real processes: the request on stdin, args and env as configured, the answer on stdout.
    #[tokio::test]
    async fn runs_a_plugin_with_its_args_env_and_request() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        script(
            dir.path(),
            "p",
            &format!(
                r#"cat > {seen}.req; echo "$1 $PLUGIN_ENV $HOME" > {seen}.args
printf '{{"kind":"CredentialProviderResponse","apiVersion":"{V1}","cacheKeyType":"Global","auth":{{"r.io":{{"username":"u","password":"p"}}}}}}'"#,
                seen = seen.display()
            ),
        );
        let a = run(
            dir.path(),
            &provider(
                "p",
                &["--flag"],
                &[("PLUGIN_ENV", "from-config"), ("HOME", "/over")],
            ),
            "r.io/a",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(a.key_type, KeyType::Global);
        assert_eq!(a.logins.0[0].username, "u");
        let req = std::fs::read_to_string(format!("{}.req", seen.display())).unwrap();
        assert_eq!(req.as_bytes(), request(V1, "r.io/a"));
        let args = std::fs::read_to_string(format!("{}.args", seen.display())).unwrap();
        assert_eq!(
            args.trim(),
            "--flag from-config /over",
            "configured env wins over the agent's"
        );
    }

    #[tokio::test]
    async fn a_failing_hanging_or_flooding_plugin_is_one_bounded_error() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "fails",
            "echo hunter2 >&2; echo hunter2; exit 3",
        );
        script(dir.path(), "hangs", "sleep 600 & sleep 600");
        script(
            dir.path(),
            "floods",
            "yes hunter2 | head -c 3000000; yes x | head -c 3000000 >&2",
        );
        script(dir.path(), "garbage", "echo '{\"hunter2\": '");
        let t = Duration::from_millis(500);
        let e = run(dir.path(), &provider("fails", &[], &[]), "r.io/a", t)
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "exited with exit status: 3");
        let started = std::time::Instant::now();
        let e = run(dir.path(), &provider("hangs", &[], &[]), "r.io/a", t)
            .await
            .unwrap_err();
        assert!(matches!(e, PluginError::TimedOut(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let e = run(
            dir.path(),
            &provider("floods", &[], &[]),
            "r.io/a",
            Duration::from_secs(20),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, PluginError::TooLarge), "{e}");
        let e = run(dir.path(), &provider("garbage", &[], &[]), "r.io/a", t)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not the expected JSON"), "{e}");
        let e = run(dir.path(), &provider("absent", &[], &[]), "r.io/a", t)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), "start");
        assert!(!e.to_string().contains("hunter2"));
    }

    /// The timeout kills the plugin's children too: nothing it started outlives it.
    #[tokio::test]
    async fn a_timeout_kills_the_plugins_process_group() {
        let dir = tempfile::tempdir().unwrap();
        // A sleep of a length no other process has: how pgrep finds the grandchild.
        let mark = format!("sleep 7{}", std::process::id());
        script(dir.path(), "hangs", &format!("sh -c '{mark}' & wait"));
        let e = run(
            dir.path(),
            &provider("hangs", &[], &[]),
            "r.io/a",
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, PluginError::TimedOut(_)));
        let alive = || {
            std::process::Command::new("pgrep")
                .args(["-f", &mark])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!alive(), "the plugin's child survived the timeout");
    }
}
