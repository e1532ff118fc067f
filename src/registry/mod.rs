//! Tag resolution: which manifest digest a tag names now, asked of the registry (OCI distribution API)
//! with one `HEAD` and without pulling anything. The reporter resolves every desired tag once per cluster,
//! so 5,000 nodes don't each ask the registry.
//!
//! Authentication is the distribution flow: an unauthenticated request learns the challenge
//! (`WWW-Authenticate: Basic` or `Bearer realm=…,service=…,scope=…`), then each matching credential is
//! tried in turn, most specific first, then anonymously — what kubelet and containerd do. Bearer tokens are
//! cached per (registry, scope, credential) until they expire, so a resync of 1,000 tags on one registry
//! costs one token request per repository and credential, and a cached token skips the unauthenticated
//! probe altogether. A registry that asked for Basic is remembered too, so its next tags are asked with
//! the credential at once: one request a tag instead of two.
//!
//! Secrets never leave this module in words: errors carry credential keys, statuses and URLs without their
//! query (a redirect may be a signed URL), never a body the registry or token server sent (either may echo
//! what we sent), never serde's message (it may quote the offending value), and `Resolver`'s `Debug` shows
//! only counters. Authorization values are marked sensitive so hyper keeps them out of its own output.
//!
//! Everything read is bounded: headers by hyper, a manifest body (only read when the registry gives no
//! `Docker-Content-Digest`) to 4 MiB, a token answer to 64 KiB; every request, body included, to 30 s.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::credentials::Credential;
use crate::model::FailureClass;
use crate::reference::ImageRef;

#[cfg(test)]
mod tests;

/// Index types first: a multi-platform tag must resolve to its index, the digest every node's pull names.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json";
/// One request, its body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Shorter than the request timeout so an unreachable registry says "connect" rather than "timed out".
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_REDIRECTS: usize = 5;
/// Registries' logs tell the reporter's requests from containerd's.
const USER_AGENT: &str = concat!("runner-warden/", env!("CARGO_PKG_VERSION"));
const MAX_MANIFEST_BYTES: usize = 4 << 20;
const MAX_TOKEN_BYTES: usize = 64 << 10;
const TOKEN_CACHE_ENTRIES: usize = 1_000;
/// The distribution token spec's default when the answer has no `expires_in`.
const DEFAULT_TOKEN_SECONDS: u64 = 60;
/// A token is dropped this much before it expires, so it does not expire between the check and its use.
const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(5);
/// Longest `Retry-After` value repeated in a message (it is the registry's text).
const MAX_RETRY_AFTER_CHARS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot set up TLS for registries: {0}")]
    Tls(String),
    #[error("{image}: the registry has no such manifest (404 from {url})")]
    NotFound { image: String, url: String },
    /// `tried` holds credential keys only (the keys are not secret).
    #[error(
        "{image}: the registry refused {} (last answer {status})",
        describe_tried(tried)
    )]
    Auth {
        image: String,
        tried: Vec<String>,
        status: u16,
    },
    #[error("{image}: rate limited (429) by {host}{}", retry_after.as_deref().map(|r| format!(", Retry-After: {r}")).unwrap_or_default())]
    RateLimited {
        image: String,
        host: String,
        retry_after: Option<String>,
    },
    #[error("{image}: cannot reach {url}: {reason}")]
    Network {
        image: String,
        url: String,
        reason: String,
    },
    #[error("{image}: no answer from {url} within {}s", REQUEST_TIMEOUT.as_secs())]
    Timeout { image: String, url: String },
    #[error("{image}: {url} answered {status}")]
    Status {
        image: String,
        url: String,
        status: u16,
    },
    #[error("{image}: {problem}")]
    Protocol { image: String, problem: String },
}

