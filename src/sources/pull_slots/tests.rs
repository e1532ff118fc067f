//! The pure parts table-tested; the API part against a mock API server that keeps Leases the way the
//! real one does (resourceVersion checked on update, 409 on a stale one or an existing name, list and
//! watch on the label selector), kube's real `Client` over `tower_test::mock`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use k8s_openapi::jiff::SignedDuration;
use kube::client::Body;
use tokio::sync::broadcast;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::*;

// ---- pure parts ----

#[test]
fn slot_names_round_trip_and_nothing_else_is_a_slot() {
    for (name, k) in [
        ("runner-warden-pull-0", Some(0)),
        ("runner-warden-pull-17", Some(17)),
        ("runner-warden-pull-01", None),
        ("runner-warden-pull-", None),
        ("runner-warden-pull--1", None),
        ("runner-warden-pull-x", None),
        ("runner-warden-reporter", None),
    ] {
        assert_eq!(slot_index(name), k, "{name}");
    }
    assert_eq!(slot_name(3), "runner-warden-pull-3");
    assert_eq!(slot_index(&slot_name(42)), Some(42));
}

#[test]
fn jitter_stays_within_its_bound() {
    for (r, want) in [(0.0, 0), (0.5, 1500), (0.999, 2997), (1.5, 3000), (-1.0, 0)] {
        assert_eq!(jitter_of(TAKE_JITTER, r).as_millis(), want, "r = {r}");
    }
    let draws: Vec<Duration> = (0..1000).map(|_| jitter()).collect();
    assert!(draws.iter().all(|j| *j < TAKE_JITTER));
    // Spread over the range, not one fixed wait (thousands of nodes would write at the same instant).
    assert!(draws.iter().any(|j| *j > TAKE_JITTER / 2), "{draws:?}");
    assert!(draws.iter().any(|j| *j < TAKE_JITTER / 2), "{draws:?}");
}

fn lease(k: u32, holder: Option<&str>, renewed: Option<Timestamp>, rv: &str) -> Lease {
    let mut meta = ObjectMeta {
        name: Some(slot_name(k)),
        resource_version: Some(rv.into()),
        ..Default::default()
    };
    labelled(&mut meta, holder.map(|_| "r.io/img:1"));
    Lease {
        metadata: meta,
        spec: Some(LeaseSpec {
            holder_identity: holder.map(str::to_string),
            renew_time: renewed.map(MicroTime),
            lease_duration_seconds: Some(LEASE_SECONDS),
            ..Default::default()
        }),
    }
}

fn view(slots: &[(u32, Option<&str>, Instant)]) -> View {
    let renewed = Some(Timestamp::now());
    View {
        synced: true,
        slots: slots
            .iter()
            .map(|(k, h, seen)| (*k, Slot::new(lease(*k, *h, renewed, "1"), None, *seen)))
            .collect(),
        ..Default::default()
    }
}

