//! Shared helpers for integration tests against the real test bed (`scripts/testbed up`).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{DeleteImageRequest, ListImagesRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub mod cluster;
pub mod fleet;
pub mod pods;
pub mod registry_front;

pub const BIN: &str = env!("CARGO_BIN_EXE_runner-warden");

/// Tests that run an agent take this: an agent reconciles pins node-wide, so two at once would fight.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// The running test bed, read from `$RW_TESTBED/env`.
pub struct Bed {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub registry: String,
    pub user: String,
    pub password: String,
    pub registry_config_template: PathBuf,
    /// The bed's `ctr`.
    pub ctr: PathBuf,
    /// containerd deletes layer blobs after unpacking (`RW_DISCARD_UNPACKED_LAYERS=true scripts/testbed up`).
    pub discard_unpacked_layers: bool,
    /// The bed's containerd: `1.7` (default), `2.1` or `1.6` (`RW_CONTAINERD=… scripts/testbed up`).
    pub containerd: String,
}

impl Bed {
    /// The registry's port (the bed's containerd also knows plain-HTTP hosts on 5001–5004, for proxies).
    pub fn registry_port(&self) -> u16 {
        self.registry
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("RW_REGISTRY is host:port")
    }

    pub fn get() -> Bed {
        let dir = PathBuf::from(
            std::env::var("RW_TESTBED").unwrap_or_else(|_| "/var/tmp/runner-warden-testbed".into()),
        );
        let text = std::fs::read_to_string(dir.join("env")).unwrap_or_else(|e| {
            panic!(
                "the test bed is not running ({}: {e}); start it with `scripts/testbed up` or run `scripts/test`",
                dir.join("env").display()
            )
        });
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let v = |k: &str| {
            vars.get(k)
                .unwrap_or_else(|| panic!("{k} missing from test bed env"))
                .to_string()
        };
        Bed {
            socket: v("RW_CONTAINERD_SOCKET").into(),
            registry: v("RW_REGISTRY"),
            user: v("RW_REGISTRY_USER"),
            password: v("RW_REGISTRY_PASSWORD"),
            registry_config_template: v("RW_REGISTRY_CONFIG_TEMPLATE").into(),
            ctr: PathBuf::from(v("RW_CONTAINERD_BIN")).join("ctr"),
            discard_unpacked_layers: vars.get("RW_DISCARD_UNPACKED_LAYERS") == Some(&"true"),
            containerd: vars.get("RW_CONTAINERD").unwrap_or(&"1.7").to_string(),
            dir,
        }
    }

    /// Pushes an image of random layers (`scripts/testbed push-random`, one per size in MiB) under
    /// `<prefix>-<nanos>:v1` and returns that repo:tag: content no other test shares (a pull another test
    /// cancelled leaves a 24 h lease holding what it fetched).
    pub fn push_fresh(&self, prefix: &str, mib: &[&str]) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let repo_tag = format!("{prefix}-{nanos}:v1");
        let pushed = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/testbed"))
            .arg("push-random")
            .arg(&repo_tag)
            .args(mib)
            .status()
            .expect("scripts/testbed push-random")
            .success();
        assert!(pushed, "push {repo_tag}");
        repo_tag
    }

    /// The bed registry's credential, as a pull secret would give it.
    pub fn credential(&self) -> runner_warden::credentials::Credential {
        runner_warden::credentials::Credential {
            key: self.registry.clone(),
            username: self.user.clone(),
            password: self.password.clone(),
            identity_token: String::new(),
            registry_token: String::new(),
        }
    }

    pub fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry)
    }

    /// Writes a .dockerconfigjson with one entry.
    pub fn secret(&self, dir: &Path, name: &str, key: &str, user: &str, password: &str) -> PathBuf {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let path = dir.join(name);
        std::fs::write(
            &path,
            serde_json::json!({"auths": {key: {"auth": auth}}}).to_string(),
        )
        .unwrap();
        path
    }

    pub fn good_secret(&self, dir: &Path) -> PathBuf {
        self.secret(
            dir,
            "good.json",
            &self.registry.clone(),
            &self.user,
            &self.password,
        )
    }

    pub async fn images(&self) -> ImagesClient<tonic::transport::Channel> {
        ImagesClient::new(
            containerd_client::connect(&self.socket)
                .await
                .expect("connect containerd"),
        )
    }

    /// Deletes every containerd image record of `host/repo` (any tag) and waits for content GC, so a test
    /// starts from an absent image.
    pub async fn remove_repo(&self, repo_with_host: &str) {
        let mut c = self.images().await;
        let list = c
            .list(ns(ListImagesRequest { filters: vec![] }))
            .await
            .unwrap()
            .into_inner()
            .images;
        let of_repo = |n: &str| {
            n.starts_with(&format!("{repo_with_host}:"))
                || n.starts_with(&format!("{repo_with_host}@"))
        };
        // CRI also keeps a `sha256:<id>` record with the same target; it must go too or the content stays.
        let targets: Vec<String> = list
            .iter()
            .filter(|i| of_repo(&i.name))
            .filter_map(|i| i.target.as_ref().map(|t| t.digest.clone()))
            .collect();
        for img in list {
            let shared = img
                .target
                .as_ref()
                .is_some_and(|t| targets.contains(&t.digest));
            if of_repo(&img.name) || shared {
                c.delete(ns(DeleteImageRequest {
                    name: img.name.clone(),
                    sync: true,
                    target: None,
                }))
                .await
                .expect("delete image record");
            }
        }
    }

    /// CRI's view of the image: (present, pinned).
    pub async fn cri_status(&self, image: &str) -> (bool, bool) {
        let rt = runner_warden::runtime::Runtime::new(&self.socket, "k8s.io");
        match rt.image_status(image).await.expect("CRI ImageStatus") {
            Some(i) => (true, i.pinned),
            None => (false, false),
        }
    }

    /// Starts a second registry over the same storage on `port` (killable by the test; killed on drop).
    pub fn start_registry(&self, port: u16) -> Registry {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "port {port} is already in use (a registry left over from an interrupted run?)"
        );
        let cfg = std::fs::read_to_string(&self.registry_config_template)
            .unwrap()
            .replace("@PORT@", &port.to_string());
        let path = self.dir.join(format!("registry/config-{port}.yml"));
        std::fs::write(&path, cfg).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry(child)
    }
}

