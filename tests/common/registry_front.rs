//! Registry fronts that speak the parts of the distribution protocol the bed's htpasswd registry cannot,
//! forwarding everything else to the bed's real registry (so the images are real):
//! - `TokenRegistry`: bearer-token auth (a token endpoint trades the pull secret for a token) and blob
//!   fetches redirected to URLs signed in their query, as registries backed by S3 or GCS do. For the
//!   redaction drill: containerd quotes the URLs it fetched (a redirect target included) and the agent
//!   must not repeat the token or the signature in any log, finding or metric.
//! - `CredentialFront`: basic auth with several users, each allowed only some repositories, recording
//!   which user resolved which tag — for the drill that proves every pull carried the right secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The token the front issues, and the signature it puts in every redirect: neither may be repeated.
pub const TOKEN: &str = "tok3n-9f8e7d6c5b4a39281706";
pub const SIGNATURE: &str = "s1gnature0a1b2c3d4e5f60718293a4b5c6d7e8f9";

pub struct TokenRegistry {
    /// While set, blob redirects point at a "CDN" port nobody listens on (the fetch fails with the
    /// signed URL in containerd's message); cleared, they point back at this front.
    pub cdn_down: Arc<AtomicBool>,
    /// Token requests that carried the pull secret's credentials.
    pub tokens_issued: Arc<AtomicU64>,
    /// Registry requests that carried the issued bearer token.
    pub bearer_requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct Shared {
    listen: u16,
    upstream: u16,
    dead_cdn: u16,
    /// `user:password` the token endpoint expects, and the front forwards with.
    basic: String,
    cdn_down: Arc<AtomicBool>,
    tokens_issued: Arc<AtomicU64>,
    bearer_requests: Arc<AtomicU64>,
}

impl TokenRegistry {
    /// Listens on `listen` (one of the bed's plain-HTTP proxy ports) in front of the registry on
    /// `upstream`, whose `user`/`password` are also the credentials the token endpoint accepts.
    pub async fn start(listen: u16, upstream: u16, user: &str, password: &str) -> TokenRegistry {
        let listener = super::bind_loopback(listen).await;
        let shared = Arc::new(Shared {
            listen,
            upstream,
            dead_cdn: super::free_port(),
            basic: base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")),
            cdn_down: Arc::new(AtomicBool::new(true)),
            tokens_issued: Arc::new(AtomicU64::new(0)),
            bearer_requests: Arc::new(AtomicU64::new(0)),
        });
        TokenRegistry {
            cdn_down: shared.cdn_down.clone(),
            tokens_issued: shared.tokens_issued.clone(),
            bearer_requests: shared.bearer_requests.clone(),
            task: tokio::spawn({
                let shared = shared.clone();
                async move {
                    while let Ok((client, _)) = listener.accept().await {
                        tokio::spawn(serve(client, shared.clone()));
                    }
                }
            }),
        }
    }
}

impl Drop for TokenRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request per connection (every answer says `Connection: close`).
async fn serve(mut client: TcpStream, s: Arc<Shared>) {
    let Some(req) = Request::read(&mut client).await else {
        return;
    };
    let (method, path, headers) = (req.method.as_str(), req.path.as_str(), &req.headers);
    let header = |name: &str| req.header(name);
    if path == "/token" {
        // Registries without the OAuth POST flow answer it 404; containerd then falls back to GET with
        // basic auth (as it does for GCR).
        if method != "GET" {
            return answer(&mut client, "404 Not Found", &[], "").await;
        }
        if header("Authorization") != Some(&format!("Basic {}", s.basic)) {
            return answer(&mut client, "401 Unauthorized", &[], "").await;
        }
        s.tokens_issued.fetch_add(1, Ordering::Relaxed);
        let body = format!("{{\"token\":\"{TOKEN}\",\"expires_in\":300}}");
        return answer(
            &mut client,
            "200 OK",
            &["Content-Type: application/json"],
            &body,
        )
        .await;
    }
    if let Some(upstream_path) = path.strip_prefix("/cdn") {
        // A signed URL: the signature is the authorisation, no header needed.
        return forward(client, s.upstream, &s.basic, method, upstream_path, headers).await;
    }
    if header("Authorization") != Some(&format!("Bearer {TOKEN}")) {
        let repo = req.repo_and_reference().map_or("", |(repo, _)| repo);
        let challenge = format!(
            "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{}/token\",service=\"bed-token\",scope=\"repository:{repo}:pull\"",
            s.listen
        );
        return answer(
            &mut client,
            "401 Unauthorized",
            &[&challenge, "Content-Type: application/json"],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        )
        .await;
    }
    s.bearer_requests.fetch_add(1, Ordering::Relaxed);
    if path.contains("/blobs/") && method == "GET" {
        let port = if s.cdn_down.load(Ordering::Relaxed) {
            s.dead_cdn
        } else {
            s.listen
        };
        let location = format!(
            "Location: http://127.0.0.1:{port}/cdn{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Expires=300&X-Amz-Signature={SIGNATURE}"
        );
        return answer(&mut client, "307 Temporary Redirect", &[&location], "").await;
    }
    forward(client, s.upstream, &s.basic, method, path, headers).await
}

/// A request's head (registry requests containerd sends have no body that matters here).
struct Request {
    method: String,
    /// Without the query.
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    async fn read(client: &mut TcpStream) -> Option<Request> {
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
            if head.len() > 64 * 1024 {
                return None;
            }
        }
        let text = String::from_utf8_lossy(&head).to_string();
        let mut lines = text.split("\r\n");
        let mut request = lines.next().unwrap_or_default().split(' ');
        let method = request.next().unwrap_or_default().to_string();
        let target = request.next().unwrap_or_default();
        let path = target
            .split_once('?')
            .map_or(target, |(p, _)| p)
            .to_string();
        let headers = lines
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        Some(Request {
            method,
            path,
            headers,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `repo` and the reference after `/manifests/` or `/blobs/`.
    fn repo_and_reference(&self) -> Option<(&str, &str)> {
        let p = self.path.strip_prefix("/v2/")?;
        p.rsplit_once("/manifests/").or(p.rsplit_once("/blobs/"))
    }
}

async fn answer(client: &mut TcpStream, status: &str, headers: &[&str], body: &str) {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let _ = client.write_all(out.as_bytes()).await;
}

/// The request to the real registry with the bed's basic credentials, its answer copied back verbatim.
async fn forward(
    mut client: TcpStream,
    upstream: u16,
    basic: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
) {
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return answer(&mut client, "502 Bad Gateway", &[], "").await;
    };
    let mut out = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Basic {}\r\nConnection: close\r\n",
        upstream, basic
    );
    for (k, v) in headers {
        if !["host", "authorization", "connection"].contains(&k.to_ascii_lowercase().as_str()) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    if up.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    let _ = tokio::io::copy(&mut up, &mut client).await;
    let _ = client.shutdown().await;
}

/// Basic auth for several users, each allowed only the repositories `allowed` says: a wrong or misplaced
/// credential is refused (and counted); a right one is forwarded with the bed's own.
pub struct CredentialFront {
    /// Every authorised tag resolution (a pull's first manifest request): `(repo, user)`.
    pub resolved: Arc<Mutex<Vec<(String, String)>>>,
    /// Requests that carried a credential this front refuses for that repository.
    pub refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

type Allowed = dyn Fn(&str, &str) -> bool + Send + Sync;

impl CredentialFront {
    /// `users`: user → password; `allowed(user, repo)`; forwards to `upstream` as `bed_user`.
    pub async fn start(
        listen: u16,
        upstream: u16,
        bed_user: &str,
        bed_password: &str,
        users: HashMap<String, String>,
        allowed: impl Fn(&str, &str) -> bool + Send + Sync + 'static,
    ) -> CredentialFront {
        let listener = super::bind_loopback(listen).await;
        let b64 =
            |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        let basic = Arc::new(b64(bed_user, bed_password));
        let by_header: Arc<HashMap<String, String>> = Arc::new(
            users
                .iter()
                .map(|(u, p)| (format!("Basic {}", b64(u, p)), u.clone()))
                .collect(),
        );
        let allowed: Arc<Allowed> = Arc::new(allowed);
        let resolved = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let (res, refd) = (resolved.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let (basic, by_header, allowed) =
                    (basic.clone(), by_header.clone(), allowed.clone());
                let (res, refd) = (res.clone(), refd.clone());
                tokio::spawn(async move {
                    let Some(req) = Request::read(&mut client).await else {
                        return;
                    };
                    let (repo, reference) = req.repo_and_reference().unwrap_or(("", ""));
                    let user = req.header("Authorization").and_then(|h| by_header.get(h));
                    match user {
                        Some(user) if allowed(user, repo) => {
                            if req.path.contains("/manifests/") && !reference.starts_with("sha256:")
                            {
                                res.lock().unwrap().push((repo.to_string(), user.clone()));
                            }
                            forward(
                                client,
                                upstream,
                                &basic,
                                &req.method,
                                &req.path,
                                &req.headers,
                            )
                            .await
                        }
                        found => {
                            // No credential yet is the normal first request of a pull; a wrong one is not.
                            if found.is_some() || req.header("Authorization").is_some() {
                                refd.fetch_add(1, Ordering::Relaxed);
                            }
                            answer(
                                &mut client,
                                "401 Unauthorized",
                                &["WWW-Authenticate: Basic realm=\"credential-front\""],
                                "",
                            )
                            .await
                        }
                    }
                });
            }
        });
        CredentialFront {
            resolved,
            refused,
            task,
        }
    }
}

impl Drop for CredentialFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One front per fleet node, each that node's own view of the bed's registry (`scripts/fleet registry I
/// via PORT`), throttled per connection so a pull takes seconds, and counting blob downloads by node and
/// digest: the registry side of the pull budget, which containerd's ingests alone cannot show (a
/// download fetched twice looks like one ingest).
pub struct BlobFronts {
    /// Node `i`'s front listens on `ports[i - 1]`.
    pub ports: Vec<u16>,
    state: Arc<Mutex<BlobState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default, Clone, Debug)]
