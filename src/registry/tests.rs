//! Loopback tests: a registry (and its token server) played in-process by a tiny hyper server on
//! 127.0.0.1:0, so every answer and every request the resolver sends can be checked.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const MANIFEST_PATH: &str = "/v2/team/app/manifests/v1";

/// One request as the fake registry saw it.
struct Seen {
    method: Method,
    path: String,
    query: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Seen {
    fn auth(&self) -> &str {
        self.headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

type Handler = Arc<dyn Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync>;

async fn serve(
    handler: impl Fn(&Seen) -> Response<Full<Bytes>> + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler: Handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let handler = handler.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let seen = Seen {
                            method: parts.method,
                            path: parts.uri.path().to_string(),
                            query: parts.uri.query().unwrap_or("").to_string(),
                            headers: parts.headers,
                            body,
                        };
                        Ok::<_, Infallible>(handler(&seen))
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn answer(status: StatusCode, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

fn found() -> Response<Full<Bytes>> {
    answer(StatusCode::OK, &[("Docker-Content-Digest", DIGEST)], "")
}

fn image(addr: SocketAddr) -> ImageRef {
    ImageRef::parse(&format!("127.0.0.1:{}/team/app:v1", addr.port())).unwrap()
}

fn cred(key: &str, username: &str, password: &str) -> Credential {
    Credential {
        key: key.to_string(),
        username: username.to_string(),
        password: password.to_string(),
        identity_token: String::new(),
        registry_token: String::new(),
    }
}

fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

#[tokio::test]
async fn head_with_docker_content_digest() {
    let addr = serve(|s| {
        let accept = s
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if s.method == Method::HEAD
            && s.path == MANIFEST_PATH
            && accept.starts_with("application/vnd.oci.image.index.v1+json")
        {
            found()
        } else {
            answer(StatusCode::BAD_REQUEST, &[], "")
        }
    })
    .await;
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 1);
}

#[tokio::test]
async fn without_the_header_the_digest_is_the_body_hash() {
    let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
    let addr = serve(move |s| match s.method {
        Method::HEAD => answer(StatusCode::OK, &[], ""),
        Method::GET => answer(StatusCode::OK, &[], body),
        _ => answer(StatusCode::BAD_REQUEST, &[], ""),
    })
    .await;
    let r = Resolver::new().unwrap();
    let want = format!("sha256:{}", hex(&Sha256::digest(body.as_bytes())));
    assert_eq!(r.resolve(&image(addr), &[]).await.unwrap(), want);
    assert_eq!(r.requests(), 2, "a HEAD, then one GET");
}

#[tokio::test]
async fn a_manifest_body_over_4_mib_is_refused() {
    let big = "x".repeat(MAX_MANIFEST_BYTES + 1);
    let addr = serve(move |s| match s.method {
        Method::HEAD => answer(StatusCode::OK, &[], ""),
        _ => answer(StatusCode::OK, &[], &big),
    })
    .await;
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Other);
    assert!(err.to_string().contains("more than 4096 KiB"), "{err}");
}

#[tokio::test]
async fn an_invalid_digest_header_is_refused() {
    let addr = serve(|_| {
        answer(
            StatusCode::OK,
            &[("Docker-Content-Digest", "sha256:ABC")],
            "",
        )
    })
    .await;
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("invalid Docker-Content-Digest"),
        "{err}"
    );
}

/// 401 with a Basic challenge.
fn basic_refused() -> Response<Full<Bytes>> {
    answer(
        StatusCode::UNAUTHORIZED,
        &[("WWW-Authenticate", r#"Basic realm="fake""#)],
        "",
    )
}

/// 401 with a Bearer challenge whose token server is `addr`'s `/token`; `more`: further parameters.
fn bearer_refused(addr: SocketAddr, more: &str) -> Response<Full<Bytes>> {
    let realm = format!(r#"Bearer realm="http://{addr}/token",service="fake"{more}"#);
    answer(
        StatusCode::UNAUTHORIZED,
        &[("WWW-Authenticate", realm.as_str())],
        "",
    )
}

/// A registry that wants Basic `alice:right`.
async fn basic_registry() -> SocketAddr {
    let want = basic("alice", "right");
    serve(move |s| {
        if s.auth() == want {
            found()
        } else {
            basic_refused()
        }
    })
    .await
}

#[tokio::test]
async fn basic_wrong_credentials_are_an_auth_failure_naming_the_key() {
    let addr = basic_registry().await;
    let wrong = cred("127.0.0.1/team", "alice", "wrong-password-1");
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[&wrong])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth);
    let text = err.to_string();
    assert!(text.contains("\"127.0.0.1/team\""), "{text}");
    assert!(text.contains("anonymous"), "{text}");
    assert!(!text.contains("wrong-password-1") && !format!("{err:?}").contains("wrong-password-1"));
}

#[tokio::test]
async fn basic_right_credentials_resolve() {
    let addr = basic_registry().await;
    let right = cred("127.0.0.1", "alice", "right");
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 2, "the probe, then the authenticated HEAD");
}

#[tokio::test]
async fn the_second_credential_is_tried_after_the_first_is_refused() {
    let addr = basic_registry().await;
    let wrong = cred("127.0.0.1/team/app", "alice", "wrong");
    let right = cred("127.0.0.1", "alice", "right");
    let r = Resolver::new().unwrap();
    assert_eq!(
        r.resolve(&image(addr), &[&wrong, &right]).await.unwrap(),
        DIGEST
    );
    assert_eq!(r.requests(), 3);
}

#[tokio::test]
async fn anonymous_is_tried_after_every_credential_and_named_when_all_fail() {
    let addr = basic_registry().await;
    let a = cred("one", "alice", "x");
    let b = cred("two", "bob", "y");
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[&a, &b])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth);
    let text = err.to_string();
    assert!(
        text.contains(r#""one", "two" and anonymous access"#),
        "{text}"
    );
}

#[tokio::test]
async fn a_basic_registry_is_asked_with_the_credential_at_once_after_its_first_challenge() {
    let addr = basic_registry().await;
    let right = cred("127.0.0.1", "alice", "right");
    let wrong = cred("127.0.0.1", "alice", "wrong");
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 2, "the probe, then the authenticated HEAD");
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 3, "no probe: one request a tag");
    // A refused password under the remembered challenge is an auth failure, not a changed challenge.
    let err = r.resolve(&image(addr), &[&wrong]).await.unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth, "{err}");
    assert_eq!(r.requests(), 5, "the wrong password, then anonymously");
    assert!(r.asked_basic(&format!("127.0.0.1:{}", addr.port())));
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 6);
}