#[test]
fn which_slot_to_try() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let me = "runner-warden-n1";
    let none = BTreeSet::new();
    let skips = Skips::new();
    let busy = |held, holders: &[&str], until| {
        Choice::Wait(
            Busy {
                held,
                max: 2,
                holders: holders.iter().map(|s| s.to_string()).collect(),
            },
            until,
        )
    };
    let a = Some("runner-warden-a");
    let b = Some("runner-warden-b");
    let cases: Vec<(&str, View, BTreeSet<u32>, Instant, Choice)> = vec![
        (
            "nothing created yet",
            view(&[]),
            none.clone(),
            t0,
            Choice::Try(vec![0, 1]),
        ),
        (
            "one missing",
            view(&[(0, a, t0)]),
            none.clone(),
            t0,
            Choice::Try(vec![1]),
        ),
        (
            "released",
            view(&[(0, a, t0), (1, Some(""), t0)]),
            none.clone(),
            t0,
            Choice::Try(vec![1]),
        ),
        (
            "holder cleared",
            view(&[(0, a, t0), (1, None, t0)]),
            none.clone(),
            t0,
            Choice::Try(vec![1]),
        ),
        (
            "our own from an earlier run comes first",
            view(&[(0, Some(me), t0)]),
            none.clone(),
            t0,
            Choice::Try(vec![0]),
        ),
        (
            "both held: wait until the first would expire by our clock",
            view(&[(0, a, t0), (1, b, at(10))]),
            none.clone(),
            at(20),
            busy(2, &["a", "b"], Some(at(30) + Duration::from_millis(1))),
        ),
        (
            "unchanged for longer than the lease by our clock: expired",
            view(&[(0, a, t0), (1, b, at(10))]),
            none.clone(),
            at(31),
            Choice::Try(vec![0]),
        ),
        (
            "free beats expired",
            view(&[(0, a, t0), (1, None, at(10))]),
            none.clone(),
            at(31),
            Choice::Try(vec![1]),
        ),
        (
            "one held by this process counts as held",
            view(&[(0, a, t0)]),
            BTreeSet::from([1]),
            t0,
            busy(2, &["a", "n1"], Some(at(30) + Duration::from_millis(1))),
        ),
        (
            "slots beyond the budget are ignored",
            view(&[(0, a, t0), (1, b, t0), (2, None, t0)]),
            none.clone(),
            t0,
            busy(2, &["a", "b"], Some(at(30) + Duration::from_millis(1))),
        ),
        (
            "one holder of both slots is named once",
            view(&[(0, a, t0), (1, a, t0)]),
            none.clone(),
            t0,
            busy(2, &["a"], Some(at(30) + Duration::from_millis(1))),
        ),
    ];
    for (what, v, local, now, want) in cases {
        assert_eq!(choose(&v, 2, me, &local, &skips, now), want, "{what}");
    }
}

#[test]
fn a_slot_that_answered_409_waits_for_the_watch_or_the_lease() {
    let t0 = Instant::now();
    let v = view(&[(0, None, t0)]);
    let skips = Skips::from([(0, (Some("1".to_string()), t0))]);
    let me = "runner-warden-n1";
    let none = BTreeSet::new();
    match choose(&v, 1, me, &none, &skips, t0) {
        Choice::Wait(b, until) => {
            assert_eq!(b.held, 1);
            assert_eq!(until, Some(t0 + CONFLICT_SKIP));
        }
        c => panic!("{c:?}"),
    }
    // The watch shows a new version: judged again.
    let newer = View {
        slots: BTreeMap::from([(0, Slot::new(lease(0, None, None, "2"), None, t0))]),
        ..v.clone()
    };
    assert_eq!(
        choose(&newer, 1, me, &none, &skips, t0),
        Choice::Try(vec![0])
    );
    // Or the skip ran out.
    assert_eq!(
        choose(&v, 1, me, &none, &skips, t0 + CONFLICT_SKIP),
        Choice::Try(vec![0])
    );
}

#[test]
fn with_two_slots_skipped_the_wait_ends_when_the_first_skip_does() {
    let t0 = Instant::now();
    let v = view(&[(0, None, t0), (1, None, t0)]);
    let late = t0 + Duration::from_secs(5);
    let skips = Skips::from([
        (0, (Some("1".to_string()), late)),
        (1, (Some("1".to_string()), t0)),
    ]);
    match choose(&v, 2, "runner-warden-n1", &BTreeSet::new(), &skips, late) {
        // Never a time already past: the waiting loop would spin until the skips end.
        Choice::Wait(b, until) => {
            assert_eq!(b.held, 2);
            assert_eq!(until, Some(t0 + CONFLICT_SKIP));
        }
        c => panic!("{c:?}"),
    }
}

#[test]
fn expiry_is_judged_by_our_clock_and_restarts_on_each_renewal_we_see() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    // The holder's clock runs 10 min ahead: its renew time says nothing, only that it changes.
    let future = Some(Timestamp::now() + SignedDuration::from_secs(600));
    let s = Slot::new(lease(0, Some("b"), future, "1"), None, t0);
    assert_eq!(s.expires(), at(30) + Duration::from_millis(1));
    // Seen again unchanged (a relist): the clock does not restart.
    let again = Slot::new(lease(0, Some("b"), future, "1"), Some(&s), at(20));
    assert_eq!(again.observed.seen, t0);
    // Renewed: it does.
    let later = Some(Timestamp::now() + SignedDuration::from_secs(610));
    let renewed = Slot::new(lease(0, Some("b"), later, "2"), Some(&again), at(20));
    assert_eq!(renewed.expires(), at(50) + Duration::from_millis(1));
}