impl ResolveError {
    pub fn class(&self) -> FailureClass {
        match self {
            ResolveError::NotFound { .. } => FailureClass::NotFound,
            ResolveError::Auth { .. } => FailureClass::Auth,
            ResolveError::Network { .. } | ResolveError::Timeout { .. } => FailureClass::Network,
            ResolveError::Tls(_)
            | ResolveError::RateLimited { .. }
            | ResolveError::Status { .. }
            | ResolveError::Protocol { .. } => FailureClass::Other,
        }
    }
}

fn describe_tried(keys: &[String]) -> String {
    if keys.is_empty() {
        return "anonymous access".to_string();
    }
    let list: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
    format!(
        "the credentials for {} and anonymous access",
        list.join(", ")
    )
}

type Body = Full<Bytes>;

/// Asks registries which digest a tag names; one per process, shared (it pools connections and caches
/// tokens).
pub struct Resolver {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    tokens: Mutex<TokenCache>,
    /// Registries whose last challenge was Basic (bounded by `MAX_BASIC_REGISTRIES`).
    basic: Mutex<HashSet<String>>,
    requests: AtomicU64,
    /// Salts the credential fingerprints in the token cache's keys: a fingerprint is a hash of secrets,
    /// and an unsalted one of a weak password could be brute-forced from a heap dump.
    salt: [u8; 32],
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolver")
            .field("requests", &self.requests())
            .field("cached_tokens", &self.tokens_cached())
            .finish_non_exhaustive()
    }
}

/// One resolution's fixed facts.
struct Target<'a> {
    image: &'a ImageRef,
    manifest: Uri,
    /// Scope asked for when the challenge names none (and the key a cached token is looked up under
    /// before any challenge is seen).
    default_scope: String,
}

impl Target<'_> {
    fn name(&self) -> String {
        self.image.as_str().to_string()
    }

    fn protocol(&self, problem: impl Into<String>) -> ResolveError {
        ResolveError::Protocol {
            image: self.name(),
            problem: problem.into(),
        }
    }
}

/// Registries remembered as asking for Basic.
const MAX_BASIC_REGISTRIES: usize = 256;

/// How one pass over the identities ended, when it found no digest.
enum Attempt {
    Failed(ResolveError),
    /// The registry remembered as asking for Basic now asks for something else: start over.
    ChallengeChanged,
}

impl From<ResolveError> for Attempt {
    fn from(e: ResolveError) -> Attempt {
        Attempt::Failed(e)
    }
}

/// A 401 under a remembered Basic challenge that asks for something other than Basic.
fn changed(challenge: Option<&Challenge>) -> bool {
    matches!(challenge, Some(c) if *c != Challenge::Basic)
}

/// What the registry said to one manifest request.
enum Answer {
    Digest(String),
    /// 401; the challenge when it sent one we understand.
    Unauthorized(Option<Challenge>),
    Forbidden,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Where the resolver's trust comes from, and how many roots.
#[derive(Debug, PartialEq, Eq)]
enum Trust {
    System(usize),
    Bundled(usize),
}

/// The system's roots (as containerd on the node trusts them; `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), or
/// Mozilla's, built in, when the system has none usable: the agent's own image ships no CA bundle, and a
/// resolver that trusts nothing would fail every HTTPS registry.
fn trust_roots(
    system: Vec<rustls::pki_types::CertificateDer<'static>>,
) -> (rustls::RootCertStore, Trust) {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(system);
    if added > 0 {
        return (roots, Trust::System(added));
    }
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let n = roots.len();
    (roots, Trust::Bundled(n))
}

impl Resolver {
    pub fn new() -> Result<Resolver, ResolveError> {
        let native = rustls_native_certs::load_native_certs();
        Self::trusting(native.certs, native.errors.len())
    }

