//! `pull`'s progress on standard error: a live bar on a terminal, otherwise a plain line once size and
//! rate are known and every 10 s after (CI logs, `kubectl exec` without a tty).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::watch;

use runner_warden::prewarm::{progress_text, rate_text, PullProgressView};

const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Draws until the sender is dropped (the pull ended); then clears the bar.
pub async fn draw(mut rx: watch::Receiver<Option<PullProgressView>>) {
    let bar = std::io::stderr().is_terminal().then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    // The first plain line as soon as size and rate are known, then every PLAIN_EVERY.
    let mut last_line: Option<tokio::time::Instant> = None;
    while rx.changed().await.is_ok() {
        let Some(p) = rx.borrow_and_update().clone() else {
            continue;
        };
        match &bar {
            Some(b) => {
                b.set_message(p.image.to_string());
                b.set_length(p.total.max(p.done));
                b.set_position(p.done);
            }
            None if p.total > 0
                && p.rate.is_some()
                && last_line.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) =>
            {
                last_line = Some(tokio::time::Instant::now());
                eprintln!(
                    "pulling {}: {}, {}",
                    p.image,
                    progress_text(p.done, p.total),
                    rate_text(p.rate, p.eta)
                );
            }
            None => {}
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}
