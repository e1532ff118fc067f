//! containerd errors, and the classification of pull failures.
//!
//! containerd answers a registry's 401 with gRPC code Unknown and `401 Unauthorized` in the message, a
//! missing tag with NotFound (docs/containerd-facts.md), so classification looks at the code *and* the message.

use std::path::{Path, PathBuf};

pub use crate::model::FailureClass;

/// Classifies a failed CRI `PullImage`.
pub fn classify_pull(code: tonic::Code, message: &str) -> FailureClass {
    let m = message.to_ascii_lowercase();
    if m.contains("401 unauthorized")
        || m.contains("403 forbidden")
        || m.contains("unauthorized")
        || m.contains("authorization failed")
        || m.contains("denied")
        || code == tonic::Code::Unauthenticated
        || code == tonic::Code::PermissionDenied
    {
        return FailureClass::Auth;
    }
    if code == tonic::Code::NotFound || m.contains(": not found") || m.contains("404 not found") {
        return FailureClass::NotFound;
    }
    // Unavailable is the gRPC channel to containerd failing (containerd answers registry trouble with
    // Unknown): the node's runtime is down, not the registry.
    if code == tonic::Code::Unavailable {
        return FailureClass::Runtime;
    }
    if code == tonic::Code::DeadlineExceeded
        || [
            "connection refused",
            "connection reset",
            "broken pipe",
            "eof",
            "i/o timeout",
            "no such host",
            "dial tcp",
            "network is unreachable",
            "tls handshake",
            "502 bad gateway",
            "503 service unavailable",
            "504 gateway",
        ]
        .iter()
        .any(|needle| m.contains(needle))
    {
        return FailureClass::Network;
    }
    FailureClass::Other
}

/// Removes every occurrence of each secret from `text` (defence in depth: containerd's messages are not
/// ours to trust).
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 3) {
        out = out.replace(s, "<redacted>");
    }
    redact_derived(&out)
}

/// Credentials containerd derived itself and may quote: a bearer token after `Bearer `, and the query of
/// any URL (registries redirect blob fetches to URLs signed in their query, e.g. `X-Amz-Signature=`, and
/// token endpoints take `access_token=`). Paths stay: they name the repository and digest, which the
/// operator needs.
pub fn redact_derived(text: &str) -> String {
    let token_char = |c: char| c.is_ascii_alphanumeric() || "-._~+/=".contains(c);
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let bearer = rest.find("Bearer ").map(|i| (i, "Bearer ".len()));
        let bearer = bearer.or_else(|| rest.find("bearer ").map(|i| (i, "bearer ".len())));
        let query = ["https://", "http://"]
            .iter()
            .filter_map(|scheme| rest.find(scheme))
            .min()
            .and_then(|at| {
                let mut url_end = rest[at..]
                    .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '>')
                    .map_or(rest.len(), |e| at + e);
                // Punctuation after a URL in prose ("…?a=b: 401") is not part of it.
                while rest[..url_end].ends_with([':', ',', ';', ')']) {
                    url_end -= 1;
                }
                rest[at..url_end].find('?').map(|q| (at + q, url_end))
            });
        match (bearer, query) {
            (Some((b, skip)), q) if q.is_none_or(|(qs, _)| b < qs) => {
                let token_at = b + skip;
                let token_len = rest[token_at..]
                    .find(|c: char| !token_char(c))
                    .unwrap_or(rest.len() - token_at);
                out.push_str(&rest[..token_at]);
                if token_len > 0 {
                    out.push_str("<redacted>");
                }
                rest = &rest[token_at + token_len..];
            }
            (_, Some((qs, end))) => {
                out.push_str(&rest[..qs]);
                out.push_str("?<redacted>");
                rest = &rest[end..];
            }
            _ => {
                out.push_str(rest);
                rest = "";
            }
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("containerd {call} via {}: {message} (code {code:?}){}", socket.display(), hint(*code))]
    Call {
        call: &'static str,
        socket: PathBuf,
        code: tonic::Code,
        message: String,
    },
    #[error("containerd {call}: {message}")]
    Data { call: &'static str, message: String },
}