#[test]
fn the_waiting_reason_names_the_holders() {
    let b = Busy {
        held: 2,
        max: 2,
        holders: vec!["fleet-3".into(), "fleet-7".into()],
    };
    assert_eq!(
        b.to_string(),
        "waiting for a pull slot (2 of 2 held: fleet-3, fleet-7)"
    );
}

// ---- against a mock API server ----

const NS: &str = "runner-warden";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/runner-warden/leases";

type MockBody = BoxBody<Bytes, Infallible>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Status(u16),
    Unreachable,
    /// No answer, ever.
    Hang,
}

#[derive(Default)]
struct Store {
    rv: u64,
    leases: BTreeMap<String, Lease>,
    /// Every change, for watches that start from an older version.
    log: Vec<(u64, &'static str, Lease)>,
    /// Answers forced on the next requests whose `METHOD path` starts with the key.
    faults: Vec<(String, Fault)>,
    /// Every request: `METHOD path?query`, and the body of writes.
    seen: Vec<(String, Option<Lease>)>,
}

/// The API server's Leases in one namespace.
#[derive(Clone)]
struct MockApi {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<(u64, &'static str, Lease)>,
}

fn json(code: u16, body: String) -> Response<MockBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str) -> Response<MockBody> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (mock)"), "reason": reason, "code": code,
    });
    json(code, body.to_string())
}