/// Basic `alice:right` until the switch is set; then Bearer, whose token server gives `tok-2` to
/// `alice:right` and `anon-tok` to a request without credentials (the registry takes both).
async fn basic_then_bearer() -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    let bearer_now = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let switch = bearer_now.clone();
    let addr_cell: Arc<std::sync::OnceLock<SocketAddr>> = Arc::new(std::sync::OnceLock::new());
    let cell = addr_cell.clone();
    let addr = serve(move |s| {
        if !switch.load(Ordering::SeqCst) {
            return if s.auth() == basic("alice", "right") {
                found()
            } else {
                basic_refused()
            };
        }
        if s.path == "/token" {
            return if s.auth() == basic("alice", "right") {
                answer(StatusCode::OK, &[], r#"{"token":"tok-2","expires_in":300}"#)
            } else if s.auth().is_empty() {
                answer(
                    StatusCode::OK,
                    &[],
                    r#"{"token":"anon-tok","expires_in":300}"#,
                )
            } else {
                answer(StatusCode::UNAUTHORIZED, &[], "")
            };
        }
        if s.auth() == "Bearer tok-2" || s.auth() == "Bearer anon-tok" {
            return found();
        }
        bearer_refused(*cell.get().unwrap(), "")
    })
    .await;
    addr_cell.set(addr).unwrap();
    (addr, bearer_now)
}

