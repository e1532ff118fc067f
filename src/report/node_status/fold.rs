//! The node's images as the object shows them, from the status board (the fold of every job's events
//! that `status` shows too). What a reader of the fleet view needs differs from the board in three ways,
//! and only here: a ready image re-checking its tag stays `Ready` (no bytes move), a failing image
//! retrying stays `Failed` with the failure it had (attempt counts are in metrics), and a failure keeps
//! the time it was first seen while it fails the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::object::{AuditState, FailureEntry, ImageEntry, PullState};
use crate::report::status::{ImageStatus, StatusBoard};

/// How often the board is read (in memory: no API cost; the writer's policy decides what is written).
pub const READ_EVERY: Duration = Duration::from_secs(1);

/// `images` (the board's) as entries; `prev` is what this returned last time.
pub fn entries(prev: &[ImageEntry], images: &[ImageStatus]) -> Vec<ImageEntry> {
    images
        .iter()
        .map(|i| entry(prev.iter().find(|p| p.image == i.image), i))
        .collect()
}

fn entry(prev: Option<&ImageEntry>, i: &ImageStatus) -> ImageEntry {
    let flowing = i
        .progress
        .as_ref()
        .filter(|p| p.done_bytes > 0)
        .map(|p| (p.done_bytes, p.total_bytes));
    let busy = matches!(i.state.as_str(), "waiting" | "pulling");
    let state = match i.state.as_str() {
        "ready" => PullState::Ready,
        "failed" => PullState::Failed,
        "over_cap" => PullState::HeldBack,
        // A retry after a failure, with no bytes moving yet: still failed, as it was.
        _ if busy && flowing.is_none() && i.last_failure.is_some() => PullState::Failed,
        // A present image re-checking its tag: still ready.
        _ if busy && flowing.is_none() && i.image_id.is_some() => PullState::Ready,
        "pulling" => PullState::Pulling,
        _ => PullState::Waiting,
    };
    let failure = match (&i.last_failure, state) {
        (Some(f), PullState::Failed) => {
            let since = prev
                .and_then(|p| p.failure.as_ref())
                .filter(|p| p.class == f.class && p.message == f.message)
                .map(|p| p.since.clone())
                .unwrap_or_else(|| f.at.clone());
            Some(FailureEntry {
                class: f.class.clone(),
                message: f.message.clone(),
                since,
            })
        }
        _ => None,
    };
    let audit = match i.audit.as_ref().map(|a| a.result.as_str()) {
        Some("passed") => AuditState::Passed,
        Some("warnings") => AuditState::Warnings,
        Some("violations") => AuditState::Violations,
        Some(_) => AuditState::NotAudited,
        None => AuditState::Pending,
    };
    let (bytes_done, bytes_total) = match state {
        PullState::Pulling => flowing.unwrap_or_default(),
        _ => (0, 0),
    };
    ImageEntry {
        image: i.image.clone(),
        digest: i.image_id.clone().unwrap_or_default(),
        state,
        bytes_done,
        bytes_total,
        pinned: i.pin.as_deref() == Some("pinned"),
        audit,
        reason: match state {
            PullState::Waiting => i.waiting_for.clone().unwrap_or_default(),
            _ => String::new(),
        },
        failure,
    }
}

