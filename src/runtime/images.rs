//! Image pins through containerd's native image store.
//!
//! CRI reports an image as `pinned` (kubelet's GC then skips it) when one of its containerd image records
//! carries `io.cri-containerd.pinned=pinned` (containerd >= 1.7; 1.6 ignores the label). Next to the pin
//! the agent writes an owner label naming the desired image that caused it, so it only ever removes pins
//! it placed itself — never the sandbox image's, never someone else's — and can clean up after a restart.

use std::collections::BTreeMap;

use containerd_client::services::v1::{
    CreateImageRequest, GetImageRequest, ListImagesRequest, UpdateImageRequest,
};
use prost_types::FieldMask;

use super::errors::RuntimeError;
use super::Runtime;

pub const PIN_LABEL: &str = "io.cri-containerd.pinned";
pub const PIN_VALUE: &str = "pinned";
pub const OWNER_LABEL: &str = "runner-warden.ambient-code.io/pinned-for";
/// CRI lists only records carrying this label as images (its own pulls set it).
const CRI_MANAGED_LABEL: &str = "io.cri-containerd.image";
const CRI_MANAGED_VALUE: &str = "managed";

impl Runtime {
    /// Labels the record `name` as pinned on behalf of `owner`.
    pub async fn pin(&self, name: &str, owner: &str) -> Result<(), RuntimeError> {
        self.set_pin(name, Some(owner)).await
    }

    /// Removes the pin and owner labels from the record `name` (the image itself stays).
    pub async fn unpin(&self, name: &str) -> Result<(), RuntimeError> {
        self.set_pin(name, None).await
    }

    async fn set_pin(&self, name: &str, owner: Option<&str>) -> Result<(), RuntimeError> {
        let mut images = self.images();
        let got = images
            .get(self.unary(GetImageRequest {
                name: name.to_string(),
            }))
            .await;
        let mut image = match got {
            Ok(r) => r.into_inner().image.ok_or_else(|| RuntimeError::Data {
                call: "images.Get",
                message: format!("no image record in the answer for {name}"),
            })?,
            // Unpinning something already gone is done.
            Err(s) if s.code() == tonic::Code::NotFound && owner.is_none() => return Ok(()),
            Err(s) => return Err(RuntimeError::call("images.Get", self.socket(), s)),
        };
        match owner {
            Some(o) => {
                image.labels.insert(PIN_LABEL.into(), PIN_VALUE.into());
                image.labels.insert(OWNER_LABEL.into(), o.into());
            }
            None => {
                image.labels.remove(PIN_LABEL);
                image.labels.remove(OWNER_LABEL);
            }
        }
        // Naming a label in the mask while leaving it out of the image deletes it.
        let mask = FieldMask {
            paths: vec![
                format!("labels.{PIN_LABEL}"),
                format!("labels.{OWNER_LABEL}"),
            ],
        };
        images
            .update(self.unary(UpdateImageRequest {
                image: Some(image),
                update_mask: Some(mask),
                source_date_epoch: None,
            }))
            .await
            .map_err(|s| RuntimeError::call("images.Update", self.socket(), s))?;
        Ok(())
    }

    /// Points the record `name` (a tag, `repo:tag`) at the content of the record `source` (`repo@digest`,
    /// just pulled), creating it or moving it: how a node that pulled by the digest the cluster resolved
    /// gets the tag kubelet asks for without asking the registry again. CRI follows containerd's image
    /// events, so the tag is in its view at once (measured on 1.6, 1.7 and 2.1: docs/containerd-facts.md).
    pub async fn tag(&self, name: &str, source: &str) -> Result<(), RuntimeError> {
        let mut images = self.images();
        let src = images
            .get(self.unary(GetImageRequest {
                name: source.to_string(),
            }))
            .await
            .map_err(|s| RuntimeError::call("images.Get", self.socket(), s))?
            .into_inner()
            .image
            .ok_or_else(|| RuntimeError::Data {
                call: "images.Get",
                message: format!("no image record in the answer for {source}"),
            })?;
        let record = containerd_client::services::v1::Image {
            name: name.to_string(),
            labels: [(CRI_MANAGED_LABEL.to_string(), CRI_MANAGED_VALUE.to_string())].into(),
            target: src.target,
            created_at: None,
            updated_at: None,
        };
        match images
            .create(self.unary(CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            }))
            .await
        {
            Ok(_) => Ok(()),
            // The tag exists (the content it named before): move it, keeping its other labels (a pin).
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                let mask = FieldMask {
                    paths: vec!["target".into(), format!("labels.{CRI_MANAGED_LABEL}")],
                };
                images
                    .update(self.unary(UpdateImageRequest {
                        image: Some(record),
                        update_mask: Some(mask),
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(|s| RuntimeError::call("images.Update", self.socket(), s))?;
                Ok(())
            }
            Err(s) => Err(RuntimeError::call("images.Create", self.socket(), s)),
        }
    }

    /// Every record this agent pinned: name → the desired image it was pinned for.
    pub async fn owned_pins(&self) -> Result<BTreeMap<String, String>, RuntimeError> {
        let resp = self
            .images()
            .list(self.unary(ListImagesRequest {
                filters: vec![format!("labels.\"{OWNER_LABEL}\"")],
            }))
            .await
            .map_err(|s| RuntimeError::call("images.List", self.socket(), s))?;
        Ok(resp
            .into_inner()
            .images
            .into_iter()
            .filter_map(|i| {
                let owner = i.labels.get(OWNER_LABEL)?.clone();
                Some((i.name, owner))
            })
            .collect())
    }
}