#[tokio::test]
async fn a_registry_that_moves_from_basic_to_bearer_is_probed_again() {
    let (addr, bearer_now) = basic_then_bearer().await;
    let right = cred("127.0.0.1", "alice", "right");
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 2);
    bearer_now.store(true, Ordering::SeqCst);
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(
        r.requests(),
        6,
        "Basic refused with a Bearer challenge, then the probe, the token, the HEAD"
    );
    assert!(!r.asked_basic(&format!("127.0.0.1:{}", addr.port())));
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 7, "the cached token from now on");
}

#[tokio::test]
async fn anonymous_access_follows_a_registry_from_basic_to_bearer_too() {
    let (addr, bearer_now) = basic_then_bearer().await;
    let r = Resolver::new().unwrap();
    let err = r.resolve(&image(addr), &[]).await.unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth);
    assert_eq!(r.requests(), 1, "anonymous is asked once");
    assert!(r.asked_basic(&format!("127.0.0.1:{}", addr.port())));
    r.resolve(&image(addr), &[]).await.unwrap_err();
    assert_eq!(r.requests(), 2, "still once, the challenge known");
    bearer_now.store(true, Ordering::SeqCst);
    assert_eq!(r.resolve(&image(addr), &[]).await.unwrap(), DIGEST);
    assert_eq!(
        r.requests(),
        6,
        "anonymous refused with a Bearer challenge, then the probe, the anonymous token, the HEAD"
    );
}

#[test]
fn the_basic_registries_are_bounded() {
    let r = Resolver::new().unwrap();
    for i in 0..MAX_BASIC_REGISTRIES {
        r.remember_basic(&format!("reg-{i}.example"), true);
    }
    assert!(r.asked_basic("reg-0.example"));
    r.remember_basic("reg-0.example", true);
    assert!(r.asked_basic("reg-1.example"), "a known one adds nothing");
    r.remember_basic("one-more.example", true);
    assert!(r.asked_basic("one-more.example") && !r.asked_basic("reg-0.example"));
    assert_eq!(r.basic.lock().unwrap().len(), 1);
}

/// A registry with a bearer token server on the same address; returns its address and the token
/// requests counter. The token server gives `tok-1` to `alice:right` and `anon-tok` to anyone else
/// without credentials; the registry accepts `tok-1` only.
async fn bearer_registry() -> (SocketAddr, Arc<AtomicUsize>) {
    let tokens = Arc::new(AtomicUsize::new(0));
    let counter = tokens.clone();
    let addr_cell: Arc<std::sync::OnceLock<SocketAddr>> = Arc::new(std::sync::OnceLock::new());
    let cell = addr_cell.clone();
    let addr = serve(move |s| {
        if s.path == "/token" {
            counter.fetch_add(1, Ordering::SeqCst);
            assert!(
                s.query.contains("service=fake")
                    && s.query.contains("scope=repository%3Ateam%2Fapp%3Apull"),
                "{}",
                s.query
            );
            return if s.auth() == basic("alice", "right") {
                answer(StatusCode::OK, &[], r#"{"token":"tok-1","expires_in":300}"#)
            } else if s.auth().is_empty() {
                answer(StatusCode::OK, &[], r#"{"access_token":"anon-tok"}"#)
            } else {
                answer(StatusCode::UNAUTHORIZED, &[], "")
            };
        }
        if s.auth() == "Bearer tok-1" {
            return found();
        }
        bearer_refused(*cell.get().unwrap(), r#",scope="repository:team/app:pull""#)
    })
    .await;
    addr_cell.set(addr).unwrap();
    (addr, tokens)
}

#[tokio::test]
async fn bearer_token_is_fetched_once_and_reused() {
    let (addr, tokens) = bearer_registry().await;
    let right = cred("127.0.0.1", "alice", "right");
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(tokens.load(Ordering::SeqCst), 1);
    assert_eq!(r.requests(), 3, "probe, token, authenticated HEAD");

    assert_eq!(r.resolve(&image(addr), &[&right]).await.unwrap(), DIGEST);
    assert_eq!(
        tokens.load(Ordering::SeqCst),
        1,
        "the cached token is reused"
    );
    assert_eq!(r.requests(), 4, "a cached token skips the probe too");
    assert_eq!(r.tokens_cached(), 1);
}

#[tokio::test]
async fn a_cached_token_is_never_shared_with_another_password_under_the_same_key() {
    let (addr, tokens) = bearer_registry().await;
    let right = cred("127.0.0.1", "alice", "right");
    let other = cred("127.0.0.1", "alice", "another-projects-password");
    let r = Resolver::new().unwrap();
    r.resolve(&image(addr), &[&right]).await.unwrap();
    let err = r.resolve(&image(addr), &[&other]).await.unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth);
    assert_eq!(tokens.load(Ordering::SeqCst), 3, "other's token and anon's");
}

#[tokio::test]
async fn a_registry_token_is_used_as_the_bearer_token_directly() {
    let (addr, tokens) = bearer_registry().await;
    let mut c = cred("127.0.0.1", "", "");
    c.registry_token = "tok-1".to_string();
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&c]).await.unwrap(), DIGEST);
    assert_eq!(tokens.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_identity_token_is_posted_as_a_refresh_token() {
    let addr = serve(|s| {
        if s.path == "/token" {
            let body = String::from_utf8_lossy(&s.body);
            return if s.method == Method::POST
                && body.contains("grant_type=refresh_token")
                && body.contains("refresh_token=idtok")
            {
                answer(StatusCode::OK, &[], r#"{"access_token":"tok-1"}"#)
            } else {
                answer(StatusCode::UNAUTHORIZED, &[], "")
            };
        }
        if s.auth() == "Bearer tok-1" {
            return found();
        }
        let realm = format!(
            r#"Bearer realm="http://{}/token",service="fake""#,
            s.headers.get(header::HOST).unwrap().to_str().unwrap()
        );
        answer(
            StatusCode::UNAUTHORIZED,
            &[("WWW-Authenticate", realm.as_str())],
            "",
        )
    })
    .await;
    let mut c = cred("127.0.0.1", "<token>", "");
    c.identity_token = "idtok".to_string();
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[&c]).await.unwrap(), DIGEST);
}

