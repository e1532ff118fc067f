//! One image's life as a pure transition function: `step(life, input) -> (life, actions)`. The worker
//! (`worker.rs`) owns its `Life`, feeds it what happened (a slot, an attempt's outcome, the end of a wait)
//! and carries out the actions (emit a state, attempt, report a failure, wait, stop). No I/O, no clock:
//! delays are values, and the jitter is an input.
//!
//! ```text
//!            SlotGranted             Present              WaitOver
//!  Waiting ──────────────> Pulling ──────────> Ready ───────────────> Waiting
//!     ^                      │ Failed(class)                            │
//!     │       WaitOver       v                                          │
//!     └──────────────────  Failed (backoff: per-node, or slower for     │
//!     RuntimeDown: Waiting          failures alike on every node)      │
//!     OverCap: the worker stops (the run loop holds the image back) <───┘
//! ```

use std::time::Duration;

use super::backoff::backoff_delay;
use super::PrewarmSettings;
use crate::model::{FailureClass, ImageState};

/// Factors on `backoff_initial` and `backoff_max` for failures alike on every node.
pub(super) const ALIKE_SLOWER_START: u32 = 16;
pub(super) const ALIKE_HIGHER_CAP: u32 = 4;

/// What a worker remembers between attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Life {
    pub state: ImageState,
    /// Consecutive failures of the image (containerd outages excluded).
    pub failures: u32,
    /// Consecutive attempts containerd did not answer.
    pub outages: u32,
    /// The next attempt re-resolves the tag (a tag that was present is pulled again to follow it).
    pub force: bool,
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Input {
    /// A pull slot is free.
    SlotGranted,
    /// The attempt found or pulled the image (`by_digest`: the reference names a digest).
    Present { by_digest: bool },
    /// Present, but holding it would break a cap.
    OverCap,
    /// containerd did not answer: a state of the node, not a failure of the image.
    RuntimeDown,
    /// The attempt failed.
    Failed(FailureClass),
    /// The wait is over.
    WaitOver,
}

/// What the worker does next, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Action {
    State(ImageState),
    /// Check (and pull, when absent or `force`) the image.
    Attempt {
        force: bool,
    },
    /// Report the failure: `attempts` in a row, retried in `retry_in`.
    ReportFailure {
        attempts: u32,
        retry_in: Duration,
    },
    /// Wait, then `WaitOver`.
    Wait(Duration),
    /// The worker ends (the run loop holds the image back).
    Stop,
}

impl Life {
    /// A new worker's life, and its first actions.
    pub fn start() -> (Life, Vec<Action>) {
        let life = Life {
            state: ImageState::Waiting,
            failures: 0,
            outages: 0,
            force: false,
        };
        (life, vec![Action::State(ImageState::Waiting)])
    }
}

