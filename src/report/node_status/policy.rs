//! When the node's object is written: a change a reader would see at once (but coalesced over
//! `MIN_GAP`, so a burst of state changes is one write), progress at most every `PROGRESS_EVERY` while
//! bytes flow, otherwise only the heartbeat. Pure: the writer feeds it what it wrote and what it holds now.

use std::time::Duration;

use tokio::time::Instant;

use super::object::ImageEntry;

/// Changes within this window after a write go out together in the next one.
pub const MIN_GAP: Duration = Duration::from_secs(2);
/// Byte counts alone are written at most this often (≤ 6 writes a minute while a pull runs).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write now.
    Write,
    /// Nothing to write before this instant (then ask again).
    WaitUntil(Instant),
}

/// What a reader would see change between `a` and `b`, byte counts aside.
fn differs_visibly(a: &[ImageEntry], b: &[ImageEntry]) -> bool {
    a.len() != b.len()
        || a.iter().zip(b).any(|(x, y)| {
            x.image != y.image
                || x.digest != y.digest
                || x.state != y.state
                || x.pinned != y.pinned
                || x.audit != y.audit
                || x.reason != y.reason
                || x.failure != y.failure
                || (x.bytes_total == 0) != (y.bytes_total == 0)
        })
}

fn bytes_differ(a: &[ImageEntry], b: &[ImageEntry]) -> bool {
    a.iter()
        .zip(b)
        .any(|(x, y)| x.bytes_done != y.bytes_done || x.bytes_total != y.bytes_total)
}

/// Whether to write `now` (entries sorted by image, as `NodeImagesStatus::build` sorts them), given what
/// was last written and when (`None`: never — the first write goes out at once).
pub fn decide(
    written: Option<(&[ImageEntry], Instant)>,
    now_entries: &[ImageEntry],
    now: Instant,
    heartbeat: Duration,
) -> Decision {
    let Some((last, at)) = written else {
        return Decision::Write;
    };
    let due = |after: Duration| {
        let t = at + after;
        if now >= t {
            Decision::Write
        } else {
            Decision::WaitUntil(t)
        }
    };
    if differs_visibly(last, now_entries) {
        due(MIN_GAP)
    } else if bytes_differ(last, now_entries) {
        due(PROGRESS_EVERY)
    } else {
        due(heartbeat)
    }
}

#[cfg(test)]
mod tests {
    use super::super::object::{AuditState, PullState};
    use super::*;

    const HB: Duration = Duration::from_secs(600);

    fn e(state: PullState, done: u64) -> ImageEntry {
        ImageEntry {
            image: "r:1".into(),
            state,
            bytes_done: done,
            bytes_total: if done > 0 { 100 } else { 0 },
            ..ImageEntry::default()
        }
    }

    #[test]
    fn table() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let pulling = [e(PullState::Pulling, 10)];
        let more = [e(PullState::Pulling, 50)];
        let ready = [e(PullState::Ready, 0)];
        let audited = [ImageEntry {
            audit: AuditState::Passed,
            ..e(PullState::Ready, 0)
        }];
        use Decision::*;
        type Written<'a> = Option<(&'a [ImageEntry], Instant)>;
        let cases: Vec<(&str, Written, &[ImageEntry], Instant, Decision)> = vec![
            ("first write at once", None, &ready, t0, Write),
            (
                "state change at once",
                Some((&pulling, t0)),
                &ready,
                s(5),
                Write,
            ),
            (
                "state change coalesced",
                Some((&pulling, t0)),
                &ready,
                ms(500),
                WaitUntil(s(2)),
            ),
            (
                "audit result is a change",
                Some((&ready, t0)),
                &audited,
                s(3),
                Write,
            ),
            (
                "progress waits 10 s",
                Some((&pulling, t0)),
                &more,
                s(9),
                WaitUntil(s(10)),
            ),
            (
                "progress after 10 s",
                Some((&pulling, t0)),
                &more,
                s(10),
                Write,
            ),
            (
                "nothing: heartbeat",
                Some((&ready, t0)),
                &ready,
                s(599),
                WaitUntil(s(600)),
            ),
            ("heartbeat due", Some((&ready, t0)), &ready, s(600), Write),
            ("an image left", Some((&ready, t0)), &[], s(3), Write),
        ];
        for (name, written, now_entries, now, want) in cases {
            assert_eq!(decide(written, now_entries, now, HB), want, "{name}");
        }
    }

    #[test]
    fn each_field_a_reader_sees_is_a_change_on_its_own() {
        let t0 = Instant::now();
        let now = t0 + Duration::from_secs(5);
        let base = ImageEntry {
            digest: "sha256:a".into(),
            ..e(PullState::Ready, 0)
        };
        let changed: Vec<(&str, ImageEntry)> = vec![
            (
                "image",
                ImageEntry {
                    image: "r:2".into(),
                    ..base.clone()
                },
            ),
            (
                "digest",
                ImageEntry {
                    digest: "sha256:b".into(),
                    ..base.clone()
                },
            ),
            (
                "state",
                ImageEntry {
                    state: PullState::Failed,
                    ..base.clone()
                },
            ),
            (
                "pinned",
                ImageEntry {
                    pinned: true,
                    ..base.clone()
                },
            ),
            (
                "audit",
                ImageEntry {
                    audit: AuditState::Violations,
                    ..base.clone()
                },
            ),
            (
                "reason",
                ImageEntry {
                    reason: "every pull slot is held".into(),
                    ..base.clone()
                },
            ),
            (
                "total known",
                ImageEntry {
                    bytes_total: 100,
                    ..base.clone()
                },
            ),
        ];
        for (field, c) in changed {
            let last = [base.clone()];
            assert_eq!(
                decide(Some((&last, t0)), &[c], now, HB),
                Decision::Write,
                "{field} alone"
            );
        }
        let last = [base.clone()];
        assert_eq!(
            decide(Some((&last, t0)), std::slice::from_ref(&base), now, HB),
            Decision::WaitUntil(t0 + HB)
        );
    }

    #[test]
    fn a_failure_retried_the_same_way_is_no_change() {
        let t0 = Instant::now();
        let failed = |msg: &str| ImageEntry {
            failure: Some(super::super::object::FailureEntry {
                class: "auth".into(),
                message: msg.into(),
                since: "t1".into(),
            }),
            ..e(PullState::Failed, 0)
        };
        let a = [failed("401")];
        assert_eq!(
            decide(
                Some((&a, t0)),
                &[failed("401")],
                t0 + Duration::from_secs(60),
                HB
            ),
            Decision::WaitUntil(t0 + HB)
        );
        assert_eq!(
            decide(
                Some((&a, t0)),
                &[failed("403")],
                t0 + Duration::from_secs(60),
                HB
            ),
            Decision::Write
        );
    }
}