fn query(uri: &http::Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

impl MockApi {
    fn start() -> (Client, MockApi) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let (events, _) = broadcast::channel(1024);
        let api = MockApi {
            store: Arc::default(),
            events,
        };
        let me = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let me = me.clone();
                tokio::spawn(async move {
                    match me.answer(req).await {
                        Ok(r) => send.send_response(r),
                        Err(Fault::Hang) => {
                            std::future::pending::<()>().await;
                            drop(send);
                        }
                        Err(_) => send.send_error(std::io::Error::other("connection refused")),
                    }
                });
            }
        });
        (Client::new(service, "default"), api)
    }

    /// `Err`: the fault to act out instead of an answer.
    async fn answer(&self, req: Request<Body>) -> Result<Response<MockBody>, Fault> {
        let (parts, body) = req.into_parts();
        let body = body.collect_bytes().await.unwrap_or_default();
        let written: Option<Lease> = serde_json::from_slice(&body).ok();
        let path = parts.uri.path().to_string();
        let line = format!(
            "{} {}{}",
            parts.method,
            path,
            parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        let mut s = self.store.lock().unwrap();
        s.seen.push((line.clone(), written.clone()));
        if let Some(i) = s
            .faults
            .iter()
            .position(|(p, _)| line.starts_with(p.as_str()))
        {
            match s.faults.remove(i).1 {
                Fault::Status(code) => return Ok(status(code, "Injected")),
                Fault::Unreachable => return Err(Fault::Unreachable),
                Fault::Hang => return Err(Fault::Hang),
            }
        }
        let method = parts.method.as_str();
        if path == LEASES && method == "GET" {
            let selected = |l: &Lease| {
                l.metadata
                    .labels
                    .as_ref()
                    .is_some_and(|m| m.get(SLOT_LABEL).map(String::as_str) == Some("true"))
            };
            if query(&parts.uri, "watch").as_deref() == Some("true") {
                let from: u64 = query(&parts.uri, "resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) =
                    tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, Infallible>>();
                let line = |ty: &str, l: &Lease| {
                    let mut t = serde_json::json!({"type": ty, "object": l}).to_string();
                    t.push('\n');
                    Ok(Frame::data(Bytes::from(t)))
                };
                for (rv, ty, l) in s.log.iter().filter(|(rv, _, l)| *rv > from && selected(l)) {
                    let _ = rv;
                    let _ = tx.send(line(ty, l));
                }
                let mut sub = self.events.subscribe();
                drop(s);
                tokio::spawn(async move {
                    while let Ok((_, ty, l)) = sub.recv().await {
                        if selected(&l) && tx.send(line(ty, &l)).is_err() {
                            return;
                        }
                    }
                });
                let body = StreamBody::new(UnboundedReceiverStream::new(rx)).boxed();
                return Ok(Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(body)
                    .unwrap());
            }
            let items: Vec<&Lease> = s.leases.values().filter(|l| selected(l)).collect();
            let list = serde_json::json!({
                "kind": "LeaseList", "apiVersion": "coordination.k8s.io/v1",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items,
            });
            return Ok(json(200, list.to_string()));
        }
        let Some(mut l) = written else {
            return Ok(status(404, "NotFound"));
        };
        let name = l.metadata.name.clone().unwrap_or_default();
        let ty = match (method, path.strip_prefix(LEASES)) {
            ("POST", Some("")) => {
                if s.leases.contains_key(&name) {
                    return Ok(status(409, "AlreadyExists"));
                }
                "ADDED"
            }
            ("PUT", Some(p)) if p == format!("/{name}") => {
                let Some(cur) = s.leases.get(&name) else {
                    return Ok(status(404, "NotFound"));
                };
                if cur.metadata.resource_version != l.metadata.resource_version {
                    return Ok(status(409, "Conflict"));
                }
                "MODIFIED"
            }
            _ => return Ok(status(405, "MethodNotAllowed")),
        };
        s.rv += 1;
        let rv = s.rv;
        l.metadata.resource_version = Some(rv.to_string());
        l.metadata.namespace = Some(NS.into());
        s.leases.insert(name, l.clone());
        s.log.push((rv, ty, l.clone()));
        let _ = self.events.send((rv, ty, l.clone()));
        Ok(json(
            if ty == "ADDED" { 201 } else { 200 },
            serde_json::to_string(&l).unwrap(),
        ))
    }

    /// Another node writes slot `k` (as the API server would accept it).
    fn put(&self, k: u32, holder: Option<&str>) {
        let mut s = self.store.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        let ty = if s.leases.contains_key(&slot_name(k)) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let l = lease(k, holder, Some(Timestamp::now()), &rv.to_string());
        s.leases.insert(slot_name(k), l.clone());
        s.log.push((rv, ty, l.clone()));
        let _ = self.events.send((rv, ty, l));
    }

    fn fault(&self, prefix: &str, f: Fault) {
        self.store.lock().unwrap().faults.push((prefix.into(), f));
    }

    fn holder(&self, k: u32) -> Option<String> {
        let s = self.store.lock().unwrap();
        s.leases
            .get(&slot_name(k))?
            .spec
            .as_ref()?
            .holder_identity
            .clone()
    }

    fn lease(&self, k: u32) -> Option<Lease> {
        self.store
            .lock()
            .unwrap()
            .leases
            .get(&slot_name(k))
            .cloned()
    }

    /// The writes (POST, PUT) seen, with their bodies.
    fn writes(&self) -> Vec<(String, Lease)> {
        self.store
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|(l, _)| l.starts_with("POST") || l.starts_with("PUT"))
            .filter_map(|(l, b)| Some((l.clone(), b.clone()?)))
            .collect()
    }

    fn requests(&self) -> Vec<String> {
        self.store
            .lock()
            .unwrap()
            .seen
            .iter()
            .map(|(l, _)| l.clone())
            .collect()
    }
}

struct Agent {
    slots: PullSlots,
    metrics: Metrics,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    fn start(client: Client, node: &str, max: u32) -> Agent {
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let (slots, task) = PullSlots::new(
            client,
            NS,
            node,
            max,
            &metrics,
            Arc::new(ApiHealth::default()),
            stop.clone(),
        );
        Agent {
            slots,
            metrics,
            stop,
            task: tokio::spawn(task),
        }
    }

    async fn acquire(&self, image: &str) -> SlotGuard {
        self.slots
            .acquire(image, &CancellationToken::new())
            .await
            .unwrap()
    }
}

fn holder_of(l: &Lease) -> Option<&str> {
    l.spec.as_ref()?.holder_identity.as_deref()
}

#[tokio::test(start_paused = true)]
async fn no_limit_makes_no_request() {
    let (client, api) = MockApi::start();
    let a = Agent::start(client, "n1", 0);
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.bypass(), Some(Bypass::Unlimited));
    assert_eq!(g.slot(), None);
    g.release().await;
    tokio::time::timeout(Duration::from_secs(1), a.task)
        .await
        .expect("the task ends at once")
        .unwrap();
    assert!(a.slots.busy().is_none());
    assert_eq!(api.requests(), Vec::<String>::new());
}