    /// `new` with the system's roots given (`unreadable`: files that failed to load, for the log).
    fn trusting(
        system: Vec<rustls::pki_types::CertificateDer<'static>>,
        unreadable: usize,
    ) -> Result<Resolver, ResolveError> {
        let mut http = HttpConnector::new();
        // The https connector wraps this one and needs it to accept https URIs.
        http.enforce_http(false);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let (roots, trust) = trust_roots(system);
        match trust {
            Trust::System(n) => {
                tracing::info!(roots = n, unreadable, "tag resolver: trusting the system's root certificates")
            }
            Trust::Bundled(n) => tracing::info!(
                roots = n,
                unreadable,
                "tag resolver: no system root certificates here (the agent's image has none), so it trusts Mozilla's roots built into it; for a registry with a private CA, mount the CA bundle and set SSL_CERT_FILE"
            ),
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ResolveError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(Resolver {
            client,
            tokens: Mutex::new(TokenCache::default()),
            basic: Mutex::new(HashSet::new()),
            requests: AtomicU64::new(0),
            salt: rand::random(),
        })
    }

    /// Requests sent so far (manifest HEAD/GET, redirects followed and token requests).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Bearer tokens held now (expired ones included until they are next looked at).
    pub fn tokens_cached(&self) -> usize {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The digest (`sha256:<hex>`) `image`'s tag names now. `creds`: the pull secret's credentials matching
    /// the image, most specific first; each is tried, then anonymously, like kubelet/containerd do.
    pub async fn resolve(
        &self,
        image: &ImageRef,
        creds: &[&Credential],
    ) -> Result<String, ResolveError> {
        if let Some(d) = image.digest() {
            return Ok(d.to_string());
        }
        let target = self.target(image)?;
        if self.asked_basic(image.registry()) {
            match self
                .resolve_as(&target, creds, Some(Challenge::Basic))
                .await
            {
                Err(Attempt::ChallengeChanged) => self.remember_basic(image.registry(), false),
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(d) => return Ok(d),
            }
        }
        match self.resolve_as(&target, creds, None).await {
            Ok(d) => Ok(d),
            Err(Attempt::Failed(e)) => Err(e),
            // Only a remembered challenge can turn out stale.
            Err(Attempt::ChallengeChanged) => {
                Err(target.protocol("the registry changed its challenge"))
            }
        }
    }

    /// One pass over the identities. `known`: the challenge this registry sent before (skips the
    /// unauthenticated probe; `ChallengeChanged` when the registry now asks for something else).
    async fn resolve_as(
        &self,
        target: &Target<'_>,
        creds: &[&Credential],
        known: Option<Challenge>,
    ) -> Result<String, Attempt> {
        let image = target.image;
        let remembered = known.is_some();
        let tried: Vec<String> = creds.iter().map(|c| c.key.clone()).collect();
        let mut challenge: Option<Challenge> = known;
        let mut anonymous_refused = false;
        let mut last_status = StatusCode::UNAUTHORIZED;

        let identities = creds.iter().map(|c| Some(*c)).chain(std::iter::once(None));
        for identity in identities {
            let fingerprint = self.fingerprint(identity);

            // A token from an earlier resolution skips the probe and the token request.
            let scope = challenge_scope(challenge.as_ref(), &target.default_scope);
            if let Some(token) = self.cached_token(image.registry(), &scope, &fingerprint) {
                match self.manifest(target, Some(bearer(target, &token)?)).await? {
                    Answer::Digest(d) => return Ok(d),
                    Answer::Unauthorized(ch) => {
                        // Revoked or narrower than needed: ask for a fresh one below.
                        self.forget_token(image.registry(), &scope, &fingerprint);
                        if ch.is_some() {
                            challenge = ch;
                        }
                    }
                    Answer::Forbidden => {
                        // This identity may not read the repository; a fresh token would say the same.
                        self.forget_token(image.registry(), &scope, &fingerprint);
                        last_status = StatusCode::FORBIDDEN;
                        continue;
                    }
                }
            }

            if challenge.is_none() {
                match self.manifest(target, None).await? {
                    // Anonymous access suffices; a credential would name the same digest.
                    Answer::Digest(d) => return Ok(d),
                    Answer::Unauthorized(ch) => {
                        anonymous_refused = true;
                        // A 401 without a challenge we understand: Basic is the only thing left to try.
                        let ch = ch.unwrap_or(Challenge::Basic);
                        self.remember_basic(image.registry(), ch == Challenge::Basic);
                        challenge = Some(ch);
                    }
                    Answer::Forbidden => {
                        anonymous_refused = true;
                        last_status = StatusCode::FORBIDDEN;
                        challenge = Some(Challenge::Basic);
                    }
                }
            }
            let Some(current) = challenge.clone() else {
                continue;
            };

            let auth = match &current {
                Challenge::Basic => match identity.and_then(|c| basic_value(target, c)) {
                    Some(v) => v?,
                    // Anonymous under Basic is the unauthenticated request itself.
                    None if identity.is_none() && !anonymous_refused => {
                        anonymous_refused = true;
                        match self.manifest(target, None).await? {
                            Answer::Digest(d) => return Ok(d),
                            Answer::Unauthorized(ch) if remembered && changed(ch.as_ref()) => {
                                return Err(Attempt::ChallengeChanged)
                            }
                            Answer::Unauthorized(_) => last_status = StatusCode::UNAUTHORIZED,
                            Answer::Forbidden => last_status = StatusCode::FORBIDDEN,
                        }
                        continue;
                    }
                    None => continue,
                },
                Challenge::Bearer {
                    realm,
                    service,
                    scope,
                } => {
                    let scope = scope
                        .clone()
                        .unwrap_or_else(|| target.default_scope.clone());
                    match self
                        .token(
                            target,
                            realm,
                            service.as_deref(),
                            &scope,
                            identity,
                            &fingerprint,
                        )
                        .await?
                    {
                        Some(token) => bearer(target, &token)?,
                        None => {
                            last_status = StatusCode::UNAUTHORIZED;
                            continue;
                        }
                    }
                }
            };
            match self.manifest(target, Some(auth)).await? {
                Answer::Digest(d) => return Ok(d),
                Answer::Unauthorized(ch) if remembered && changed(ch.as_ref()) => {
                    return Err(Attempt::ChallengeChanged)
                }
                Answer::Unauthorized(_) => {
                    last_status = StatusCode::UNAUTHORIZED;
                    if let Challenge::Bearer { scope, .. } = &current {
                        let scope = scope.as_deref().unwrap_or(&target.default_scope);
                        self.forget_token(image.registry(), scope, &fingerprint);
                    }
                }
                Answer::Forbidden => last_status = StatusCode::FORBIDDEN,
            }
            if let Some(c) = identity {
                tracing::debug!(image = %image, key = %c.key, "registry refused a credential");
            }
        }
        Err(Attempt::Failed(ResolveError::Auth {
            image: target.name(),
            tried,
            status: last_status.as_u16(),
        }))
    }

    fn asked_basic(&self, registry: &str) -> bool {
        self.basic
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(registry)
    }

    fn remember_basic(&self, registry: &str, basic: bool) {
        let mut known = self.basic.lock().unwrap_or_else(|p| p.into_inner());
        if !basic {
            known.remove(registry);
            return;
        }
        // A cluster pulls from a handful of registries; past the bound, start over (costs one probe each).
        if known.len() >= MAX_BASIC_REGISTRIES && !known.contains(registry) {
            known.clear();
        }
        known.insert(registry.to_string());
    }

    fn target<'a>(&self, image: &'a ImageRef) -> Result<Target<'a>, ResolveError> {
        let registry = image.registry();
        let authority = if registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            registry
        };
        let scheme = if is_loopback(registry) {
            "http"
        } else {
            "https"
        };
        let tag = image.tag().unwrap_or("latest");
        let url = format!(
            "{scheme}://{authority}/v2/{}/manifests/{tag}",
            image.repository()
        );
        let manifest = url.parse::<Uri>().map_err(|_| ResolveError::Protocol {
            image: image.as_str().to_string(),
            problem: format!("cannot make a URL of {url:?}"),
        })?;
        Ok(Target {
            image,
            manifest,
            default_scope: format!("repository:{}:pull", image.repository()),
        })
    }

