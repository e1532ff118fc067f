//! Where findings go: JSON lines (standard output or a file) and, with a cluster, the Events queue.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use super::events::EventQueue;
use super::findings::{Finding, Level, Regarding};
use super::metrics::Metrics;
use super::status::StatusBoard;
use crate::model::Projects;

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    #[serde(flatten)]
    finding: &'a Finding,
}

/// Where findings go. Cloneable; writes are serialised.
#[derive(Clone)]
pub struct FindingSink {
    out: Arc<Mutex<Box<dyn Write + Send>>>,
    metrics: Arc<Metrics>,
    events: Option<EventQueue>,
    board: Option<Arc<StatusBoard>>,
}

impl FindingSink {
    /// `-` is standard output; anything else a file opened for append.
    pub fn open(target: &str, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if target == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(target)?,
            )
        };
        Ok(Self {
            out: Arc::new(Mutex::new(out)),
            metrics,
            events: None,
            board: None,
        })
    }

    /// Also publish every finding as a Kubernetes Event.
    pub fn with_events(mut self, events: EventQueue) -> Self {
        self.events = Some(events);
        self
    }

    /// Also keep every finding for `status` (the last hour's).
    pub fn with_board(mut self, board: Arc<StatusBoard>) -> Self {
        self.board = Some(board);
        self
    }

    pub fn publish(&self, finding: &Finding) {
        if let Some(b) = &self.board {
            b.record(finding);
        }
        if let Some(ev) = &self.events {
            ev.push(finding);
        }
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            finding,
        };
        let mut text = serde_json::to_string(&line).expect("findings serialise");
        text.push('\n');
        let written = self
            .out
            .lock()
            .map_err(|_| std::io::Error::other("findings writer poisoned"))
            .and_then(|mut w| w.write_all(text.as_bytes()).and_then(|_| w.flush()));
        // With a cluster, events_total counts the API writes; the JSON lines are a log.
        let counted = self.events.is_none();
        match written {
            Ok(()) if !counted => {}
            Ok(()) => self
                .metrics
                .events_total
                .with_label_values(&["written"])
                .inc(),
            Err(e) => {
                self.metrics
                    .events_total
                    .with_label_values(&["failed"])
                    .inc();
                tracing::error!(reason = finding.reason, error = %e, "could not write finding");
            }
        }
    }
}

/// Projects told, per node, that a shared image is prewarmed.
pub const NORMAL_FANOUT: usize = 10;

impl FindingSink {
    /// A finding about `image` goes to every further project that wants it — warnings to all of them,
    /// Normal news to at most `NORMAL_FANOUT` in all (an image shared by thousands of projects would
    /// otherwise cost every node thousands of Events per image change).
    pub fn publish_to_projects(&self, f: Finding, image: &str, other_projects: &[String]) {
        self.fan_out(image, other_projects, f.clone(), |_| f.clone());
    }

    /// `finding(project)` for every project of `projects` (or once for none, when there are none), each
    /// regarding its own project: a finding whose text differs per project (each names only that
    /// project's own secrets). The same fan-out as `publish_to_projects`.
    pub fn publish_per_project(
        &self,
        image: &str,
        projects: &Projects,
        finding: impl Fn(Option<&str>) -> Finding,
    ) {
        self.fan_out(image, projects.others(), finding(projects.first()), |p| {
            finding(Some(p))
        });
    }

    /// `first` as it is, preceded by `other(p)` regarding each further project `p` (as many as its level
    /// allows).
    fn fan_out(
        &self,
        image: &str,
        other_projects: &[String],
        first: Finding,
        other: impl Fn(&str) -> Finding,
    ) {
        let fanout = match first.level {
            Level::Normal => NORMAL_FANOUT.saturating_sub(1),
            Level::Warning => usize::MAX,
        };
        for p in other_projects.iter().take(fanout) {
            let mut g = other(p);
            g.regarding = Regarding::for_image(image, Some(p));
            self.publish(&g);
        }
        self.publish(&first);
    }
}

/// Findings written to memory, for unit tests of the jobs.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("captured").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl Captured {
    /// Every finding written so far, as JSON values.
    pub fn findings(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("captured").clone();
        String::from_utf8(bytes)
            .expect("utf-8")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }

    /// The reasons of every finding written so far, in order.
    pub fn reasons(&self) -> Vec<String> {
        self.findings()
            .iter()
            .map(|f| f["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

#[cfg(test)]
impl FindingSink {
    /// A sink that writes into memory.
    pub fn capture(metrics: Arc<Metrics>) -> (Self, Captured) {
        let c = Captured::default();
        let sink = Self {
            out: Arc::new(Mutex::new(Box::new(c.clone()))),
            metrics,
            events: None,
            board: None,
        };
        (sink, c)
    }
}
