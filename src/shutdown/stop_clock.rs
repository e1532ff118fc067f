//! When was a runner asked to stop, and with what grace period? The passive shutdown timer asks a
//! [`StopClock`]. On Kubernetes the answer is the pod's `deletionTimestamp − deletionGracePeriodSeconds`;
//! without a cluster (and in tests) it is a stop record written by whoever issued CRI `StopContainer`
//! ([`RecordedStops`]: `verify-shutdown` writes one, and so can any tool via [`RecordedStops::record`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::runtime::containers::ContainerRef;

/// Default directory for stop records: node-local and cleared at boot.
pub const DEFAULT_STOP_RECORDS: &str = "/run/runner-warden/stops";

/// Records older than this are stale (their container is long gone) and pruned.
const RECORD_TTL: Duration = Duration::from_secs(3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StopRequest {
    pub at: SystemTime,
    pub grace: Duration,
}

pub trait StopClock: Send + Sync {
    /// The stop request for this container, if one was made.
    fn stop_requested(&self, container: &ContainerRef) -> Option<StopRequest>;
    /// The container's exit has been accounted for.
    fn forget(&self, _container: &ContainerRef) {}
}

/// Asks each clock in turn.
pub struct Clocks(pub Vec<Arc<dyn StopClock>>);

impl StopClock for Clocks {
    fn stop_requested(&self, c: &ContainerRef) -> Option<StopRequest> {
        self.0.iter().find_map(|k| k.stop_requested(c))
    }
    fn forget(&self, c: &ContainerRef) {
        self.0.iter().for_each(|k| k.forget(c))
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    container_id: String,
    /// Unix time in nanoseconds when StopContainer was about to be sent.
    requested_at_ns: u128,
    grace_seconds: f64,
}

/// Stop records in a directory, one JSON file per container id.
#[derive(Clone, Debug)]
pub struct RecordedStops {
    dir: PathBuf,
}

impl RecordedStops {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, container_id: &str) -> Option<PathBuf> {
        // Container ids are hex; anything else must not become a path.
        (!container_id.is_empty() && container_id.chars().all(|c| c.is_ascii_alphanumeric()))
            .then(|| self.dir.join(format!("{container_id}.json")))
    }

    /// Records "StopContainer(`container_id`, `grace`) is being sent now" and returns that instant.
    /// Call it right before the RPC. Written atomically; stale records are pruned on the way.
    pub fn record(&self, container_id: &str, grace: Duration) -> std::io::Result<SystemTime> {
        let path = self.path(container_id).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{container_id:?} is not a container id"),
            )
        })?;
        std::fs::create_dir_all(&self.dir)?;
        self.prune();
        let at = SystemTime::now();
        let rec = Record {
            container_id: container_id.to_string(),
            requested_at_ns: at.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos(),
            grace_seconds: grace.as_secs_f64(),
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&rec).expect("record serialises"))?;
        std::fs::rename(&tmp, &path)?;
        Ok(at)
    }

    fn prune(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > RECORD_TTL);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

impl StopClock for RecordedStops {
    fn stop_requested(&self, c: &ContainerRef) -> Option<StopRequest> {
        let path = self.path(&c.id)?;
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice::<Record>(&bytes) {
            Ok(r)
                if r.container_id == c.id
                    && r.grace_seconds.is_finite()
                    && r.grace_seconds >= 0.0 =>
            {
                Some(StopRequest {
                    at: UNIX_EPOCH + Duration::from_nanos(r.requested_at_ns as u64),
                    grace: Duration::from_secs_f64(r.grace_seconds),
                })
            }
            _ => {
                tracing::warn!(path = %path.display(), "ignoring an unreadable stop record");
                None
            }
        }
    }

    fn forget(&self, c: &ContainerRef) {
        if let Some(p) = self.path(&c.id) {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Stop requests keyed by pod UID, set by whoever watches pods (the Kubernetes source).
#[derive(Default)]
pub struct PodStops {
    by_uid: Mutex<HashMap<String, StopRequest>>,
}

impl PodStops {
    pub fn set(&self, pod_uid: &str, req: StopRequest) {
        if let Ok(mut m) = self.by_uid.lock() {
            // Pods whose runner never exited under our eyes: forget them after an hour.
            m.retain(|_, r| r.at.elapsed().map_or(true, |age| age < RECORD_TTL));
            m.insert(pod_uid.to_string(), req);
        }
    }

    pub fn remove(&self, pod_uid: &str) {
        if let Ok(mut m) = self.by_uid.lock() {
            m.remove(pod_uid);
        }
    }
}

impl StopClock for PodStops {
    fn stop_requested(&self, c: &ContainerRef) -> Option<StopRequest> {
        if c.pod_uid.is_empty() {
            return None;
        }
        self.by_uid.lock().ok()?.get(&c.pod_uid).copied()
    }

    fn forget(&self, c: &ContainerRef) {
        self.remove(&c.pod_uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(id: &str, uid: &str) -> ContainerRef {
        ContainerRef {
            id: id.into(),
            name: "ambient-code-runner".into(),
            pod: "p".into(),
            namespace: "ns".into(),
            pod_uid: uid.into(),
        }
    }

    #[test]
    fn records_round_trip_and_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let stops = RecordedStops::new(dir.path().join("stops"));
        let c = container("abc123", "");
        assert_eq!(stops.stop_requested(&c), None);
        let at = stops.record("abc123", Duration::from_secs(6)).unwrap();
        let got = stops.stop_requested(&c).unwrap();
        assert_eq!(got.grace, Duration::from_secs(6));
        let err = got.at.duration_since(at).unwrap_or_else(|e| e.duration());
        assert!(err < Duration::from_micros(1), "{err:?}");
        stops.forget(&c);
        assert_eq!(stops.stop_requested(&c), None);
    }

    #[test]
    fn ids_that_are_not_ids_never_become_paths() {
        let dir = tempfile::tempdir().unwrap();
        let stops = RecordedStops::new(dir.path());
        assert!(stops.record("../etc/passwd", Duration::ZERO).is_err());
        assert_eq!(stops.stop_requested(&container("../x", "")), None);
        std::fs::write(dir.path().join("bad.json"), "not json").unwrap();
        assert_eq!(stops.stop_requested(&container("bad", "")), None);
    }

    #[test]
    fn clocks_ask_in_turn_and_pods_match_by_uid() {
        let pods = Arc::new(PodStops::default());
        let req = StopRequest {
            at: UNIX_EPOCH + Duration::from_secs(10),
            grace: Duration::from_secs(60),
        };
        pods.set("uid-1", req);
        let dir = tempfile::tempdir().unwrap();
        let clocks = Clocks(vec![Arc::new(RecordedStops::new(dir.path())), pods.clone()]);
        assert_eq!(clocks.stop_requested(&container("c1", "uid-1")), Some(req));
        assert_eq!(clocks.stop_requested(&container("c1", "uid-2")), None);
        assert_eq!(clocks.stop_requested(&container("c1", "")), None);
        pods.remove("uid-1");
        assert_eq!(clocks.stop_requested(&container("c1", "uid-1")), None);
    }
}