#[tokio::test(start_paused = true)]
async fn an_urgent_pull_does_not_wait() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-other"));
    let a = Agent::start(client, "n1", 1);
    let urgent = a.slots.urgent();
    urgent.set(["r.io/img:1".to_string()].into());
    let at = Instant::now();
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.bypass(), Some(Bypass::Urgent));
    assert_eq!(at.elapsed(), Duration::ZERO, "at once");
    assert!(api.writes().is_empty());
    assert_eq!(a.slots.max(), 1);
    assert_eq!(PullSlots::unlimited().max(), 0);
}

#[tokio::test(start_paused = true)]
async fn after_a_409_the_slot_is_not_written_again_before_the_watch_shows_why() {
    // The winner's write has not reached this node's watch yet: the 409 alone says the slot is taken.
    let (api, _a, waiting) = a_take_that_meets_a_409();
    tokio::time::sleep(CONFLICT_SKIP - Duration::from_secs(1)).await;
    assert_eq!(api.writes().len(), 1, "tried again before the skip ended");
    assert!(!waiting.is_finished());
    waiting.abort();
}

#[tokio::test(start_paused = true)]
async fn a_pull_waiting_for_a_slot_goes_ahead_when_a_session_pod_starts_waiting_for_its_image() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-other"));
    let a = Agent::start(client, "n1", 1);
    let urgent = a.slots.urgent();
    // Another image's session pod changes nothing for this pull.
    urgent.set(["r.io/other:1".to_string()].into());
    let cancel = CancellationToken::new();
    let waited = std::cell::Cell::new(0);
    let pull = a
        .slots
        .acquire_with("r.io/img:1", &cancel, |_| waited.set(waited.get() + 1));
    tokio::pin!(pull);
    for _ in 0..5 {
        assert!(
            tokio::time::timeout(Duration::from_secs(10), &mut pull)
                .await
                .is_err(),
            "waits while the slot is renewed"
        );
        api.put(0, Some("runner-warden-other"));
    }
    let at = Instant::now();
    urgent.set(["r.io/other:1".to_string(), "r.io/img:1".to_string()].into());
    let g = pull.await.unwrap();
    assert_eq!(g.bypass(), Some(Bypass::Urgent));
    assert!(at.elapsed() < Duration::from_millis(10), "at once");
    assert_eq!(waited.get(), 1);
    assert!(api.writes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn acquiring_a_free_slot_writes_it_with_our_holder_image_and_resource_version() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-other"));
    api.put(1, None);
    let rv1 = api.lease(1).unwrap().metadata.resource_version;
    let a = Agent::start(client, "n1", 2);
    // Slot 0 is held, slot 1 released: this node takes over slot 1 from the version it read.
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.slot(), Some(1));
    let writes = api.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    let (line, body) = &writes[0];
    assert!(
        line.starts_with(&format!("PUT {LEASES}/runner-warden-pull-1")),
        "{line}"
    );
    assert_eq!(
        body.metadata.resource_version, rv1,
        "the write carries the version it read"
    );
    let l = api.lease(1).unwrap();
    assert_eq!(holder_of(&l), Some("runner-warden-n1"));
    assert_eq!(
        l.metadata.annotations.as_ref().unwrap()[IMAGE_ANNOTATION],
        "r.io/img:1"
    );
    assert_eq!(l.metadata.labels.as_ref().unwrap()[SLOT_LABEL], "true");
    assert_eq!(l.spec.as_ref().unwrap().lease_duration_seconds, Some(30));
    assert_eq!(l.spec.as_ref().unwrap().lease_transitions, Some(1));
    assert_eq!(a.metrics.pull_slot_held.get(), 1);
    assert_eq!(a.metrics.pull_slot_wait_seconds.get_sample_count(), 1);
    // Both held now (one by this node): a second pull of this node waits.
    assert_eq!(
        a.slots.busy().map(|b| b.to_string()).as_deref(),
        Some("waiting for a pull slot (2 of 2 held: n1, other)")
    );
    // Only the watch's list and watch were read: no GET of a single Lease, no polling.
    let reads: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("GET"))
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads
            .iter()
            .all(|r| r.starts_with(&format!("GET {LEASES}?"))
                && r.contains("labelSelector=runner-warden.ambient-code.io%2Fpull-slot%3Dtrue")),
        "{reads:?}"
    );

    // A slot never created: created with our holder.
    let (client, api) = MockApi::start();
    let a = Agent::start(client, "n1", 1);
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.slot(), Some(0));
    let writes = api.writes();
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].0, format!("POST {LEASES}?"));
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-n1"));
    let spec = api.lease(0).unwrap().spec.unwrap();
    assert_eq!(spec.lease_transitions, Some(0));
    // When it was taken, for `kubectl get lease -o yaml` (the renew time moves; this does not).
    assert!(spec.acquire_time.is_some() && spec.acquire_time == spec.renew_time);
}