pub struct Registry(pub Child);

impl Registry {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Points `repo_tag` in the bed's registry at the content of `source`.
pub fn retag(bed: &Bed, source: &str, repo_tag: &str) {
    let creds = format!("{}:{}", bed.user, bed.password);
    let status = Command::new("skopeo")
        .args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .args(["--src-creds", &creds, "--dest-creds", &creds])
        .arg(format!("docker://{}", bed.image(source)))
        .arg(format!("docker://{}", bed.image(repo_tag)))
        .status()
        .expect("run skopeo");
    assert!(status.success(), "skopeo copy {source} -> {repo_tag}");
}

pub fn ns<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("containerd-namespace", "k8s.io".parse().unwrap());
    r
}

/// Polls `f` until it yields `Some`, or panics after `limit` naming `what`.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    wait_explained(limit, what, f, String::new).await
}

/// `wait_for` whose timeout message ends with `context()` (e.g. a log tail).
pub async fn wait_explained<T, F, Fut>(
    limit: Duration,
    what: &str,
    mut f: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}{}", context());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a runner stand-in on `port` answers `GET /health` with 200.
pub async fn wait_healthy(port: u16) {
    wait_for(
        Duration::from_secs(20),
        &format!("GET /health on {port}"),
        || async move {
            http_get(port, "/health")
                .await
                .filter(|(code, _)| *code == 200)
        },
    )
    .await;
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `runner-warden run`.
pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
}

impl Agent {
    /// Starts the agent; `images` is the TOML of the [[images]] tables, `prewarm` extra [prewarm] keys.
    pub fn start(bed: &Bed, prewarm: &str, images: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(bed, dir, prewarm, images)
    }

    /// An agent with one private image and a secret for the image's registry host (e.g. a test proxy).
    pub fn with_image(bed: &Bed, prewarm: &str, image: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let host = image.split('/').next().unwrap();
        let secret = bed.secret(dir.path(), "secret.json", host, &bed.user, &bed.password);
        let images = format!(
            "[[images]]\nimage = \"{image}\"\npull_secret = \"{}\"\n",
            secret.display()
        );
        Self::start_in(bed, dir, prewarm, &images)
    }