/// The next life after `input`, and what to do. `jitter` ∈ [0.8, 1.2] scales backoffs.
pub(super) fn step(
    mut life: Life,
    input: Input,
    settings: &PrewarmSettings,
    jitter: f64,
) -> (Life, Vec<Action>) {
    let actions = match input {
        Input::SlotGranted => {
            life.state = ImageState::Pulling;
            vec![
                Action::State(ImageState::Pulling),
                Action::Attempt { force: life.force },
            ]
        }
        Input::Present { by_digest } => {
            life.failures = 0;
            life.outages = 0;
            life.state = ImageState::Ready;
            // Tags are re-resolved; digests only re-checked for presence.
            life.force = !by_digest;
            vec![
                Action::State(ImageState::Ready),
                Action::Wait(settings.resolve_interval),
            ]
        }
        Input::OverCap => {
            life.failures = 0;
            life.outages = 0;
            vec![Action::Stop]
        }
        Input::RuntimeDown => {
            life.outages += 1;
            life.state = ImageState::Waiting;
            let delay = backoff_delay(
                settings.backoff_initial,
                settings.backoff_max,
                life.outages,
                jitter,
            );
            vec![Action::State(ImageState::Waiting), Action::Wait(delay)]
        }
        Input::Failed(class) => {
            life.failures += 1;
            life.outages = 0;
            life.state = ImageState::Failed;
            // Auth and not-found failures are the registry's answer to every node: a retry every second
            // from a thousand nodes would only hammer it. They back off from 16× the initial delay to 4×
            // the cap.
            let delay = match class.alike_on_every_node() {
                true => backoff_delay(
                    settings.backoff_initial * ALIKE_SLOWER_START,
                    settings.backoff_max * ALIKE_HIGHER_CAP,
                    life.failures,
                    jitter,
                ),
                false => backoff_delay(
                    settings.backoff_initial,
                    settings.backoff_max,
                    life.failures,
                    jitter,
                ),
            };
            vec![
                Action::State(ImageState::Failed),
                Action::ReportFailure {
                    attempts: life.failures,
                    retry_in: delay,
                },
                Action::Wait(delay),
            ]
        }
        Input::WaitOver => {
            life.state = ImageState::Waiting;
            vec![Action::State(ImageState::Waiting)]
        }
    };
    (life, actions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ImageState::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// A row: what it shows, the inputs from a new life, the last step's actions, and the life after it
    /// (state, failures, outages, force).
    type Row = (
        &'static str,
        Vec<Input>,
        Vec<Action>,
        (ImageState, u32, u32, bool),
    );

    /// Runs `inputs` from a new life; each row's expected actions, and the life at the end.
    fn run(inputs: &[Input]) -> (Life, Vec<Vec<Action>>) {
        let settings = PrewarmSettings::default(); // backoff 1 s → 300 s, resolve every 600 s
        let (mut life, _) = Life::start();
        let mut all = Vec::new();
        for i in inputs {
            let (next, actions) = step(life, *i, &settings, 1.0);
            life = next;
            all.push(actions);
        }
        (life, all)
    }

    #[test]
    fn a_new_worker_waits_for_a_slot() {
        let (life, actions) = Life::start();
        assert_eq!(life.state, Waiting);
        assert_eq!(actions, [Action::State(Waiting)]);
    }

    #[test]
    fn each_input_moves_the_life_as_the_table_says() {
        use Action::{Attempt, ReportFailure, State, Wait};
        use Input::*;
        let net = Failed(FailureClass::Network);
        let auth = Failed(FailureClass::Auth);
        let fail = |attempts, secs| {
            vec![
                State(ImageState::Failed),
                ReportFailure {
                    attempts,
                    retry_in: s(secs),
                },
                Wait(s(secs)),
            ]
        };
        #[rustfmt::skip]
        let table: Vec<Row> = vec![
            ("slot → pulling, not forced", vec![SlotGranted],
                vec![State(Pulling), Attempt { force: false }], (Pulling, 0, 0, false)),
            ("a tag present → ready, re-resolved later", vec![SlotGranted, Present { by_digest: false }],
                vec![State(Ready), Wait(s(600))], (Ready, 0, 0, true)),
            ("a digest present → never forced", vec![SlotGranted, Present { by_digest: true }],
                vec![State(Ready), Wait(s(600))], (Ready, 0, 0, false)),
            ("after ready, the next attempt re-resolves the tag",
                vec![SlotGranted, Present { by_digest: false }, WaitOver, SlotGranted],
                vec![State(Pulling), Attempt { force: true }], (Pulling, 0, 0, true)),
            ("the first network failure backs off 1 s", vec![SlotGranted, net],
                fail(1, 1), (ImageState::Failed, 1, 0, false)),
            ("the third in a row 4 s", vec![net, WaitOver, net, WaitOver, net],
                fail(3, 4), (ImageState::Failed, 3, 0, false)),
            ("auth starts at 16 s", vec![auth],
                fail(1, 16), (ImageState::Failed, 1, 0, false)),
            ("auth is capped at 4 × the cap", vec![auth; 12],
                fail(12, 1200), (ImageState::Failed, 12, 0, false)),
            ("containerd down: waiting, not failed, outages counted apart", vec![net, RuntimeDown, RuntimeDown],
                vec![State(Waiting), Wait(s(2))], (Waiting, 1, 2, false)),
            ("a success ends failures and outages", vec![net, RuntimeDown, Present { by_digest: true }],
                vec![State(Ready), Wait(s(600))], (Ready, 0, 0, false)),
            ("a failure ends an outage streak", vec![RuntimeDown, RuntimeDown, net],
                fail(1, 1), (ImageState::Failed, 1, 0, false)),
            ("over a cap once its size is known: stop", vec![SlotGranted, OverCap],
                vec![Action::Stop], (Pulling, 0, 0, false)),
            ("the wait over: back to waiting", vec![net, WaitOver],
                vec![State(Waiting)], (Waiting, 1, 0, false)),
        ];
        for (what, inputs, last, (state, failures, outages, force)) in table {
            let (life, actions) = run(&inputs);
            assert_eq!(actions.last().unwrap(), &last, "{what}");
            assert_eq!(
                (life.state, life.failures, life.outages, life.force),
                (state, failures, outages, force),
                "{what}"
            );
        }
    }

    #[test]
    fn jitter_scales_the_wait() {
        let settings = PrewarmSettings::default();
        let (life, _) = Life::start();
        let (_, actions) = step(life, Input::Failed(FailureClass::Stalled), &settings, 0.8);
        assert_eq!(
            actions.last(),
            Some(&Action::Wait(Duration::from_millis(800)))
        );
    }
}
