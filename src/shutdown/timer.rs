//! Passive shutdown timing: every runner container's exit, from containerd's task events, measured against
//! the stop request a [`StopClock`] knows of, classified (`contract::shutdown`) and emitted as a
//! `ShutdownEvent` (`report::shutdown` turns it into `shutdowns_total{outcome}`,
//! `shutdown_duration_seconds` and RunnerShutdownSlow / RunnerShutdownKilled findings on the pod).
//!
//! containerd restarts end the event stream: the timer resubscribes with backoff and then reconciles from
//! CRI's exited containers, counting exits that happened while it was deaf — each container's exit is
//! counted once, whichever path saw it first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use containerd_client::types::Envelope;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::stop_clock::{StopClock, StopRequest};
use super::tasks::{TaskEvents, TaskRuntime};
use crate::contract::shutdown::{classify, shell_pid1_hint, stop_signal_hint, ShutdownOutcome};
use crate::outcome::shutdown::{RunnerExit, ShutdownEvent};
use crate::outcome::Emit;
use crate::runtime::containers::ContainerRef;
use crate::runtime::cri::ContainerState;
use crate::runtime::errors::RuntimeError;
use crate::runtime::events::TaskEvent;
use crate::runtime::Runtime;

/// How long an exit waits for its stop request to become known (a pod watch may lag the kubelet).
const STOP_LOOKUP_WAIT: Duration = Duration::from_secs(3);
/// Exits remembered against double counting.
const COUNTED_TTL: Duration = Duration::from_secs(3600);
/// Events may be lost this long before a disconnect is noticed; reconciliation looks that far back.
const GAP_MARGIN: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, PartialEq)]
pub struct TimingSettings {
    pub enabled: bool,
    /// Fraction of the grace period after which an exit is slow.
    pub slow_fraction: f64,
    /// Which containers are runners: the runtime audit's selection.
    pub containers: Vec<String>,
    pub all_containers: bool,
}

impl Default for TimingSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            slow_fraction: 0.5,
            containers: crate::process_audit::scanner::DEFAULT_RUNNER_CONTAINERS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            all_containers: false,
        }
    }
}

type Subscribing =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<TaskEvents, RuntimeError>> + Send>>;

/// A Subscribe call whose response may not have arrived yet, then its stream.
enum Subscription {
    Pending(Subscribing),
    Open(TaskEvents, Option<Envelope>),
}

impl Subscription {
    /// The next envelope; `None` when the stream ended. Cancel-safe: the pending call is kept.
    async fn next(&mut self) -> Option<Result<Envelope, String>> {
        loop {
            match self {
                Subscription::Pending(fut) => match fut.await {
                    Ok(s) => *self = Subscription::Open(s, None),
                    Err(e) => return Some(Err(e.to_string())),
                },
                Subscription::Open(s, first) => {
                    if let Some(env) = first.take() {
                        return Some(Ok(env));
                    }
                    return s
                        .next()
                        .await
                        .map(|r| r.map_err(|st| st.message().to_string()));
                }
            }
        }
    }

    /// Hands an envelope read while probing the subscription back to the event loop.
    fn push_back(&mut self, env: Envelope) {
        if let Subscription::Open(_, first) = self {
            *first = Some(env);
        }
    }
}

/// One measured exit.
#[derive(Clone, Debug, PartialEq)]
pub struct Exit {
    pub container: ContainerRef,
    pub exit_status: i32,
    pub exited_at: SystemTime,
    pub oom: bool,
    /// containerd lost the real status and time (the task ended while containerd was down).
    pub lost: bool,
}

struct Tracked {
    container: ContainerRef,
    /// Hints known while it ran (the process is gone by the time it exits).
    hints: Vec<String>,
    /// PID 1 still to be looked at (a wrapper shell forks its child a moment after start).
    pid1_pending: Option<(u32, Instant)>,
}

pub struct ShutdownTimer<R: TaskRuntime = Runtime> {
    runtime: R,
    settings: TimingSettings,
    clock: Arc<dyn StopClock>,
    emit: Emit<ShutdownEvent>,
    known: HashMap<String, Tracked>,
    ooms: HashSet<String>,
    counted: HashMap<String, Instant>,
    /// Exits whose stop request is not known yet, with the moment they give up waiting.
    pending: Vec<(Exit, Instant)>,
}

impl<R: TaskRuntime> ShutdownTimer<R> {
    pub fn new(
        runtime: R,
        settings: TimingSettings,
        clock: Arc<dyn StopClock>,
        emit: Emit<ShutdownEvent>,
    ) -> Self {
        Self {
            runtime,
            settings,
            clock,
            emit,
            known: HashMap::new(),
            ooms: HashSet::new(),
            counted: HashMap::new(),
            pending: Vec::new(),
        }
    }