    /// HEAD the manifest; GET it when the registry names no digest. Follows redirects, sending the
    /// Authorization only to the registry itself (a redirect to a CDN must not receive it).
    async fn manifest(
        &self,
        target: &Target<'_>,
        auth: Option<HeaderValue>,
    ) -> Result<Answer, ResolveError> {
        match self
            .manifest_request(target, Method::HEAD, auth.as_ref())
            .await?
        {
            Ok((Some(digest), _)) => Ok(Answer::Digest(digest)),
            Ok((None, _)) => match self
                .manifest_request(target, Method::GET, auth.as_ref())
                .await?
            {
                Ok((_, body)) => Ok(Answer::Digest(format!(
                    "sha256:{}",
                    hex(&Sha256::digest(&body))
                ))),
                Err(answer) => Ok(answer),
            },
            Err(answer) => Ok(answer),
        }
    }

    /// `Ok(Ok((header digest, body)))` on success, `Ok(Err(answer))` for 401/403, `Err` for the rest.
    #[allow(clippy::type_complexity)]
    async fn manifest_request(
        &self,
        target: &Target<'_>,
        method: Method,
        auth: Option<&HeaderValue>,
    ) -> Result<Result<(Option<String>, Bytes), Answer>, ResolveError> {
        let origin = target.manifest.authority().cloned();
        let mut uri = target.manifest.clone();
        for _ in 0..=MAX_REDIRECTS {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(uri.clone())
                .header(header::USER_AGENT, USER_AGENT)
                .header(header::ACCEPT, ACCEPT_MANIFESTS);
            if let Some(a) = auth {
                if uri.authority() == origin.as_ref() && uri.scheme() == target.manifest.scheme() {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
            }
            let req = req
                .body(Body::default())
                .map_err(|_| target.protocol("cannot build the manifest request"))?;
            let limit = (method == Method::GET).then_some(MAX_MANIFEST_BYTES);
            let (parts, body) = self.send(target, req, limit).await?;
            let status = parts.status;
            if status.is_success() {
                let digest = match parts.headers.get("docker-content-digest") {
                    Some(v) => {
                        let d = v.to_str().ok().filter(|d| valid_digest(d)).ok_or_else(|| {
                            target.protocol(format!(
                                "{} sent an invalid Docker-Content-Digest (want sha256: or sha512: and lowercase hex)",
                                show_url(&uri)
                            ))
                        })?;
                        Some(d.to_string())
                    }
                    None => None,
                };
                return Ok(Ok((digest, body)));
            }
            if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
                uri = redirect_target(&uri, parts.headers.get(header::LOCATION)).ok_or_else(
                    || {
                        target.protocol(format!(
                            "{} answered {} without a usable Location",
                            show_url(&uri),
                            status.as_u16()
                        ))
                    },
                )?;
                continue;
            }
            return match status {
                StatusCode::UNAUTHORIZED => Ok(Err(Answer::Unauthorized(parse_challenges(
                    parts.headers.get_all(header::WWW_AUTHENTICATE),
                )))),
                StatusCode::FORBIDDEN => Ok(Err(Answer::Forbidden)),
                StatusCode::NOT_FOUND => Err(ResolveError::NotFound {
                    image: target.name(),
                    url: show_url(&uri),
                }),
                _ => Err(status_error(target, &uri, &parts)),
            };
        }
        Err(target.protocol(format!(
            "more than {MAX_REDIRECTS} redirects for {}",
            show_url(&target.manifest)
        )))
    }

