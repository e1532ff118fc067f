//! containerd's task events (`/tasks/start`, `/tasks/exit`, `/tasks/oom`, `/tasks/delete`) through the
//! native Events service. Quirk: containerd sends `Any.type_url` without the leading `/` that prost's
//! generated names carry (docs/containerd-facts.md), so decoding matches on the name after the last `/`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use containerd_client::events::{TaskDelete, TaskExit, TaskOom, TaskStart};
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::SubscribeRequest;
use containerd_client::types::Envelope;
use prost::Message;

use super::errors::RuntimeError;
use super::Runtime;

/// One task event of interest, already decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskEvent {
    Start {
        container_id: String,
        pid: u32,
    },
    /// `init` is true for the container's own process (not an exec inside it).
    Exit {
        container_id: String,
        init: bool,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Oom {
        container_id: String,
    },
    Delete {
        container_id: String,
    },
}

/// Decodes an envelope of `namespace`; `None` for other namespaces, other topics, or undecodable payloads.
pub fn decode(env: &Envelope, namespace: &str) -> Option<TaskEvent> {
    if env.namespace != namespace {
        return None;
    }
    let any = env.event.as_ref()?;
    let name = any.type_url.rsplit('/').next().unwrap_or("");
    let bytes = any.value.as_slice();
    match name {
        "containerd.events.TaskStart" => {
            let e = TaskStart::decode(bytes).ok()?;
            Some(TaskEvent::Start {
                container_id: e.container_id,
                pid: e.pid,
            })
        }
        "containerd.events.TaskExit" => {
            let e = TaskExit::decode(bytes).ok()?;
            Some(TaskEvent::Exit {
                // The init process's exec id is the container id (or empty in older shims).
                init: e.id.is_empty() || e.id == e.container_id,
                container_id: e.container_id,
                exit_status: e.exit_status,
                exited_at: e
                    .exited_at
                    .map(to_system_time)
                    .unwrap_or_else(SystemTime::now),
            })
        }
        "containerd.events.TaskOOM" => {
            let e = TaskOom::decode(bytes).ok()?;
            Some(TaskEvent::Oom {
                container_id: e.container_id,
            })
        }
        "containerd.events.TaskDelete" => {
            let e = TaskDelete::decode(bytes).ok()?;
            (e.id.is_empty() || e.id == e.container_id).then_some(TaskEvent::Delete {
                container_id: e.container_id,
            })
        }
        _ => None,
    }
}

pub fn to_system_time(t: prost_types::Timestamp) -> SystemTime {
    if t.seconds < 0 {
        return UNIX_EPOCH;
    }
    UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.clamp(0, 999_999_999) as u32)
}

impl Runtime {
    /// A stream of every task event of every namespace (filtered by [`decode`]). Ends when containerd goes
    /// away; the caller resubscribes and reconciles.
    pub async fn subscribe_tasks(&self) -> Result<tonic::Streaming<Envelope>, RuntimeError> {
        let resp = EventsClient::new(self.channel.clone())
            .subscribe(SubscribeRequest {
                filters: vec![r#"topic~="/tasks/""#.to_string()],
            })
            .await
            .map_err(|s| RuntimeError::call("events.Subscribe", self.socket(), s))?;
        Ok(resp.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(type_url: &str, value: Vec<u8>, ns: &str) -> Envelope {
        Envelope {
            timestamp: None,
            namespace: ns.into(),
            topic: "/tasks/exit".into(),
            event: Some(prost_types::Any {
                type_url: type_url.into(),
                value,
            }),
        }
    }

    fn exit(id: &str) -> Vec<u8> {
        TaskExit {
            container_id: "c1".into(),
            id: id.into(),
            pid: 42,
            exit_status: 137,
            exited_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5,
            }),
        }
        .encode_to_vec()
    }

    #[test]
    fn type_url_with_or_without_the_leading_slash() {
        for url in [
            "containerd.events.TaskExit",
            "/containerd.events.TaskExit",
            "types.containerd.io/containerd.events.TaskExit",
        ] {
            assert_eq!(
                decode(&envelope(url, exit("c1"), "k8s.io"), "k8s.io"),
                Some(TaskEvent::Exit {
                    container_id: "c1".into(),
                    init: true,
                    exit_status: 137,
                    exited_at: UNIX_EPOCH + Duration::new(1_700_000_000, 5),
                }),
                "{url}"
            );
        }
    }

    #[test]
    fn exec_exits_other_namespaces_and_other_events_are_told_apart() {
        let e = decode(
            &envelope("containerd.events.TaskExit", exit("exec-1"), "k8s.io"),
            "k8s.io",
        );
        assert!(matches!(e, Some(TaskEvent::Exit { init: false, .. })));
        assert_eq!(
            decode(
                &envelope("containerd.events.TaskExit", exit("c1"), "moby"),
                "k8s.io"
            ),
            None
        );
        assert_eq!(
            decode(
                &envelope("containerd.events.TaskPaused", vec![], "k8s.io"),
                "k8s.io"
            ),
            None
        );
        let oom = TaskOom {
            container_id: "c2".into(),
        }
        .encode_to_vec();
        assert_eq!(
            decode(
                &envelope("containerd.events.TaskOOM", oom, "k8s.io"),
                "k8s.io"
            ),
            Some(TaskEvent::Oom {
                container_id: "c2".into()
            })
        );
        // Garbage is not an event (and not a panic).
        assert_eq!(
            decode(
                &envelope("containerd.events.TaskStart", vec![0xff, 0xff], "k8s.io"),
                "k8s.io"
            ),
            None
        );
    }
}
