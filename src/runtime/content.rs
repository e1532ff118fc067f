//! Reading blobs from containerd's content store: whole (manifests, configs) or as a byte stream
//! (layers, never buffered whole).

use containerd_client::services::v1::{InfoRequest, ReadContentRequest};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_stream::StreamExt;
use tokio_util::io::StreamReader;

use super::errors::RuntimeError;
use super::Runtime;

impl Runtime {
    /// A blob as a byte stream.
    pub async fn blob_reader(
        &self,
        digest: &str,
    ) -> Result<impl AsyncRead + Send + Unpin + 'static, RuntimeError> {
        let stream = self
            .content()
            .read(self.request(ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            }))
            .await
            .map_err(|s| RuntimeError::call("content.Read", self.socket(), s))?
            .into_inner()
            .map(|r| {
                r.map(|chunk| bytes::Bytes::from(chunk.data))
                    .map_err(|s| std::io::Error::other(format!("content.Read: {}", s.message())))
            });
        Ok(StreamReader::new(stream))
    }

    /// Whether the content store holds the blob.
    pub async fn blob_exists(&self, digest: &str) -> Result<bool, RuntimeError> {
        Ok(self.blob_labels(digest).await?.is_some())
    }

    /// The blob's labels, `None` when the content store does not hold it.
    pub async fn blob_labels(
        &self,
        digest: &str,
    ) -> Result<Option<std::collections::HashMap<String, String>>, RuntimeError> {
        match self
            .content()
            .info(self.unary(InfoRequest {
                digest: digest.to_string(),
            }))
            .await
        {
            Ok(r) => Ok(Some(
                r.into_inner().info.map(|i| i.labels).unwrap_or_default(),
            )),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(RuntimeError::call("content.Info", self.socket(), s)),
        }
    }

    /// A small blob read whole; refuses blobs over `max` bytes (manifests and configs are small).
    pub async fn read_blob(&self, digest: &str, max: usize) -> Result<Vec<u8>, RuntimeError> {
        let mut out = Vec::new();
        self.blob_reader(digest)
            .await?
            .take(max as u64 + 1)
            .read_to_end(&mut out)
            .await
            .map_err(|e| RuntimeError::Data {
                call: "content.Read",
                message: format!("blob {digest}: {e}"),
            })?;
        if out.len() > max {
            return Err(RuntimeError::Data {
                call: "content.Read",
                message: format!(
                    "blob {digest} is larger than {max} bytes; not a manifest or config"
                ),
            });
        }
        Ok(out)
    }
}