#[tokio::test(start_paused = true)]
async fn a_slot_taken_over_while_this_node_could_not_renew_is_given_up() {
    let (client, api) = MockApi::start();
    let a = Agent::start(client, "n1", 1);
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(a.metrics.pull_slot_held.get(), 1);
    // Another node judged it expired and took it (a partition): our next renewal answers 409.
    api.put(0, Some("runner-warden-other"));
    tokio::time::sleep(RENEW_EVERY + Duration::from_secs(1)).await;
    assert_eq!(a.metrics.pull_slot_held.get(), 0);
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-other"));
    let n = api.writes().len();
    tokio::time::sleep(RENEW_EVERY * 3).await;
    assert_eq!(api.writes().len(), n, "no more renewals of a lost slot");
    // Releasing it later does not clear the other node's hold.
    g.release().await;
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-other"));
}

#[tokio::test(start_paused = true)]
async fn all_slots_held_waits_and_takes_one_when_the_watch_shows_it_released() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-fleet-3"));
    api.put(1, Some("runner-warden-fleet-7"));
    let a = Agent::start(client, "n1", 2);
    let reasons = Arc::new(Mutex::new(Vec::new()));
    let r = reasons.clone();
    let slots = a.slots.clone();
    let start = Instant::now();
    let waiting = tokio::spawn(async move {
        slots
            .acquire_with("r.io/img:1", &CancellationToken::new(), move |b| {
                r.lock().unwrap().push(b.to_string())
            })
            .await
    });
    // The holders renew (the watch shows it); nothing is written by the waiting node.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        api.put(0, Some("runner-warden-fleet-3"));
        api.put(1, Some("runner-warden-fleet-7"));
    }
    assert!(!waiting.is_finished());
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    assert_eq!(
        reasons.lock().unwrap().first().map(String::as_str),
        Some("waiting for a pull slot (2 of 2 held: fleet-3, fleet-7)")
    );
    // fleet-7 is done: released.
    let released_at = Instant::now();
    api.put(1, None);
    let g = waiting.await.unwrap().unwrap();
    assert_eq!(g.slot(), Some(1));
    assert!(
        Instant::now() - released_at <= TAKE_JITTER,
        "taken within the jitter"
    );
    assert_eq!(api.holder(1).as_deref(), Some("runner-warden-n1"));
    assert!(
        a.metrics.pull_slot_wait_seconds.get_sample_sum() >= (released_at - start).as_secs_f64()
    );
}

#[tokio::test(start_paused = true)]
async fn a_silent_holders_slot_is_taken_after_the_lease_duration_by_our_clock() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-killed"));
    let a = Agent::start(client, "n1", 1);
    let start = Instant::now();
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.slot(), Some(0));
    let waited = Instant::now() - start;
    assert!(waited > Duration::from_secs(30), "{waited:?}");
    assert!(
        waited <= Duration::from_secs(30) + TAKE_JITTER + Duration::from_millis(50),
        "{waited:?}"
    );
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-n1"));
    assert_eq!(
        api.lease(0).unwrap().spec.unwrap().lease_transitions,
        Some(1)
    );
}

#[tokio::test(start_paused = true)]
async fn a_409_makes_it_try_again() {
    // Another node's write got in first: our PUT answers 409, and the watch shows the winner, who
    // releases it a little later.
    let (api, _a, waiting) = a_take_that_meets_a_409();
    tokio::time::sleep(TAKE_JITTER + Duration::from_millis(100)).await;
    assert_eq!(api.writes().len(), 1);
    assert!(!waiting.is_finished(), "a 409 is not a slot");
    api.put(0, Some("runner-warden-winner"));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(api.writes().len(), 1, "no write while the winner holds it");
    api.put(0, None);
    let g = waiting.await.unwrap().unwrap();
    assert_eq!(g.slot(), Some(0));
    assert_eq!(api.writes().len(), 2);
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-n1"));
}