/// What to check, for errors that say containerd is not there (an answer it gave needs no such advice).
fn hint(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Unavailable => "; is containerd running and is the socket path right?",
        _ => "",
    }
}

impl RuntimeError {
    pub fn call(call: &'static str, socket: &Path, status: tonic::Status) -> Self {
        // tonic's client-side deadline (`Runtime::unary`) ends a call as Cancelled "Timeout expired": a
        // containerd that does not answer is as good as gone, and is treated as unreachable.
        let timed_out = status.code() == tonic::Code::DeadlineExceeded
            || (status.code() == tonic::Code::Cancelled && status.message() == "Timeout expired");
        let (code, message) = match timed_out {
            true => (
                tonic::Code::Unavailable,
                "no answer before the call's deadline (containerd hung or overloaded)".to_string(),
            ),
            false => (status.code(), status.message().to_string()),
        };
        RuntimeError::Call {
            call,
            socket: socket.to_path_buf(),
            code,
            message,
        }
    }

    /// True when containerd could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            RuntimeError::Call {
                code: tonic::Code::Unavailable,
                ..
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn classifies_what_containerd_answers() {
        let cases = [
            (Code::Unknown, "failed to pull and unpack image \"127.0.0.1:5000/a:v1\": failed to resolve reference \"127.0.0.1:5000/a:v1\": pulling from host 127.0.0.1:5000 failed with status code [manifests v1]: 401 Unauthorized", FailureClass::Auth),
            (Code::Unknown, "unexpected status from HEAD request to http://r/v2/a/manifests/v1: 403 Forbidden", FailureClass::Auth),
            (Code::NotFound, "failed to resolve reference \"127.0.0.1:5000/a:nope\": 127.0.0.1:5000/a:nope: not found", FailureClass::NotFound),
            (Code::Unknown, "failed to resolve reference \"r/a:v1\": failed to do request: Head \"http://127.0.0.1:5002/v2/a/manifests/v1\": dial tcp 127.0.0.1:5002: connect: connection refused", FailureClass::Network),
            (Code::Unknown, "failed to copy: httpReadSeeker: failed open: unexpected EOF", FailureClass::Network),
            (Code::Unavailable, "connection error", FailureClass::Runtime),
            (Code::DeadlineExceeded, "context deadline exceeded", FailureClass::Network),
            (Code::Unknown, "failed to unpack: disk quota exceeded", FailureClass::Other),
        ];
        for (code, msg, want) in cases {
            assert_eq!(classify_pull(code, msg), want, "{msg}");
        }
    }

    #[test]
    fn redacts_secrets() {
        assert_eq!(
            redact("user warden pw s3cret! again s3cret!", &["s3cret!", ""]),
            "user warden pw <redacted> again <redacted>"
        );
    }

    #[test]
    fn redacts_tokens_containerd_derived_itself() {
        let cases = [
            (
                r#"failed to fetch anonymous token: unexpected status from GET request to https://auth.r.io/token?scope=repository%3Ateam%2Frunner%3Apull&service=r.io: 401 Unauthorized"#,
                "failed to fetch anonymous token: unexpected status from GET request to https://auth.r.io/token?<redacted>: 401 Unauthorized",
            ),
            (
                "failed to copy: httpReadSeeker: failed open: unexpected status code https://cdn.r.io/blobs/sha256:ab?X-Amz-Signature=deadbeef&X-Amz-Expires=60 403 Forbidden",
                "failed to copy: httpReadSeeker: failed open: unexpected status code https://cdn.r.io/blobs/sha256:ab?<redacted> 403 Forbidden",
            ),
            (
                "authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln, then bearer abc+/= done",
                "authorization: Bearer <redacted>, then bearer <redacted> done",
            ),
            (
                "pulling from host r.io failed with status code [manifests v1]: 401 Unauthorized",
                "pulling from host r.io failed with status code [manifests v1]: 401 Unauthorized",
            ),
            ("https://r.io/v2/ and Bearer", "https://r.io/v2/ and Bearer"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact(raw, &[]), want, "{raw}");
        }
    }
}
