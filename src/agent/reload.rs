//! Follows the config file: re-read when its content changes (polled) or on SIGHUP. The desired images
//! apply at once; every other changed section is named in one log line saying it needs a restart. A
//! broken edit is reported and the running configuration kept.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Overrides, Settings};
use crate::model::DesiredImage;
use crate::report::metrics::Metrics;

const CONFIG_POLL: Duration = Duration::from_secs(5);

/// Sections a running agent applies without a restart.
const LIVE: [&str; 1] = ["images"];

pub(super) async fn watch_config(
    path: PathBuf,
    overrides: Overrides,
    mut current: Settings,
    desired: watch::Sender<Vec<DesiredImage>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot install the SIGHUP handler; the config file is still polled");
            None
        }
    };
    let mut last_text = std::fs::read_to_string(&path).ok();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(CONFIG_POLL) => {}
            _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                info!("SIGHUP: re-reading {}", path.display());
                last_text = None;
            }
        }
        let text = std::fs::read_to_string(&path).ok();
        if text.is_some() && text == last_text {
            continue;
        }
        last_text = text;
        match Settings::load(Some(&path), &overrides, |k| std::env::var(k).ok()) {
            Ok(next) => {
                metrics
                    .config_reloads_total
                    .with_label_values(&["success"])
                    .inc();
                let changes = current.changes(&next);
                if changes.contains(&"images") {
                    info!(
                        images = next.images.len(),
                        "configuration reloaded; desired images changed"
                    );
                    desired.send_replace(next.images.clone());
                }
                let restart: Vec<&str> =
                    changes.into_iter().filter(|c| !LIVE.contains(c)).collect();
                if !restart.is_empty() {
                    warn!(
                        "configuration reloaded; changes to [{}] apply only after a restart",
                        restart.join("], [")
                    );
                }
                current = next;
            }
            Err(e) => {
                metrics
                    .config_reloads_total
                    .with_label_values(&["failed"])
                    .inc();
                error!("{e}\nkeeping the running configuration");
            }
        }
    }
}