#[tokio::test(start_paused = true)]
async fn two_nodes_racing_for_one_slot_get_it_once() {
    let (client, api) = MockApi::start();
    let a = Agent::start(client.clone(), "a", 1);
    let b = Agent::start(client, "b", 1);
    let cancel = CancellationToken::new();
    let ten = Duration::from_secs(10);
    let (ga, gb) = tokio::join!(
        tokio::time::timeout(ten, a.slots.acquire("r.io/img:1", &cancel)),
        tokio::time::timeout(ten, b.slots.acquire("r.io/img:1", &cancel)),
    );
    // One holds it; the other still waits after 10 s (the holder renews).
    let (held, me) = match (ga, gb) {
        (Ok(g), Err(_)) => (g.unwrap(), "runner-warden-a"),
        (Err(_), Ok(g)) => (g.unwrap(), "runner-warden-b"),
        (a, b) => panic!("{a:?} {b:?}"),
    };
    assert_eq!(held.slot(), Some(0));
    assert_eq!(api.holder(0).as_deref(), Some(me));
    let creates = api
        .writes()
        .iter()
        .filter(|(l, _)| l.starts_with("POST"))
        .count();
    assert!((1..=2).contains(&creates));
}

#[tokio::test(start_paused = true)]
async fn the_guard_renews_while_it_lives_and_release_clears_the_holder() {
    let (client, api) = MockApi::start();
    let a = Agent::start(client, "n1", 1);
    let g = a.acquire("r.io/img:1").await;
    tokio::time::sleep(Duration::from_secs(35)).await;
    let writes = api.writes();
    // The take, then a renewal every 10 s: still ours after the lease duration.
    assert_eq!(
        writes.len(),
        4,
        "{:?}",
        writes.iter().map(|w| &w.0).collect::<Vec<_>>()
    );
    assert!(writes[1..]
        .iter()
        .all(|(l, b)| l.starts_with("PUT") && holder_of(b) == Some("runner-warden-n1")));
    g.release().await;
    let l = api.lease(0).unwrap();
    assert_eq!(holder_of(&l), None);
    assert!(!l
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key(IMAGE_ANNOTATION));
    assert_eq!(l.metadata.labels.unwrap()[SLOT_LABEL], "true");
    assert_eq!(a.metrics.pull_slot_held.get(), 0);
    let n = api.writes().len();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(api.writes().len(), n, "no renewal after the release");
    // Dropping a guard releases too (in the background).
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-n1"));
    drop(g);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.holder(0), None);
    // Stopping the agent releases what it holds.
    let _g = a.acquire("r.io/img:1").await;
    a.stop.cancel();
    a.task.await.unwrap();
    assert_eq!(api.holder(0), None);
    assert_eq!(
        a.slots
            .acquire("r.io/img:1", &CancellationToken::new())
            .await
            .unwrap()
            .bypass(),
        Some(Bypass::Stopping)
    );
}

#[tokio::test(start_paused = true)]
async fn a_restarted_agent_gives_back_the_slot_its_previous_run_held() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-n1"));
    let _a = Agent::start(client, "n1", 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(api.holder(0), None);
}

