//! Thin adapters over containerd: CRI's image service (pull, status) from our own `proto/` subset, and
//! containerd's native images and content services from `containerd-client`. Both share one tonic channel
//! over the unix socket. containerd quirks (error classification, namespaces, label semantics) live here.

pub mod containers;
pub mod content;
pub mod cri;
pub mod errors;
pub mod events;
pub mod images;
pub mod progress;
pub mod snapshots;

use std::path::{Path, PathBuf};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use tonic::transport::{Channel, Endpoint};

use cri::image_service_client::ImageServiceClient;

/// A containerd connection scoped to one namespace.
#[derive(Clone)]
pub struct Runtime {
    channel: Channel,
    socket: PathBuf,
    namespace: String,
    call_timeout: std::time::Duration,
}

/// How long a unary call to containerd may take (a busy containerd answers ImageStatus in milliseconds;
/// a pull is not a unary call in this sense and has its own stall detection).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Runtime {
    /// Connects lazily: nothing is dialled until the first call, and a broken connection is re-dialled on
    /// the next call, so the agent rides out containerd restarts.
    pub fn new(socket: &Path, namespace: &str) -> Self {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://[::]:50051")
            .connect_with_connector_lazy(tower_service(path));
        Self {
            channel,
            socket: socket.to_path_buf(),
            namespace: namespace.to_string(),
            call_timeout: CALL_TIMEOUT,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A unary request with the `containerd-namespace` header and the call deadline.
    pub(crate) fn unary<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = self.request(msg);
        req.set_timeout(self.call_timeout);
        req
    }

    /// A unary request (CRI: no namespace header) with the call deadline. A containerd that accepts the
    /// connection but never answers (a stuck lock, a frozen cgroup) would otherwise hold the caller for
    /// ever; tonic enforces `grpc-timeout` on the client side, and the error counts as unreachable.
    /// Pulls and streams (events, blob reads) have none: they run as long as they progress.
    pub(crate) fn timed<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(self.call_timeout);
        req
    }

    /// Sets the deadline of unary calls (default `CALL_TIMEOUT`).
    pub fn with_call_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// A request carrying the `containerd-namespace` header.
    pub(crate) fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.namespace.parse() {
            req.metadata_mut().insert("containerd-namespace", v);
        }
        req
    }

    pub(crate) fn cri_images(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel.clone())
    }

    pub(crate) fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone())
    }

    pub(crate) fn content(&self) -> ContentClient<Channel> {
        ContentClient::new(self.channel.clone())
    }

    /// containerd's version string; the cheapest call that proves the socket answers.
    pub async fn version(&self) -> Result<String, errors::RuntimeError> {
        let resp = VersionClient::new(self.channel.clone())
            .version(self.timed(()))
            .await
            .map_err(|s| errors::RuntimeError::call("Version", &self.socket, s))?;
        Ok(resp.into_inner().version)
    }
}

fn tower_service(
    path: PathBuf,
) -> impl tower::Service<
    http::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_: http::Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    })
}

#[cfg(test)]
mod deadline_tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A containerd that accepts connections and never says a word.
    async fn mute_socket(dir: &Path) -> PathBuf {
        let path = dir.join("mute.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        path
    }

    #[tokio::test]
    async fn a_containerd_that_never_answers_is_unreachable_after_the_call_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let sock = mute_socket(dir.path()).await;
        let rt = Runtime::new(&sock, "k8s.io").with_call_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), rt.image_status("r.io/a:v1"))
            .await
            .expect("the call's own deadline ends it")
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(e.is_unreachable(), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("ImageStatus") && text.contains("deadline"),
            "{text}"
        );
        let e = rt.owned_pins().await.unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(rt.version().await.unwrap_err().is_unreachable());
    }

    #[test]
    fn only_an_absent_containerd_gets_the_socket_advice() {
        let s = Path::new("/run/c.sock");
        let gone = errors::RuntimeError::call("Version", s, tonic::Status::unavailable("refused"));
        assert!(gone
            .to_string()
            .ends_with("is containerd running and is the socket path right?"));
        let answered =
            errors::RuntimeError::call("images.Get", s, tonic::Status::not_found("no image"));
        assert!(!answered.to_string().contains("socket path"), "{answered}");
        assert!(!answered.is_unreachable());
    }
}