/// Reads the board every `READ_EVERY` and hands the writer the entries when they changed.
pub async fn follow_board(
    board: Arc<StatusBoard>,
    tx: watch::Sender<Vec<ImageEntry>>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        tx.send_if_modified(|cur| {
            let next = entries(cur, &board.images());
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::status::{AuditStatus, FailureStatus, Progress};

    fn img(state: &str) -> ImageStatus {
        ImageStatus {
            image: "r:1".into(),
            state: state.into(),
            ..ImageStatus::default()
        }
    }
    fn failure(class: &str, msg: &str, at: &str) -> Option<FailureStatus> {
        Some(FailureStatus {
            class: class.into(),
            message: msg.into(),
            attempts: 1,
            at: at.into(),
        })
    }
    fn progress(done: u64) -> Option<Progress> {
        Some(Progress {
            done_bytes: done,
            total_bytes: 100,
            bytes_per_second: None,
            eta_seconds: None,
        })
    }

    #[test]
    fn states_as_a_reader_of_the_fleet_view_sees_them() {
        let present = |state: &str| ImageStatus {
            image_id: Some("sha256:c".into()),
            pin: Some("pinned".into()),
            ..img(state)
        };
        let cases: Vec<(&str, ImageStatus, PullState, (u64, u64))> = vec![
            (
                "new, waiting for a slot",
                img("waiting"),
                PullState::Waiting,
                (0, 0),
            ),
            (
                "pulling, no bytes yet",
                img("pulling"),
                PullState::Pulling,
                (0, 0),
            ),
            (
                "pulling with bytes",
                ImageStatus {
                    progress: progress(40),
                    ..img("pulling")
                },
                PullState::Pulling,
                (40, 100),
            ),
            ("ready", present("ready"), PullState::Ready, (0, 0)),
            (
                "ready, re-checking its tag",
                present("pulling"),
                PullState::Ready,
                (0, 0),
            ),
            (
                "ready, re-checking, progress known but no byte yet",
                ImageStatus {
                    progress: progress(0),
                    ..present("pulling")
                },
                PullState::Ready,
                (0, 0),
            ),
            (
                "ready, a moved tag's bytes flow",
                ImageStatus {
                    progress: progress(5),
                    ..present("pulling")
                },
                PullState::Pulling,
                (5, 100),
            ),
            (
                "failed",
                ImageStatus {
                    last_failure: failure("auth", "401", "t1"),
                    ..img("failed")
                },
                PullState::Failed,
                (0, 0),
            ),
            (
                "failed, retrying",
                ImageStatus {
                    last_failure: failure("auth", "401", "t1"),
                    ..img("pulling")
                },
                PullState::Failed,
                (0, 0),
            ),
            (
                "over the caps",
                img("over_cap"),
                PullState::HeldBack,
                (0, 0),
            ),
        ];
        for (name, i, want, bytes) in cases {
            let e = entry(None, &i);
            assert_eq!(e.state, want, "{name}");
            assert_eq!((e.bytes_done, e.bytes_total), bytes, "{name}");
        }
        let e = entry(None, &present("ready"));
        assert_eq!((e.digest.as_str(), e.pinned), ("sha256:c", true));
        assert_eq!(e.audit, AuditState::Pending);
    }

    #[test]
    fn a_failure_keeps_its_first_time_while_it_fails_the_same_way() {
        let first = entries(
            &[],
            &[ImageStatus {
                last_failure: failure("auth", "401", "t1"),
                ..img("failed")
            }],
        );
        assert_eq!(first[0].failure.as_ref().unwrap().since, "t1");
        let again = entries(
            &first,
            &[ImageStatus {
                last_failure: failure("auth", "401", "t2"),
                ..img("failed")
            }],
        );
        assert_eq!(again, first, "the same failure again is no change");
        let reworded = entries(
            &again,
            &[ImageStatus {
                last_failure: failure("auth", "403", "t2"),
                ..img("failed")
            }],
        );
        let since = &reworded[0].failure.as_ref().unwrap().since;
        assert_eq!(since, "t2", "same class, another message: a new failure");
        let other = entries(
            &again,
            &[ImageStatus {
                last_failure: failure("network", "refused", "t3"),
                ..img("failed")
            }],
        );
        assert_eq!(other[0].failure.as_ref().unwrap().since, "t3");
        assert_eq!(other[0].failure.as_ref().unwrap().class, "network");
    }

    #[test]
    fn a_waiting_image_says_why_and_only_while_it_waits() {
        let board = StatusBoard::default();
        board.set_state("r:1", "waiting");
        board.set_waiting_for("r:1", "every pull slot is held".into());
        let waiting = entries(&[], &board.images());
        assert_eq!(waiting[0].state, PullState::Waiting);
        assert_eq!(waiting[0].reason, "every pull slot is held");
        board.set_state("r:1", "pulling");
        let pulling = entries(&waiting, &board.images());
        assert_eq!(pulling[0].state, PullState::Pulling);
        assert_eq!(pulling[0].reason, "");
        // A failed image retrying shows its failure, not a wait.
        let failed = ImageStatus {
            last_failure: failure("auth", "401", "t1"),
            waiting_for: Some("every pull slot is held".into()),
            ..img("waiting")
        };
        let e = entries(&[], &[failed]);
        assert_eq!((e[0].state, e[0].reason.as_str()), (PullState::Failed, ""));
    }

    #[test]
    fn audit_results() {
        for (result, want) in [
            ("passed", AuditState::Passed),
            ("warnings", AuditState::Warnings),
            ("violations", AuditState::Violations),
            ("error", AuditState::NotAudited),
        ] {
            let i = ImageStatus {
                audit: Some(AuditStatus {
                    result: result.into(),
                    violations: 0,
                    warnings: 0,
                    details: vec![],
                    at: "t".into(),
                }),
                ..img("ready")
            };
            assert_eq!(entry(None, &i).audit, want, "{result}");
        }
    }
}