#[tokio::test]
async fn not_found_is_not_found() {
    let addr = serve(|_| answer(StatusCode::NOT_FOUND, &[], "")).await;
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::NotFound);
    assert!(err.to_string().contains(MANIFEST_PATH), "{err}");
}

#[tokio::test]
async fn a_digest_reference_needs_no_request() {
    // Port 1: nothing listens there, so any request would fail the test.
    let image = ImageRef::parse(&format!("127.0.0.1:1/team/app@{DIGEST}")).unwrap();
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image, &[]).await.unwrap(), DIGEST);
    assert_eq!(r.requests(), 0);
}

#[tokio::test]
async fn secrets_never_reach_errors_or_debug_output() {
    const PASSWORD: &str = "pa55-w0rd-never-shown";
    const TOKEN: &str = "tok-never-shown-9f8e7d";
    const REGISTRY_TOKEN: &str = "regtok-never-shown-1a2b";
    const IDENTITY_TOKEN: &str = "idtok-never-shown-3c4d";
    // The token server hands TOKEN to anyone and echoes what it was sent on refusal; the registry refuses
    // every token and echoes the Authorization header in its body (a badly behaved registry must not
    // make us leak either).
    let addr = serve(|s| {
        if s.path == "/token" {
            return if s.method == Method::POST {
                answer(
                    StatusCode::UNAUTHORIZED,
                    &[],
                    &String::from_utf8_lossy(&s.body),
                )
            } else {
                answer(
                    StatusCode::OK,
                    &[],
                    &format!(r#"{{"token":"{TOKEN}","expires_in":300}}"#),
                )
            };
        }
        let realm = format!(
            r#"Bearer realm="http://{}/token",service="fake",error="{}""#,
            s.headers.get(header::HOST).unwrap().to_str().unwrap(),
            s.auth()
        );
        answer(
            StatusCode::UNAUTHORIZED,
            &[("WWW-Authenticate", realm.as_str())],
            s.auth(),
        )
    })
    .await;
    let with_password = cred("127.0.0.1/team", "alice", PASSWORD);
    let mut with_registry_token = cred("127.0.0.1", "", "");
    with_registry_token.registry_token = REGISTRY_TOKEN.to_string();
    let mut with_identity_token = cred("127.0.0.1:1", "<token>", "");
    with_identity_token.identity_token = IDENTITY_TOKEN.to_string();
    let r = Resolver::new().unwrap();
    let err = r
        .resolve(
            &image(addr),
            &[&with_password, &with_registry_token, &with_identity_token],
        )
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Auth);

    // A Basic registry too: a wrong password there.
    let basic_addr = basic_registry().await;
    let basic_err = r
        .resolve(&image(basic_addr), &[&with_password])
        .await
        .unwrap_err();
    assert_eq!(basic_err.class(), FailureClass::Auth);

    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    let outputs = [
        err.to_string(),
        format!("{err:?}"),
        basic_err.to_string(),
        format!("{basic_err:?}"),
        format!("{r:?}"),
    ];
    for out in &outputs {
        for secret in [PASSWORD, TOKEN, REGISTRY_TOKEN, IDENTITY_TOKEN, &encoded] {
            assert!(!out.contains(secret), "{secret:?} leaked in {out:?}");
        }
    }
    assert!(outputs[0].contains("127.0.0.1/team"), "{}", outputs[0]);
}

