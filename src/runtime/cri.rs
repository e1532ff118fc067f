//! CRI v1 image service, generated from `proto/runtime/v1/api.proto`, plus the calls the agent makes.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("runtime.v1");

use std::fmt;

use super::errors::RuntimeError;
use super::Runtime;
use crate::credentials::Credential;

/// Redacting Debug: the derived one would print passwords (build.rs skips it).
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("server_address", &self.server_address)
            .finish_non_exhaustive()
    }
}

/// The copy handed to CRI is wiped once the request is encoded and dropped, like the credential itself.
impl Drop for AuthConfig {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.password.zeroize();
        self.auth.zeroize();
        self.identity_token.zeroize();
        self.registry_token.zeroize();
    }
}

impl From<&Credential> for AuthConfig {
    fn from(c: &Credential) -> Self {
        AuthConfig {
            username: c.username.clone(),
            password: c.password.clone(),
            auth: String::new(),
            server_address: String::new(),
            identity_token: c.identity_token.clone(),
            registry_token: c.registry_token.clone(),
        }
    }
}

fn spec(image: &str) -> ImageSpec {
    ImageSpec {
        image: image.to_string(),
        annotations: Default::default(),
    }
}

impl Runtime {
    /// CRI's view of an image, or `None` when it is not present.
    pub async fn image_status(&self, image: &str) -> Result<Option<Image>, RuntimeError> {
        Ok(self.image_status_call(image, false).await?.image)
    }

    /// The image's configured STOPSIGNAL (empty when unset), from CRI's verbose image status.
    pub async fn image_stop_signal(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        let resp = self.image_status_call(image, true).await?;
        let Some(info) = resp.info.get("info") else {
            return Ok(None);
        };
        let v: serde_json::Value = serde_json::from_str(info).unwrap_or_default();
        Ok(v.pointer("/imageSpec/config").map(|c| {
            c.get("StopSignal")
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_string()
        }))
    }

    async fn image_status_call(
        &self,
        image: &str,
        verbose: bool,
    ) -> Result<ImageStatusResponse, RuntimeError> {
        Ok(self
            .cri_images()
            .image_status(self.timed(ImageStatusRequest {
                image: Some(spec(image)),
                verbose,
            }))
            .await
            .map_err(|s| RuntimeError::call("ImageStatus", self.socket(), s))?
            .into_inner())
    }

    /// Pulls through CRI exactly as kubelet does; returns the image id (`sha256:` of the config).
    /// The raw status is returned so the caller can classify and redact it.
    pub async fn pull_image(
        &self,
        image: &str,
        credential: Option<&Credential>,
    ) -> Result<String, tonic::Status> {
        let resp = self
            .cri_images()
            .pull_image(PullImageRequest {
                image: Some(spec(image)),
                auth: credential.map(AuthConfig::from),
            })
            .await?;
        Ok(resp.into_inner().image_ref)
    }
}