#[tokio::test(start_paused = true)]
async fn forbidden_goes_ahead_without_a_slot_at_once() {
    let (client, api) = MockApi::start();
    api.fault(&format!("GET {LEASES}"), Fault::Status(403));
    let a = Agent::start(client, "n1", 2);
    let start = Instant::now();
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.bypass(), Some(Bypass::Forbidden));
    assert!(Instant::now() - start < Duration::from_secs(1));
    // A write refused: the same.
    let (client, api) = MockApi::start();
    api.fault(&format!("POST {LEASES}"), Fault::Status(403));
    let a = Agent::start(client, "n1", 2);
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.bypass(), Some(Bypass::Forbidden));
    assert_eq!(api.holder(0), None);
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_api_server_delays_a_pull_by_the_lease_duration_at_most() {
    let (client, api) = MockApi::start();
    for _ in 0..100 {
        api.fault("GET", Fault::Unreachable);
    }
    let a = Agent::start(client, "n1", 2);
    let start = Instant::now();
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.bypass(), Some(Bypass::ApiUnreachable));
    let waited = Instant::now() - start;
    assert!(
        waited >= UNREACHABLE_GRACE && waited <= UNREACHABLE_GRACE + Duration::from_secs(1),
        "{waited:?}"
    );
    // The next pull does not wait again while it lasts.
    let start = Instant::now();
    assert_eq!(
        a.acquire("r.io/img:2").await.bypass(),
        Some(Bypass::ApiUnreachable)
    );
    assert!(Instant::now() - start < Duration::from_secs(1));
    // Writes that get no answer: the same bound.
    let (client, api) = MockApi::start();
    for _ in 0..100 {
        api.fault("POST", Fault::Unreachable);
    }
    let a = Agent::start(client, "n1", 1);
    let start = Instant::now();
    assert_eq!(
        a.acquire("r.io/img:1").await.bypass(),
        Some(Bypass::ApiUnreachable)
    );
    assert!(Instant::now() - start <= UNREACHABLE_GRACE + TAKE_RETRY + WRITE_DEADLINE);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_wait_returns_cancelled_and_holds_nothing() {
    let (client, api) = MockApi::start();
    api.put(0, Some("runner-warden-other"));
    let a = Agent::start(client, "n1", 1);
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        c.cancel();
    });
    assert_eq!(
        a.slots.acquire("r.io/img:1", &cancel).await.unwrap_err(),
        Cancelled
    );
    assert!(api.writes().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_acquire_dropped_in_the_middle_of_its_write_keeps_nothing() {
    let (client, api) = MockApi::start();
    api.fault(&format!("POST {LEASES}"), Fault::Hang);
    let a = Agent::start(client, "n1", 1);
    let cancel = CancellationToken::new();
    let r = tokio::time::timeout(
        TAKE_JITTER + Duration::from_secs(2),
        a.slots.acquire("r.io/img:1", &cancel),
    )
    .await;
    assert!(r.is_err(), "still writing when dropped");
    assert_eq!(api.writes().len(), 1);
    assert_eq!(a.slots.busy(), None, "the slot is not kept as taken");
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.slot(), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_held_slot_edited_by_someone_else_is_renewed_and_released_from_the_watchs_copy() {
    let (client, api) = MockApi::start();
    let a = Agent::start(client, "n1", 1);
    let g = a.acquire("r.io/img:1").await;
    assert_eq!(g.slot(), Some(0));
    // Someone edits the Lease (an annotation, say): still ours, at a newer resourceVersion, so this
    // node's next renewal from its own copy answers 409.
    tokio::time::sleep(Duration::from_secs(1)).await;
    api.put(0, Some("runner-warden-n1"));
    let before = api.writes().len();
    tokio::time::sleep(RENEW_EVERY + Duration::from_secs(1)).await;
    let puts = api.writes().len() - before;
    assert!(
        puts >= 2,
        "the 409'd renewal and the one from the watch's copy: {puts}"
    );
    assert_eq!(api.holder(0).as_deref(), Some("runner-warden-n1"));
    assert_eq!(a.metrics.pull_slot_held.get(), 1, "still held");
    // Edited again, then released: the release also starts again from the watch's copy.
    api.put(0, Some("runner-warden-n1"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    g.release().await;
    assert_eq!(api.holder(0).filter(|h| !h.is_empty()), None, "released");
    assert_eq!(a.metrics.pull_slot_held.get(), 0);
}

/// Slot 0 is free and this node (n1, budget 1) starts a pull whose take answers 409: another node's
/// write got in first.
fn a_take_that_meets_a_409() -> (
    MockApi,
    Agent,
    tokio::task::JoinHandle<Result<SlotGuard, Cancelled>>,
) {
    let (client, api) = MockApi::start();
    api.put(0, None);
    let a = Agent::start(client, "n1", 1);
    api.fault(
        &format!("PUT {LEASES}/runner-warden-pull-0"),
        Fault::Status(409),
    );
    let slots = a.slots.clone();
    let waiting =
        tokio::spawn(async move { slots.acquire("r.io/img:1", &CancellationToken::new()).await });
    (api, a, waiting)
}