#[tokio::test]
async fn connection_refused_is_network() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Network, "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[tokio::test]
async fn rate_limited_is_other_with_retry_after() {
    let addr = serve(|_| answer(StatusCode::TOO_MANY_REQUESTS, &[("Retry-After", "7")], "")).await;
    let err = Resolver::new()
        .unwrap()
        .resolve(&image(addr), &[])
        .await
        .unwrap_err();
    assert_eq!(err.class(), FailureClass::Other);
    let text = err.to_string();
    assert!(
        text.contains("rate limited (429)") && text.contains("Retry-After: 7"),
        "{text}"
    );
}

#[tokio::test]
async fn redirects_are_followed_up_to_five() {
    let addr = serve(|s| match s.path.as_str() {
        MANIFEST_PATH => answer(
            StatusCode::TEMPORARY_REDIRECT,
            &[("Location", "/moved")],
            "",
        ),
        "/moved" => found(),
        _ => answer(StatusCode::FOUND, &[("Location", "/loop?sig=secret")], ""),
    })
    .await;
    let r = Resolver::new().unwrap();
    assert_eq!(r.resolve(&image(addr), &[]).await.unwrap(), DIGEST);

    let looping = ImageRef::parse(&format!("127.0.0.1:{}/other:v1", addr.port())).unwrap();
    let err = r.resolve(&looping, &[]).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("more than 5 redirects"), "{text}");
    assert!(!text.contains("sig=secret"), "{text}");
}

#[test]
fn urls_follow_the_registry() {
    let r = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let resolver = r.block_on(async { Resolver::new().unwrap() });
    let cases = [
        (
            "alpine",
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest",
        ),
        ("quay.io/a/b:1", "https://quay.io/v2/a/b/manifests/1"),
        (
            "localhost:5000/a:1",
            "http://localhost:5000/v2/a/manifests/1",
        ),
        (
            "127.0.0.1:5000/a:1",
            "http://127.0.0.1:5000/v2/a/manifests/1",
        ),
        ("[::1]:5000/a:1", "http://[::1]:5000/v2/a/manifests/1"),
    ];
    for (input, want) in cases {
        let image = ImageRef::parse(input).unwrap();
        let target = resolver.target(&image).unwrap();
        assert_eq!(target.manifest.to_string(), want, "{input}");
    }
}

