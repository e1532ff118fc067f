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
}

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
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
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
            .version(())
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