pub struct BlobState {
    /// `GET /v2/…/blobs/<digest>` requests by (node, digest), node 1-based.
    pub gets: HashMap<(usize, String), u32>,
    /// Blob responses being sent right now, by node (index 0 unused).
    pub in_flight: Vec<u32>,
    /// Blob body bytes sent so far, by node (index 0 unused).
    pub bytes: Vec<u64>,
    /// Blob GETs with a `Range` header (a download resumed where an earlier one stopped), by node.
    pub ranged: Vec<u32>,
    /// The most nodes with a blob download in flight at one moment, and the most blob downloads.
    pub peak_nodes: usize,
    pub peak_blobs: u32,
}

impl BlobState {
    /// Nodes (1-based) with a blob download in flight now.
    pub fn downloading(&self) -> Vec<usize> {
        (1..self.in_flight.len())
            .filter(|&i| self.in_flight[i] > 0)
            .collect()
    }
}

/// Decrements the node's in-flight count however the download ends (finished, client gone, aborted).
struct InFlight(Arc<Mutex<BlobState>>, usize);

impl InFlight {
    fn start(state: &Arc<Mutex<BlobState>>, node: usize, digest: &str, ranged: bool) -> InFlight {
        let mut s = state.lock().unwrap();
        *s.gets.entry((node, digest.to_string())).or_default() += 1;
        s.ranged[node] += u32::from(ranged);
        s.in_flight[node] += 1;
        let nodes = s.downloading().len();
        let blobs = s.in_flight.iter().sum();
        s.peak_nodes = s.peak_nodes.max(nodes);
        s.peak_blobs = s.peak_blobs.max(blobs);
        InFlight(state.clone(), node)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.lock().unwrap().in_flight[self.1] -= 1;
    }
}