#[test]
fn challenges_parse() {
    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    assert_eq!(
        parse_challenges([&v(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
        )]),
        Some(Challenge::Bearer {
            realm: "https://auth.docker.io/token".to_string(),
            service: Some("registry.docker.io".to_string()),
            scope: Some("repository:library/alpine:pull".to_string()),
        })
    );
    assert_eq!(
        parse_challenges([&v(r#"Basic realm="Registry Realm""#)]),
        Some(Challenge::Basic)
    );
    // Bearer preferred whichever header comes first; unquoted values and escapes.
    assert_eq!(
        parse_challenges([
            &v("Basic"),
            &v(r#"bearer realm=https://a/t, service="s\"x""#)
        ]),
        Some(Challenge::Bearer {
            realm: "https://a/t".to_string(),
            service: Some("s\"x".to_string()),
            scope: None,
        })
    );
    assert_eq!(parse_challenges([&v("Negotiate abc")]), None);
}

#[test]
fn digests_are_validated() {
    assert!(valid_digest(DIGEST));
    assert!(valid_digest(&format!("sha512:{}", "a".repeat(128))));
    assert!(!valid_digest(&DIGEST.to_uppercase()));
    assert!(!valid_digest("sha256:abc"));
    assert!(!valid_digest("md5:0123456789abcdef0123456789abcdef"));
}

#[test]
fn the_token_cache_is_bounded_and_drops_the_oldest() {
    let mut cache = TokenCache::default();
    let key = |i: usize| TokenKey {
        registry: "r".to_string(),
        scope: format!("repository:{i}:pull"),
        identity: [0; 32],
    };
    for i in 0..=TOKEN_CACHE_ENTRIES {
        cache.insert(
            key(i),
            Zeroizing::new(format!("t{i}")),
            Duration::from_secs(300),
        );
    }
    assert_eq!(cache.len(), TOKEN_CACHE_ENTRIES);
    assert!(cache.get(&key(0)).is_none(), "the oldest went");
    assert_eq!(
        cache.get(&key(1)).as_deref().map(|s| s.as_str()),
        Some("t1")
    );
    assert_eq!(
        cache
            .get(&key(TOKEN_CACHE_ENTRIES))
            .as_deref()
            .map(|s| s.as_str()),
        Some("t1000")
    );
}

#[test]
fn loopback_hosts() {
    for h in [
        "127.0.0.1",
        "127.0.0.1:5000",
        "localhost",
        "LOCALHOST:1",
        "[::1]:5000",
        "[::1]",
    ] {
        assert!(is_loopback(h), "{h}");
    }
    for h in [
        "quay.io",
        "10.0.0.1:5000",
        "localhost.example.com",
        "[fe80::1]:5000",
    ] {
        assert!(!is_loopback(h), "{h}");
    }
}

#[test]
fn the_system_s_roots_are_trusted_and_mozilla_s_built_in_ones_only_where_it_has_none() {
    use rustls::pki_types::CertificateDer;
    // A self-signed CA (tests/fixtures/tls/test-ca.der) stands for a system bundle of one.
    let ca = CertificateDer::from(include_bytes!("../../tests/fixtures/tls/test-ca.der").to_vec());
    let (roots, trust) = trust_roots(vec![ca.clone()]);
    assert_eq!(trust, Trust::System(1));
    assert_eq!(roots.len(), 1, "the system's roots alone, none added");
    // No system roots (the agent's own image): the built-in ones, the whole bundle.
    let (roots, trust) = trust_roots(Vec::new());
    assert_eq!(trust, Trust::Bundled(webpki_roots::TLS_SERVER_ROOTS.len()));
    assert!(roots.len() > 100, "{}", roots.len());
    // Only unparsable files there: as good as none.
    let (_, trust) = trust_roots(vec![CertificateDer::from(b"not a certificate".to_vec())]);
    assert!(matches!(trust, Trust::Bundled(_)), "{trust:?}");
    // A broken file beside a good one does not discard the good one.
    let (_, trust) = trust_roots(vec![CertificateDer::from(b"junk".to_vec()), ca]);
    assert_eq!(trust, Trust::System(1));
}

/// The agent's own image has no CA bundle: building the resolver must not fail there (it did, and the
/// DaemonSet's pod crash-looped at start-up).
#[test]
fn the_resolver_builds_without_any_system_roots() {
    assert!(Resolver::trusting(Vec::new(), 0).is_ok());
    assert!(Resolver::new().is_ok(), "with whatever this machine has");
}