    fn is_runner(&self, c: &ContainerRef) -> bool {
        self.settings.all_containers || self.settings.containers.iter().any(|n| n == &c.name)
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        // None at start: exits from before the agent ran are not ours to judge.
        let mut deaf_since: Option<SystemTime> = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let rt = self.runtime.clone();
            let mut sub =
                Subscription::Pending(Box::pin(async move { rt.subscribe_tasks().await }));
            // containerd answers Subscribe's headers only with the first event: a call still pending after
            // a moment is a live subscription; one that fails fast is not.
            let failed = tokio::select! {
                _ = stop.cancelled() => return,
                r = sub.next() => match r {
                    Some(Err(e)) => Some(e),
                    Some(Ok(env)) => {
                        sub.push_back(env);
                        None
                    }
                    None => Some("the event stream ended at once".to_string()),
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => None,
            };
            if let Some(e) = failed {
                if deaf_since.is_none() {
                    warn!(error = %e, "cannot subscribe to containerd task events; shutdown timing resumes when containerd answers");
                }
                deaf_since.get_or_insert_with(SystemTime::now);
                (self.emit)(ShutdownEvent::Listening(false));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(jitter(backoff)) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_secs(1);
            (self.emit)(ShutdownEvent::Listening(true));
            // Subscribed first, then reconciled: an exit is either in the list or arrives on the stream.
            if let Err(e) = self.reconcile(deaf_since).await {
                warn!(error = %e, "could not reconcile runner containers after subscribing");
            }
            if deaf_since.take().is_some() {
                info!("subscribed to containerd task events again");
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => self.on_tick().await,
                    ev = sub.next() => match ev {
                        Some(Ok(env)) => {
                            if let Some(e) = crate::runtime::events::decode(&env, self.runtime.namespace()) {
                                self.on_event(e).await;
                            }
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, "containerd task event stream broke; resubscribing");
                            break;
                        }
                        None => {
                            warn!("containerd closed the task event stream; resubscribing");
                            break;
                        }
                    }
                }
            }
            (self.emit)(ShutdownEvent::Listening(false));
            deaf_since = Some(SystemTime::now() - GAP_MARGIN);
        }
    }

    /// Tracks running runners; counts runners that exited at or after `since` and were not counted yet.
    async fn reconcile(&mut self, since: Option<SystemTime>) -> Result<(), String> {
        for c in self
            .runtime
            .containers_in(ContainerState::ContainerRunning)
            .await
            .map_err(|e| e.to_string())?
        {
            if self.is_runner(&c) && !self.known.contains_key(&c.id) {
                let Ok(Some((c, st))) = self.runtime.container_status(&c.id).await else {
                    continue;
                };
                let pid = self.runtime.container_init_pid(&c.id).await;
                self.track(c, &st.image_ref, pid).await;
            }
        }
        let Some(since) = since else { return Ok(()) };
        let since_ns = since
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i64;
        for c in self
            .runtime
            .containers_in(ContainerState::ContainerExited)
            .await
            .map_err(|e| e.to_string())?
        {
            if !self.is_runner(&c) || self.counted.contains_key(&c.id) {
                continue;
            }
            let Ok(Some((c, st))) = self.runtime.container_status(&c.id).await else {
                continue;
            };
            if st.finished_at < since_ns {
                continue;
            }
            info!(container = %c.id, pod = %c.pod, "counting a runner exit seen while containerd events were not received");
            let exit = Exit {
                exit_status: st.exit_code,
                exited_at: UNIX_EPOCH + Duration::from_nanos(st.finished_at.max(0) as u64),
                oom: st.reason == "OOMKilled" || self.ooms.contains(&c.id),
                // CRI's recovery marks a task it found gone with 255 / "Unknown" at restart time.
                lost: st.exit_code == 255 && (st.reason == "Unknown" || st.reason.is_empty()),
                container: c,
            };
            self.on_exit(exit);
        }
        Ok(())
    }

    async fn track(&mut self, c: ContainerRef, image_ref: &str, pid: Option<u32>) {
        let mut hints = Vec::new();
        if let Ok(Some(sig)) = self.runtime.image_stop_signal(image_ref).await {
            hints.extend(stop_signal_hint(&sig));
        }
        debug!(container = %c.id, pod = %c.pod, "timing runner container");
        self.known.insert(
            c.id.clone(),
            Tracked {
                container: c,
                hints,
                pid1_pending: pid.map(|p| (p, Instant::now())),
            },
        );
    }

    async fn on_event(&mut self, e: TaskEvent) {
        match e {
            TaskEvent::Start { container_id, pid } => {
                self.ooms.remove(&container_id);
                self.counted.remove(&container_id);
                if let Ok(Some((c, st))) = self.runtime.container_status(&container_id).await {
                    if self.is_runner(&c) {
                        self.track(c, &st.image_ref, Some(pid)).await;
                    }
                }
            }
            TaskEvent::Oom { container_id } => {
                self.ooms.insert(container_id);
            }
            TaskEvent::Exit {
                container_id,
                init: true,
                exit_status,
                exited_at,
            } => {
                if self.counted.contains_key(&container_id) {
                    return;
                }
                let container = match self.known.get(&container_id) {
                    Some(t) => t.container.clone(),
                    // Started before we subscribed and not listed yet: ask CRI (a sandbox's pause task is
                    // not a CRI container and ends here).
                    None => match self.runtime.container_status(&container_id).await {
                        Ok(Some((c, _))) if self.is_runner(&c) => c,
                        _ => return,
                    },
                };
                let exit = Exit {
                    oom: self.ooms.contains(&container_id),
                    container,
                    exit_status: exit_status as i32,
                    exited_at,
                    lost: false,
                };
                self.on_exit(exit);
            }
            TaskEvent::Exit { .. } => {}
            TaskEvent::Delete { container_id } => {
                // Deleted after the exit was handled (or never a runner).
                if !self
                    .pending
                    .iter()
                    .any(|(e, _)| e.container.id == container_id)
                {
                    self.known.remove(&container_id);
                    self.ooms.remove(&container_id);
                }
            }
        }
    }

    fn on_exit(&mut self, exit: Exit) {
        if exit.lost {
            return self.account(exit, None);
        }
        match self.clock.stop_requested(&exit.container) {
            Some(req) => self.account(exit, Some(req)),
            None if exit.oom => self.account(exit, None),
            None => {
                let deadline = Instant::now() + STOP_LOOKUP_WAIT;
                self.pending.push((exit, deadline));
            }
        }
    }

    async fn on_tick(&mut self) {
        // Exits waiting for their stop request.
        let now = Instant::now();
        let pending = std::mem::take(&mut self.pending);
        for (exit, deadline) in pending {
            match self.clock.stop_requested(&exit.container) {
                Some(req) => self.account(exit, Some(req)),
                None if now >= deadline => self.account(exit, None),
                None => self.pending.push((exit, deadline)),
            }
        }
        // PID 1 shapes of recently started runners.
        for t in self.known.values_mut() {
            let Some((pid, since)) = t.pid1_pending else {
                continue;
            };
            match self.runtime.pid1_shape(pid) {
                Some((comm, children)) => {
                    if let Some(h) = shell_pid1_hint(&comm, children) {
                        t.hints.push(h);
                        t.pid1_pending = None;
                    } else if children || since.elapsed() > Duration::from_secs(10) {
                        // Not a shell, or a shell that never forked: settled.
                        t.pid1_pending = None;
                    }
                }
                None => t.pid1_pending = None,
            }
        }
        self.counted.retain(|_, at| at.elapsed() < COUNTED_TTL);
    }

    fn account(&mut self, exit: Exit, req: Option<StopRequest>) {
        let c = exit.container.clone();
        if self.counted.insert(c.id.clone(), Instant::now()).is_some() {
            return;
        }
        let hints = self
            .known
            .remove(&c.id)
            .map(|t| t.hints)
            .unwrap_or_default();
        self.ooms.remove(&c.id);
        self.clock.forget(&c);
        let (seconds, grace) = match req {
            Some(r) => (
                exit.exited_at
                    .duration_since(r.at)
                    .unwrap_or_default()
                    .as_secs_f64(),
                r.grace.as_secs_f64(),
            ),
            None => (0.0, 0.0),
        };
        let outcome = if exit.lost {
            ShutdownOutcome::Unknown
        } else {
            classify(
                exit.exit_status,
                seconds,
                grace,
                self.settings.slow_fraction,
                exit.oom,
                req.is_some(),
            )
        };
        (self.emit)(ShutdownEvent::Exited(RunnerExit {
            container: c,
            outcome,
            timed: req.is_some(),
            seconds,
            grace,
            slow_fraction: self.settings.slow_fraction,
            exit_status: exit.exit_status,
            lost: exit.lost,
            hints,
        }));
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..1.2))
}

#[cfg(test)]
#[path = "timer_tests.rs"]
mod tests;