    pub fn start_in(bed: &Bed, dir: tempfile::TempDir, prewarm: &str, images: &str) -> Agent {
        let port = free_port();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            Self::config_text(bed, port, dir.path(), prewarm, images),
        )
        .unwrap();
        let child = Command::new(BIN)
            .args(["--log-level", "runner_warden=debug,info", "run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .spawn()
            .expect("start agent");
        Agent {
            child,
            dir,
            config,
            port,
        }
    }

    pub fn config_text(bed: &Bed, port: u16, dir: &Path, prewarm: &str, images: &str) -> String {
        format!(
            "[containerd]\nsocket = \"{}\"\n[prewarm]\nbackoff_initial = \"200ms\"\nbackoff_max = \"2s\"\n{prewarm}\n[report]\nmetrics_address = \"127.0.0.1:{port}\"\nfindings = \"{}\"\n{images}\n",
            bed.socket.display(),
            dir.join("findings.jsonl").display()
        )
    }

    pub fn rewrite_images(&self, bed: &Bed, prewarm: &str, images: &str) {
        let text = Self::config_text(bed, self.port, self.dir.path(), prewarm, images);
        let tmp = self.dir.path().join("config.toml.new");
        std::fs::File::create(&tmp)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
        // SIGHUP makes the reload immediate instead of waiting for the poll.
        let _ = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status();
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn findings(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("findings.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("finding is JSON"))
            .collect()
    }

    pub fn findings_raw(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("findings.jsonl")).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path).await
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Like `wait_for`, but a timeout shows the end of the agent's log.
    pub async fn wait<T, F, Fut>(&self, limit: Duration, what: &str, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        wait_explained(limit, what, f, || self.log_tail()).await
    }

    /// The end of the agent's log, as a timeout's explanation.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!("; agent log tail:\n{}", tail.join("\n"))
    }

    /// Asserts that `check` stays true for all of `window` (polled every 100 ms): the bounded observation a
    /// "nothing more happens" property needs, failing at the first moment it breaks.
    pub async fn holds<F, Fut>(&self, window: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let end = tokio::time::Instant::now() + window;
        while tokio::time::Instant::now() < end {
            assert!(
                check().await,
                "{what} stopped holding; agent log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until a finding with `reason` about `image` exists.
    pub async fn wait_finding(
        &self,
        reason: &str,
        image: &str,
        limit: Duration,
    ) -> serde_json::Value {
        self.wait(limit, &format!("finding {reason} for {image}"), || async {
            self.findings()
                .into_iter()
                .find(|f| f["reason"] == reason && f["image"] == image)
        })
        .await
    }

    /// Waits until the metric series has a value satisfying `pred`.
    pub async fn wait_metric(
        &self,
        series: &str,
        limit: Duration,
        pred: impl Fn(f64) -> bool,
    ) -> f64 {
        self.wait(limit, &format!("metric {series}"), || async {
            metric(&self.metrics().await, series).filter(|v| pred(*v))
        })
        .await
    }

    /// Whether the agent process still runs (not exited, not a zombie).
    pub fn child_alive(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }

    /// SIGTERM and wait; returns (exit code, seconds taken).
    pub fn terminate(&mut self) -> (Option<i32>, f64) {
        let start = Instant::now();
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status.code(), start.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return (None, start.elapsed().as_secs_f64());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut buf))
        .await
        .ok()?
        .ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// The value of one series (`name{labels}` exactly as exposed) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Listens on 127.0.0.1:`port`. The previous test's proxy or front on this port is aborted when it
/// drops, but its socket closes only once that test's runtime has dropped the task: wait for the port,
/// with a bound.
pub async fn bind_loopback(port: u16) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => return l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("bind 127.0.0.1:{port}: {e}"),
        }
    }
}

/// A TCP proxy in front of a registry that can throttle and stall responses, for faults a real registry
/// cannot be made to produce on demand.
pub struct Proxy {
    pub stall: Arc<AtomicBool>,
    pub forwarded: Arc<AtomicU64>,
    /// A fault for every new connection: `FAULT_NONE`, `FAULT_500` or `FAULT_RESET`.
    pub fault: Arc<std::sync::atomic::AtomicU8>,
    task: tokio::task::JoinHandle<()>,
}

/// Forward to the registry.
pub const FAULT_NONE: u8 = 0;
/// Answer every request `500 Internal Server Error` (a registry whose storage is failing).
pub const FAULT_500: u8 = 1;
/// Reset every connection as soon as it is accepted (a load balancer dropping the backend).
pub const FAULT_RESET: u8 = 2;

impl Proxy {
    /// `rate`: bytes per second from upstream (0 = unlimited); while `stall` is set, a connection stops
    /// forwarding upstream bytes once it has sent `stall_after` of them (and keeps the socket open).
    pub async fn start(listen: u16, upstream: u16, rate: u64, stall_after: u64) -> Proxy {
        let listener = bind_loopback(listen).await;
        let stall = Arc::new(AtomicBool::new(false));
        let forwarded = Arc::new(AtomicU64::new(0));
        let fault = Arc::new(std::sync::atomic::AtomicU8::new(FAULT_NONE));
        let (st, fw, fa) = (stall.clone(), forwarded.clone(), fault.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                match fa.load(Ordering::Relaxed) {
                    FAULT_500 => {
                        tokio::spawn(async move {
                            let mut req = vec![0u8; 8192];
                            let _ = client.read(&mut req).await;
                            let _ = client
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                .await;
                        });
                        continue;
                    }
                    FAULT_RESET => {
                        // Linger 0: closing sends RST, not FIN.
                        let _ = socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO));
                        drop(client);
                        continue;
                    }
                    _ => {}
                }
                let (st, fw) = (st.clone(), fw.clone());
                tokio::spawn(async move {
                    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let to_up = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut cr, &mut uw).await;
                    });
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    let start = Instant::now();
                    loop {
                        if st.load(Ordering::Relaxed) && sent >= stall_after {
                            // Hold the connection open and silent until the client gives up.
                            let _ = to_up.await;
                            return;
                        }
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        sent += n as u64;
                        fw.fetch_add(n as u64, Ordering::Relaxed);
                        if rate > 0 {
                            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                            if let Some(wait) = due.checked_sub(start.elapsed()) {
                                tokio::time::sleep(wait).await;
                            }
                        }
                    }
                    to_up.abort();
                });
            }
        });
        Proxy {
            stall,
            forwarded,
            fault,
            task,
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