    /// A bearer token for `identity`, from the cache or the token server; `None` when the token server
    /// refused the identity.
    async fn token(
        &self,
        target: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        identity: Option<&Credential>,
        fingerprint: &[u8; 32],
    ) -> Result<Option<Zeroizing<String>>, ResolveError> {
        // The pull secret's registrytoken is already a bearer token for this registry.
        if let Some(c) = identity.filter(|c| !c.registry_token.is_empty()) {
            return Ok(Some(Zeroizing::new(c.registry_token.clone())));
        }
        let registry = target.image.registry();
        if let Some(t) = self.cached_token(registry, scope, fingerprint) {
            return Ok(Some(t));
        }
        let realm_uri = realm
            .parse::<Uri>()
            .ok()
            .filter(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some())
            .ok_or_else(|| target.protocol(format!("the token realm {realm:?} is not a URL")))?;
        let has_secret = identity.is_some_and(|c| {
            !c.password.is_empty() || !c.identity_token.is_empty() || !c.username.is_empty()
        });
        if has_secret
            && realm_uri.scheme_str() == Some("http")
            && !is_loopback(realm_uri.authority().map(|a| a.as_str()).unwrap_or(""))
        {
            // A registry reached over https pointing at a plain-http realm would have the password cross
            // the network in clear text.
            return Err(target.protocol(format!(
                "the token realm {} is plain http; credentials are not sent over it",
                show_url(&realm_uri)
            )));
        }

        let mut params: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            params.push(("service", s));
        }
        params.push(("scope", scope));
        let req = match identity.filter(|c| !c.identity_token.is_empty()) {
            // OAuth2 refresh-token grant: the identity token goes in the body, never in a URL.
            Some(c) => {
                let mut form = params.clone();
                form.push(("grant_type", "refresh_token"));
                form.push(("client_id", "runner-warden"));
                form.push(("refresh_token", &c.identity_token));
                let body = Zeroizing::new(encode_form(&form));
                Request::builder()
                    .method(Method::POST)
                    .uri(realm_uri.clone())
                    .header(header::USER_AGENT, USER_AGENT)
                    .header(
                        header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded; charset=utf-8",
                    )
                    .body(Body::new(Bytes::from(body.as_bytes().to_vec())))
            }
            None => {
                let sep = if realm.contains('?') { '&' } else { '?' };
                let uri = format!("{realm}{sep}{}", encode_form(&params))
                    .parse::<Uri>()
                    .map_err(|_| target.protocol("cannot make a token URL from the challenge"))?;
                let mut req = Request::builder()
                    .method(Method::GET)
                    .uri(uri)
                    .header(header::USER_AGENT, USER_AGENT);
                if let Some(v) = identity.and_then(|c| basic_value(target, c)) {
                    req = req.header(header::AUTHORIZATION, v?);
                }
                req.body(Body::default())
            }
        }
        .map_err(|_| target.protocol("cannot build the token request"))?;
        let uri = req.uri().clone();
        let (parts, body) = self.send(target, req, Some(MAX_TOKEN_BYTES)).await?;
        match parts.status {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Ok(None),
            _ => return Err(status_error(target, &uri, &parts)),
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            // Position only: serde's message may quote the token.
            target.protocol(format!(
                "the token server {} sent no JSON token ({:?} at line {}, column {})",
                show_url(&uri),
                e.classify(),
                e.line(),
                e.column()
            ))
        })?;
        let token = Zeroizing::new(
            answer
                .token
                .filter(|t| !t.is_empty())
                .or(answer.access_token)
                .unwrap_or_default(),
        );
        if token.is_empty() {
            return Err(target.protocol(format!(
                "the token server {} answered without a token",
                show_url(&uri)
            )));
        }
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(DEFAULT_TOKEN_SECONDS));
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                TokenKey {
                    registry: registry.to_string(),
                    scope: scope.to_string(),
                    identity: *fingerprint,
                },
                token.clone(),
                lifetime,
            );
        Ok(Some(token))
    }

    /// Sends one request and reads its body (only for a success and when `limit` is given), all within
    /// the request timeout.
    async fn send(
        &self,
        target: &Target<'_>,
        req: Request<Body>,
        limit: Option<usize>,
    ) -> Result<(http::response::Parts, Bytes), ResolveError> {
        let url = show_url(req.uri());
        self.requests.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| ResolveError::Network {
                    image: target.name(),
                    url: url.clone(),
                    reason: error_chain(&e),
                })?;
            let (parts, body) = resp.into_parts();
            let bytes = match limit {
                Some(limit) if parts.status.is_success() => {
                    let too_large =
                        || target.protocol(format!("{url} sent more than {} KiB", limit / 1024));
                    let declared = parts
                        .headers
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok());
                    if declared.is_some_and(|n| n > limit as u64) {
                        return Err(too_large());
                    }
                    match Limited::new(body, limit).collect().await {
                        Ok(c) => c.to_bytes(),
                        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                            return Err(too_large())
                        }
                        Err(e) => {
                            return Err(ResolveError::Network {
                                image: target.name(),
                                url: url.clone(),
                                reason: error_chain(e.as_ref()),
                            })
                        }
                    }
                }
                _ => Bytes::new(),
            };
            Ok((parts, bytes))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ResolveError::Timeout {
                image: target.name(),
                url,
            }),
        }
    }

    fn fingerprint(&self, identity: Option<&Credential>) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        match identity {
            None => h.update(b"anonymous"),
            Some(c) => {
                // Length-prefixed so ("ab", "c") and ("a", "bc") differ. Two secrets with the same key but
                // different passwords (two projects' secrets for one registry) must never share a token.
                for part in [
                    &c.key,
                    &c.username,
                    &c.password,
                    &c.identity_token,
                    &c.registry_token,
                ] {
                    h.update((part.len() as u64).to_be_bytes());
                    h.update(part.as_bytes());
                }
            }
        }
        h.finalize().into()
    }

    fn cached_token(
        &self,
        registry: &str,
        scope: &str,
        identity: &[u8; 32],
    ) -> Option<Zeroizing<String>> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&TokenKey {
                registry: registry.to_string(),
                scope: scope.to_string(),
                identity: *identity,
            })
    }

    fn forget_token(&self, registry: &str, scope: &str, identity: &[u8; 32]) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&TokenKey {
                registry: registry.to_string(),
                scope: scope.to_string(),
                identity: *identity,
            });
    }
}

