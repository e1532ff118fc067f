//! Where the node's desired runner images and runner pods come from. Standalone, the config file
//! (`config`); with a cluster, the API server (`kubernetes`), planned by the pure `desired`.

pub mod api_count;
pub mod desired;
pub mod kubernetes;
pub mod leader;
pub mod pull_slots;
pub mod resolved_tags;
pub mod retry;
pub mod session_images;

pub use retry::WATCH_BACKOFF_MAX;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::DesiredImage;

/// The file's images and the cluster's, one entry per image: an image both name gets the file's secret
/// and the cluster's secrets and projects.
pub fn merge(file: &[DesiredImage], cluster: &[DesiredImage]) -> Vec<DesiredImage> {
    let mut out: Vec<DesiredImage> = file.to_vec();
    for c in cluster {
        match out.iter_mut().find(|d| d.image == c.image) {
            Some(d) => {
                d.cluster_secrets.extend(c.cluster_secrets.iter().cloned());
                for p in &c.projects {
                    d.projects.add(p.clone());
                }
            }
            None => out.push(c.clone()),
        }
    }
    out
}

/// Keeps `out` equal to the merge of both inputs until `stop`.
pub async fn merge_desired(
    mut file: watch::Receiver<Vec<DesiredImage>>,
    mut cluster: watch::Receiver<Vec<DesiredImage>>,
    out: watch::Sender<Vec<DesiredImage>>,
    stop: CancellationToken,
) {
    loop {
        let merged = merge(&file.borrow_and_update(), &cluster.borrow_and_update());
        out.send_if_modified(|cur| {
            let changed = *cur != merged;
            *cur = merged;
            changed
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            r = file.changed() => if r.is_err() { return },
            r = cluster.changed() => if r.is_err() { return },
        }
    }
}