impl BlobFronts {
    /// `nodes` fronts on free loopback ports before the registry on `upstream`; `rate` bytes per second
    /// per blob download (0 = unlimited).
    pub async fn start(nodes: usize, upstream: u16, rate: u64) -> BlobFronts {
        let state = Arc::new(Mutex::new(BlobState {
            in_flight: vec![0; nodes + 1],
            bytes: vec![0; nodes + 1],
            ranged: vec![0; nodes + 1],
            ..BlobState::default()
        }));
        let (mut ports, mut tasks) = (Vec::new(), Vec::new());
        for node in 1..=nodes {
            let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
                .await
                .unwrap();
            ports.push(listener.local_addr().unwrap().port());
            let state = state.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(count_and_forward(
                        client,
                        upstream,
                        rate,
                        node,
                        state.clone(),
                    ));
                }
            }));
        }
        BlobFronts {
            ports,
            state,
            tasks,
        }
    }

    pub fn state(&self) -> BlobState {
        self.state.lock().unwrap().clone()
    }
}

impl Drop for BlobFronts {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// One request per connection (forwarded with `Connection: close`, so containerd opens a new one for
/// the next: every request is seen), its answer copied back — throttled if it is a blob.
async fn count_and_forward(
    mut client: TcpStream,
    upstream: u16,
    rate: u64,
    node: usize,
    state: Arc<Mutex<BlobState>>,
) {
    let Some(req) = Request::read(&mut client).await else {
        return;
    };
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return answer(&mut client, "502 Bad Gateway", &[], "").await;
    };
    // The credentials containerd sends go through as they are: the registry itself checks them.
    let mut out = format!(
        "{} {} HTTP/1.1\r\nHost: 127.0.0.1:{upstream}\r\nConnection: close\r\n",
        req.method, req.path
    );
    for (k, v) in &req.headers {
        if !["host", "connection"].contains(&k.to_ascii_lowercase().as_str()) {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    out.push_str("\r\n");
    if up.write_all(out.as_bytes()).await.is_err() {
        return;
    }
    let digest = req
        .repo_and_reference()
        .filter(|_| req.method == "GET" && req.path.contains("/blobs/"))
        .map(|(_, d)| d.to_string());
    let Some(digest) = digest else {
        let _ = tokio::io::copy(&mut up, &mut client).await;
        let _ = client.shutdown().await;
        return;
    };
    let _in_flight = InFlight::start(&state, node, &digest, req.header("Range").is_some());
    let (mut sent, start) = (0u64, std::time::Instant::now());
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match up.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if client.write_all(&buf[..n]).await.is_err() {
            break;
        }
        sent += n as u64;
        state.lock().unwrap().bytes[node] += n as u64;
        if rate > 0 {
            let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    let _ = client.shutdown().await;
}