/// No `Debug`: it holds the token.
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct TokenKey {
    registry: String,
    scope: String,
    /// Salted hash of the credential (or of "anonymous"), never the credential itself.
    identity: [u8; 32],
}

struct CachedToken {
    token: Zeroizing<String>,
    expires: Instant,
    /// Insertion order: the oldest goes when the cache is full.
    seq: u64,
}

/// Bearer tokens, bounded: a reporter resolving tags across many projects' secrets must not grow without
/// limit.
#[derive(Default)]
struct TokenCache {
    entries: HashMap<TokenKey, CachedToken>,
    next_seq: u64,
}

impl TokenCache {
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn get(&mut self, key: &TokenKey) -> Option<Zeroizing<String>> {
        let entry = self.entries.get(key)?;
        if entry.expires <= Instant::now() {
            self.entries.remove(key);
            return None;
        }
        Some(entry.token.clone())
    }

    fn remove(&mut self, key: &TokenKey) {
        self.entries.remove(key);
    }

    fn insert(&mut self, key: TokenKey, token: Zeroizing<String>, lifetime: Duration) {
        let lifetime = if lifetime > TOKEN_EXPIRY_MARGIN * 2 {
            lifetime - TOKEN_EXPIRY_MARGIN
        } else {
            lifetime / 2
        };
        if lifetime.is_zero() {
            return;
        }
        if self.entries.len() >= TOKEN_CACHE_ENTRIES && !self.entries.contains_key(&key) {
            let now = Instant::now();
            self.entries.retain(|_, e| e.expires > now);
            if self.entries.len() >= TOKEN_CACHE_ENTRIES {
                if let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.seq)
                    .map(|(k, _)| k.clone())
                {
                    self.entries.remove(&oldest);
                }
            }
        }
        self.next_seq += 1;
        self.entries.insert(
            key,
            CachedToken {
                token,
                expires: Instant::now() + lifetime,
                seq: self.next_seq,
            },
        );
    }
}

fn challenge_scope(challenge: Option<&Challenge>, default: &str) -> String {
    match challenge {
        Some(Challenge::Bearer { scope: Some(s), .. }) => s.clone(),
        _ => default.to_string(),
    }
}

fn bearer(target: &Target<'_>, token: &str) -> Result<HeaderValue, ResolveError> {
    let mut v =
        HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| ResolveError::Protocol {
            image: target.name(),
            problem: "the bearer token is not a valid header value".to_string(),
        })?;
    v.set_sensitive(true);
    Ok(v)
}

/// Basic authorization for a credential with a username or password; `None` when it has neither.
fn basic_value(target: &Target<'_>, c: &Credential) -> Option<Result<HeaderValue, ResolveError>> {
    if c.username.is_empty() && c.password.is_empty() {
        return None;
    }
    let plain = Zeroizing::new(format!("{}:{}", c.username, c.password));
    let encoded =
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(plain.as_bytes()));
    Some(
        HeaderValue::try_from(format!("Basic {}", encoded.as_str()))
            .map(|mut v| {
                v.set_sensitive(true);
                v
            })
            .map_err(|_| ResolveError::Protocol {
                image: target.name(),
                problem: format!(
                    "the credential for {:?} does not make a valid header",
                    c.key
                ),
            }),
    )
}

fn is_loopback(host_port: &str) -> bool {
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Only digests `ImageRef` accepts: the resolved digest is pinned into a reference next.
fn valid_digest(d: &str) -> bool {
    let Some((algo, hex)) = d.split_once(':') else {
        return false;
    };
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == want && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `scheme://host/path`, without the query: a redirect target may be a signed URL.
fn show_url(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("http"),
        uri.authority().map(|a| a.as_str()).unwrap_or(""),
        uri.path()
    )
}

fn redirect_target(base: &Uri, location: Option<&HeaderValue>) -> Option<Uri> {
    let loc = location?.to_str().ok()?;
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.parse().ok();
    }
    if loc.starts_with('/') && !loc.starts_with("//") {
        return format!(
            "{}://{}{loc}",
            base.scheme_str()?,
            base.authority()?.as_str()
        )
        .parse()
        .ok();
    }
    None
}

fn status_error(target: &Target<'_>, uri: &Uri, parts: &http::response::Parts) -> ResolveError {
    if parts.status == StatusCode::TOO_MANY_REQUESTS {
        let retry_after = parts
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.chars().take(MAX_RETRY_AFTER_CHARS).collect::<String>());
        return ResolveError::RateLimited {
            image: target.name(),
            host: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            retry_after,
        };
    }
    ResolveError::Status {
        image: target.name(),
        url: show_url(uri),
        status: parts.status.as_u16(),
    }
}

/// The error and its causes: hyper's top level says only "client error (Connect)".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The challenges of every `WWW-Authenticate` header; Bearer preferred over Basic.
fn parse_challenges<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<Challenge> {
    let mut basic = false;
    for v in values {
        let Ok(text) = v.to_str() else { continue };
        let text = text.trim();
        let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            basic = true;
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let params = parse_params(rest);
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            if let Some(realm) = get("realm") {
                return Some(Challenge::Bearer {
                    realm,
                    service: get("service"),
                    scope: get("scope").filter(|s| !s.is_empty()),
                });
            }
        }
    }
    basic.then_some(Challenge::Basic)
}

/// `k="v", k2=v2` with backslash escapes inside quotes (RFC 7235 auth-params).
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' {
                break;
            }
            name.push(c);
            chars.next();
        }
        if name.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((name.trim().to_string(), value.trim().to_string()));
    }
    out
}

/// application/x-www-form-urlencoded (also the query of a token GET).
fn encode_form(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        percent_encode(k, &mut out);
        out.push('=');
        percent_encode(v, &mut out);
    }
    out
}

fn percent_encode(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

// The reporter shares one resolver across its tasks.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Arc<Resolver>>();
};
