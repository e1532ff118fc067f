//! The fleet view on the fleet bed (`scripts/fleet up 3` after `scripts/cluster up`): simulated nodes,
//! each with a containerd of its own and an agent with its own NODE_NAME, against the one API server.
//! What an operator asks — `kubectl get nri`, `runner-warden fleet` — answered right, and the write
//! rates the object promises.

mod common;

/// Named so `scripts/test` runs these with the fleet bed up (`--skip on_a_fleet::` elsewhere).
mod on_a_fleet {
    use std::collections::{BTreeSet, HashMap};
    use std::time::{Duration, Instant};

    use containerd_client::services::v1::content_client::ContentClient;
    use containerd_client::services::v1::{InfoRequest, ListStatusesRequest};

    use crate::common::cluster::{runner_pod, Cluster};
    use crate::common::fleet::{agent, agent_with, fleet_cli, restart, Fleet};
    use crate::common::registry_front::BlobFronts;
    use crate::common::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn nri(k: &Cluster, node: &str) -> Option<serde_json::Value> {
        let out = k.try_kubectl(&["get", "nri", node, "-o", "json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("nri is JSON"))
    }

    fn entry(k: &Cluster, node: &str, image: &str) -> Option<serde_json::Value> {
        nri(k, node)?["status"]["images"]
            .as_array()?
            .iter()
            .find(|e| e["image"] == image)
            .cloned()
    }

    fn images_toml(bed: &Bed, dir: &std::path::Path, image: &str) -> String {
        let host = image.split('/').next().unwrap();
        let secret = bed.secret(dir, "secret.json", host, &bed.user, &bed.password);
        format!(
            "[[images]]\nimage = \"{image}\"\npull_secret = \"{}\"\n",
            secret.display()
        )
    }

    fn writes(metrics: &str) -> f64 {
        metric(
            metrics,
            "runner_warden_node_status_writes_total{result=\"written\"}",
        )
        .unwrap_or(0.0)
    }

    #[tokio::test]
    async fn ready_on_two_failing_on_one_then_recovered_then_a_dead_agent_is_stale() {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        assert!(f.nodes >= 3, "needs 3 fleet nodes");
        let image = bed.image(&bed.push_fresh("fleet/view", &["2"]));
        // Node 3 sees the registry through a dead mirror.
        f.registry(3, true);
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        let extra = "[fleet]\nheartbeat = \"10s\"\n";
        let mut agents = Vec::new();
        for i in 1..=3 {
            agents.push(agent(&k, &bed, &f.node(i), &images, extra).await);
        }
        let only = ["--image", image.as_str()];
        let doc = wait_for(S(60), "ready on two nodes, failed on the third", || async {
            let (code, doc) = fleet_cli(&k, &only);
            let i = &doc["images"][0];
            (i["nodes"] == 3 && i["ready"] == 2 && i["failed"] == 1).then_some((code, doc))
        })
        .await;
        let (code, doc) = doc;
        assert_eq!(code, 1, "not ready everywhere: exit 1; {doc}");
        let failure = &doc["images"][0]["failures"][0];
        assert_eq!(failure["node"], "fleet-3", "{doc}");
        assert_eq!(failure["class"], "network", "{doc}");
        assert!(failure["message"].as_str().unwrap().len() <= 170, "{doc}");

        // Each object as kubectl shows it: written by its own node's agent only, owned by its Node.
        for i in 1..=3 {
            let node = format!("fleet-{i}");
            let o = nri(&k, &node).expect("object");
            assert_eq!(o["metadata"]["ownerReferences"][0]["kind"], "Node");
            assert_eq!(o["metadata"]["ownerReferences"][0]["name"], node.as_str());
            let managers: Vec<&str> = o["metadata"]["managedFields"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|m| m["manager"].as_str())
                .collect();
            let own = format!("runner-warden-{node}");
            assert!(
                !managers.is_empty() && managers.iter().all(|m| *m == own),
                "{node} written by {managers:?}"
            );
            let e = entry(&k, &node, &image).expect("entry");
            if i < 3 {
                assert_eq!(e["state"], "Ready", "{e}");
                assert!(e["digest"].as_str().unwrap().starts_with("sha256:"), "{e}");
                assert_eq!(e["pinned"], true, "{e}");
                assert!(e.get("failure").is_none(), "{e}");
            } else {
                assert_eq!(e["state"], "Failed", "{e}");
                assert_eq!(e["failure"]["class"], "network", "{e}");
                assert!(e["failure"]["since"].as_str().is_some(), "{e}");
            }
            assert_eq!(o["status"]["heartbeatSeconds"], 10);
        }
        // The printer columns.
        let table = k.kubectl(&["get", "nri", "fleet-1", "fleet-3"]);
        assert!(
            table.contains("READY") && table.contains("UPDATED"),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("fleet-1") && l.contains("1/1")),
            "{table}"
        );
        assert!(
            table
                .lines()
                .any(|l| l.starts_with("fleet-3") && l.contains("0/1")),
            "{table}"
        );

        // Node 3 recovers: its object converges and the fleet is ready everywhere.
        f.registry(3, false);
        wait_for(S(60), "node 3 ready after the mirror came back", || async {
            let (code, doc) = fleet_cli(&k, &only);
            (code == 0 && doc["images"][0]["ready"] == 3).then_some(())
        })
        .await;
        let e = entry(&k, "fleet-3", &image).unwrap();
        assert!(e.get("failure").is_none(), "{e}");

        // An agent SIGKILLed: its object is not confirmed again and shows stale (within 3 heartbeats),
        // never ready.
        agents[1].child.kill().unwrap();
        let _ = agents[1].child.wait();
        let (code, doc) = wait_for(S(60), "node 2 stale", || async {
            let (code, doc) = fleet_cli(&k, &only);
            (doc["images"][0]["stale"] == 1).then_some((code, doc))
        })
        .await;
        assert_eq!(code, 1, "{doc}");
        assert_eq!(doc["images"][0]["ready"], 2, "{doc}");
        let out = std::process::Command::new(BIN)
            .args(["fleet", "--image", &image])
            .env("KUBECONFIG", &k.kubeconfig)
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(
            table.contains("stale") && table.contains("fleet-2"),
            "{table}"
        );
        for a in &agents {
            assert!(
                !a.logs().contains(&bed.password),
                "a secret leaked into an agent log"
            );
        }
        for i in 1..=3 {
            assert!(!k
                .kubectl(&["get", "nri", &format!("fleet-{i}"), "-o", "yaml"])
                .contains(&bed.password));
        }
    }

    #[tokio::test]
    async fn writes_stay_within_their_rates_while_a_big_image_pulls_and_while_nothing_changes() {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        // 100 MiB through a proxy at 5 MB/s: a pull of about 20 s.
        let repo_tag = bed.push_fresh("fleet/big", &["50", "50"]);
        let _proxy = Proxy::start(5004, bed.registry_port(), 5_000_000, 0).await;
        let image = format!("127.0.0.1:5004/{repo_tag}");
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        let a = agent(
            &k,
            &bed,
            &f.node(1),
            &images,
            "[fleet]\nheartbeat = \"20s\"\n",
        )
        .await;
        // Progress reaches the object while bytes flow.
        let (at, before) = a
            .wait(S(60), "progress in the object", || async {
                let e = entry(&k, "fleet-1", &image)?;
                if e["state"] == "Pulling" && e["bytesDone"].as_u64()? > 0 {
                    Some((std::time::Instant::now(), writes(&a.metrics().await)))
                } else {
                    None
                }
            })
            .await;
        a.wait(S(120), "the big image ready in the object", || async {
            let e = entry(&k, "fleet-1", &image)?;
            (e["state"] == "Ready").then_some(())
        })
        .await;
        let pulled = at.elapsed().as_secs_f64();
        let during = writes(&a.metrics().await) - before;
        // At most one progress write per 10 s, plus the state changes (ready, audited).
        let allowed = (pulled / 10.0).ceil() + 3.0;
        assert!(
            pulled > 5.0,
            "the pull was too quick to measure ({pulled:.1} s)"
        );
        assert!(
            during <= allowed,
            "{during} writes in {pulled:.1} s of pulling (at most {allowed})"
        );
        // Wait for the audit to settle, then nothing changes: only the heartbeat writes.
        a.wait(S(60), "the audit result in the object", || async {
            let e = entry(&k, "fleet-1", &image)?;
            (e["audit"] != "Pending").then_some(())
        })
        .await;
        tokio::time::sleep(S(3)).await;
        let m0 = a.metrics().await;
        tokio::time::sleep(S(45)).await;
        let m1 = a.metrics().await;
        let idle = writes(&m1) - writes(&m0);
        assert!(
            idle <= 3.0,
            "{idle} writes in 45 s with nothing changing (heartbeat 20 s)"
        );
        assert!(idle >= 1.0, "no heartbeat in 45 s (heartbeat 20 s)");
        // Nothing polled in the idle window: no GET of a Secret, a Lease, a Node or anything else.
        let gets = |m: &str| -> f64 {
            m.lines()
                .filter(|l| {
                    l.starts_with("runner_warden_api_requests_total{") && l.contains("verb=\"get\"")
                })
                .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
                .sum()
        };
        assert_eq!(gets(&m1), gets(&m0), "GETs while nothing changed:\n{m1}");
    }

    /// Nodes whose containerd has an ingest in flight (bytes moving) right now.
    fn nodes_pulling(bed: &Bed, f: &Fleet, n: usize) -> Vec<String> {
        (1..=n)
            .filter_map(|i| {
                let node = f.node(i);
                let out = std::process::Command::new(&bed.ctr)
                    .arg("--address")
                    .arg(&node.socket)
                    .args(["-n", "k8s.io", "content", "active"])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout);
                (text.lines().skip(1).any(|l| !l.trim().is_empty())).then_some(node.name)
            })
            .collect()
    }

    /// Which nodes move bytes into their containerd right now: those with an ingest (`content active`)
    /// that is new or grew since the previous sample. Merely listed is not enough: an ingest whose pull
    /// was cancelled (its agent SIGKILLed) stays listed, for a later pull to resume, without moving.
    #[derive(Default)]
    struct Ingests(HashMap<(usize, String), i64>);

    impl Ingests {
        async fn moving(&mut self, f: &Fleet, n: usize) -> Vec<usize> {
            let (mut now, mut moving) = (HashMap::new(), BTreeSet::new());
            for i in 1..=n {
                let Ok(channel) = containerd_client::connect(&f.node(i).socket).await else {
                    continue;
                };
                let Ok(answer) = ContentClient::new(channel)
                    .list_statuses(ns(ListStatusesRequest { filters: vec![] }))
                    .await
                else {
                    continue;
                };
                for st in answer.into_inner().statuses {
                    let key = (i, st.r#ref);
                    if self.0.get(&key) != Some(&st.offset) {
                        moving.insert(i);
                    }
                    now.insert(key, st.offset);
                }
            }
            self.0 = now;
            moving.into_iter().collect()
        }
    }

    /// The budget as both ends see it, sampled: nodes moving bytes by their containerd, and nodes with
    /// a blob download in flight by the registry's fronts. Samples over the budget are kept, not
    /// asserted at once, so a failure shows the whole over-budget window.
    struct BudgetWatch {
        budget: usize,
        ingests: Ingests,
        start: Instant,
        most: usize,
        over: Vec<String>,
    }

    impl BudgetWatch {
        async fn new(f: &Fleet, budget: usize) -> BudgetWatch {
            let mut ingests = Ingests::default();
            // What earlier tests left listed is not this rollout's.
            ingests.moving(f, 5).await;
            BudgetWatch {
                budget,
                ingests,
                start: Instant::now(),
                most: 0,
                over: Vec::new(),
            }
        }

        async fn sample(&mut self, f: &Fleet, fronts: &BlobFronts) {
            let pulling = self.ingests.moving(f, 5).await;
            let downloading = fronts.state().downloading();
            self.most = self.most.max(pulling.len()).max(downloading.len());
            if pulling.len() > self.budget || downloading.len() > self.budget {
                self.over.push(format!(
                    "{:.1} s: containerd moving bytes on {pulling:?}, registry sending to {downloading:?}",
                    self.start.elapsed().as_secs_f64()
                ));
            }
        }
    }

    /// The digests of the image's config and layers (its manifest, as the registry serves it).
    fn blobs_of(bed: &Bed, repo_tag: &str) -> Vec<String> {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false", "--creds"])
            .arg(format!("{}:{}", bed.user, bed.password))
            .arg(format!("docker://{}", bed.image(repo_tag)))
            .output()
            .expect("skopeo inspect");
        assert!(out.status.success(), "skopeo inspect {repo_tag}");
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("manifest");
        let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
        for l in m["layers"].as_array().unwrap() {
            blobs.push(l["digest"].as_str().unwrap().to_string());
        }
        blobs
    }

    /// Of `blobs`, those node `i`'s containerd does not hold yet: what a pull must fetch (the bed's
    /// images share their base layer, which an earlier test may have brought to some nodes).
    async fn missing(f: &Fleet, i: usize, blobs: &[String]) -> BTreeSet<String> {
        let channel = containerd_client::connect(&f.node(i).socket)
            .await
            .expect("connect containerd");
        let mut content = ContentClient::new(channel);
        let mut missing = BTreeSet::new();
        for b in blobs {
            let info = content.info(ns(InfoRequest { digest: b.clone() })).await;
            match info {
                Ok(_) => {}
                Err(e) if e.code() == tonic::Code::NotFound => {
                    missing.insert(b.clone());
                }
                Err(e) => panic!("content info {b} on fleet-{i}: {e}"),
            }
        }
        missing
    }

    /// Each node fetched each blob it lacked exactly once, and none it had (`skip`: a node not judged).
    fn each_missing_blob_once(
        gets: &HashMap<(usize, String), u32>,
        lacked: &[BTreeSet<String>],
        blobs: &[String],
        skip: Option<usize>,
    ) {
        for i in (1..=5).filter(|&i| Some(i) != skip) {
            for b in blobs {
                let want = u32::from(lacked[i - 1].contains(b));
                assert_eq!(
                    gets.get(&(i, b.clone())).copied().unwrap_or(0),
                    want,
                    "fleet-{i}'s GETs of {b} (lacked: {}); all: {gets:?}",
                    want == 1
                );
            }
        }
    }

    /// The slot Leases: (name, holder identity, empty when released).
    fn slot_holders(k: &Cluster) -> Vec<(String, String)> {
        k.kubectl(&[
            "-n",
            "runner-warden",
            "get",
            "leases",
            "-l",
            "runner-warden.ambient-code.io/pull-slot=true",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.spec.holderIdentity};{end}",
        ])
        .split(';')
        .filter_map(|s| s.split_once('='))
        .map(|(n, h)| (n.to_string(), h.to_string()))
        .collect()
    }

    /// Five nodes, budget 2, a new 40 MiB image that takes seconds to pull: never more than 2 nodes
    /// pull at once (by their containerd and by the registry), and the budget costs no bandwidth —
    /// the registry serves each of the image's blobs to each node exactly once.
    #[tokio::test]
    async fn at_most_the_budget_of_nodes_pull_a_new_image_at_once_each_blob_once_per_node() {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        assert!(f.nodes >= 5, "needs 5 fleet nodes");
        let repo_tag = bed.push_fresh("fleet/budget", &["20", "20"]);
        let image = bed.image(&repo_tag);
        let blobs = blobs_of(&bed, &repo_tag);
        // 10 MB/s per blob download (layers of ~15 MB gzipped): a pull of seconds on every node. Each
        // node its own front, so the registry's side is counted per node.
        let fronts = BlobFronts::start(5, bed.registry_port(), 10_000_000).await;
        let _views = f.registry_via(&fronts.ports);
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        // Slots other tests' agents made (the default budget is 10) would only be ignored; start clean
        // so the count below is this budget's.
        let mut lacked = Vec::new();
        for i in 1..=5 {
            let m = missing(&f, i, &blobs).await;
            // The config and the two random layers are new everywhere: a real pull on every node.
            assert!(
                m.len() >= 3,
                "fleet-{i} already holds most of {repo_tag}: {m:?}"
            );
            lacked.push(m);
        }
        delete_slots(&k);
        let mut watch = BudgetWatch::new(&f, 2).await;
        let extra = "[fleet]\nmax_nodes_pulling = 2\nheartbeat = \"10s\"\n";
        let mut agents = Vec::new();
        for i in 1..=5 {
            agents.push(agent(&k, &bed, &f.node(i), &images, extra).await);
        }
        // Sampled every 200 ms until the image is ready everywhere.
        let deadline = Instant::now() + S(180);
        loop {
            watch.sample(&f, &fronts).await;
            let (code, doc) = fleet_cli(&k, &["--image", &image]);
            if code == 0 && doc["images"][0]["ready"] == 5 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not ready on 5 nodes in 180 s: {doc}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = fronts.state();
        eprintln!(
            "ready on 5 nodes {:?} after the agents started; most nodes pulling at once: {} by \
             containerd, {} by the registry",
            watch.start.elapsed(),
            watch.most,
            st.peak_nodes
        );
        assert!(
            watch.over.is_empty(),
            "over the budget of 2: {:#?}",
            watch.over
        );
        assert!(watch.most >= 1, "no pull was ever seen in flight");
        assert!(
            (1..=2).contains(&st.peak_nodes),
            "the registry sent blobs to {} nodes at once",
            st.peak_nodes
        );
        // Every blob a node lacked once: none fetched twice (a pull restarted or a slot taken twice),
        // none skipped, nothing else fetched.
        each_missing_blob_once(&st.gets, &lacked, &blobs, None);
        let expected: usize = lacked.iter().map(BTreeSet::len).sum();
        assert_eq!(st.gets.len(), expected, "{:?}", st.gets);
        // Every slot is given back once the pulls ended (holder cleared), and no more than 2 exist.
        let slots = slot_holders(&k);
        assert!(!slots.is_empty() && slots.len() <= 2, "{slots:?}");
        wait_for(S(30), "every slot released", || async {
            slot_holders(&k)
                .iter()
                .all(|(_, h)| h.is_empty())
                .then_some(())
        })
        .await;
        drop(agents);
    }

    /// Five nodes, budget 2, a slow new image: the agent of a node holding a slot while its bytes flow
    /// is SIGKILLed. Its slot goes to another node once that node saw the Lease unchanged for the lease
    /// duration (30 s, plus its 0–3 s jitter: within 35 s of the kill, and not before the last renewal
    /// could have expired); the killed node's agent, started again, finishes the rollout; and at no
    /// sampled moment did more than 2 nodes pull — the killed node's containerd included, which stops
    /// pulling when its agent's CRI call goes away.
    #[tokio::test]
    async fn a_sigkilled_slot_holder_s_slot_goes_to_another_node_within_the_lease() {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        assert!(f.nodes >= 5, "needs 5 fleet nodes");
        let repo_tag = bed.push_fresh("fleet/killed", &["20", "20"]);
        let image = bed.image(&repo_tag);
        let blobs = blobs_of(&bed, &repo_tag);
        // 1 MB/s per blob download: about 16 s a pull (two ~15 MB gzipped layers side by side), so
        // nodes still wait when the dead holder's slot expires (3 nodes behind the other slot).
        let fronts = BlobFronts::start(5, bed.registry_port(), 1_000_000).await;
        let _views = f.registry_via(&fronts.ports);
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        let mut lacked = Vec::new();
        for i in 1..=5 {
            let m = missing(&f, i, &blobs).await;
            // The config and the two random layers are new everywhere: a real pull on every node.
            assert!(
                m.len() >= 3,
                "fleet-{i} already holds most of {repo_tag}: {m:?}"
            );
            lacked.push(m);
        }
        delete_slots(&k);
        let mut watch = BudgetWatch::new(&f, 2).await;
        let extra = "[fleet]\nmax_nodes_pulling = 2\nheartbeat = \"10s\"\n";
        let mut agents = Vec::new();
        for i in 1..=5 {
            agents.push(agent(&k, &bed, &f.node(i), &images, extra).await);
        }
        // A holder mid-pull: its Lease names it and the registry is sending it blobs (4 MiB already).
        let deadline = Instant::now() + S(60);
        let (slot, victim) = loop {
            watch.sample(&f, &fronts).await;
            let st = fronts.state();
            let found = slot_holders(&k).into_iter().find_map(|(slot, h)| {
                let i: usize = h.strip_prefix("runner-warden-fleet-")?.parse().ok()?;
                (st.in_flight[i] > 0 && st.bytes[i] > 4 << 20).then_some((slot, i))
            });
            if let Some(found) = found {
                break found;
            }
            assert!(Instant::now() < deadline, "no holder mid-pull in 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let dead = format!("runner-warden-fleet-{victim}");
        // std's Child::kill is SIGKILL: no release, no goodbye.
        agents[victim - 1].child.kill().unwrap();
        agents[victim - 1].child.wait().unwrap();
        let killed = Instant::now();
        let mut downloads_stopped = None;
        let (taken_after, taker) = loop {
            watch.sample(&f, &fronts).await;
            if downloads_stopped.is_none() && fronts.state().in_flight[victim] == 0 {
                downloads_stopped = Some(killed.elapsed());
            }
            let holder = k.kubectl(&[
                "-n",
                "runner-warden",
                "get",
                "lease",
                &slot,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ]);
            if !holder.is_empty() && holder != dead {
                break (killed.elapsed(), holder);
            }
            assert!(
                killed.elapsed() < S(35),
                "{slot} still held by {holder:?} 35 s after its holder {dead} was SIGKILLed"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // The others last saw it renewed at most 10 s before the kill: taking it sooner than 20 s after
        // would take a live holder's slot.
        assert!(
            taken_after >= S(19),
            "{slot} taken by {taker} only {taken_after:?} after the kill"
        );
        let downloads_stopped =
            downloads_stopped.expect("the killed node's downloads never stopped");
        restart(&mut agents[victim - 1], &f.node(victim));
        let deadline = Instant::now() + S(120);
        loop {
            watch.sample(&f, &fronts).await;
            let (code, doc) = fleet_cli(&k, &["--image", &image]);
            if code == 0 && doc["images"][0]["ready"] == 5 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not ready on 5 nodes 120 s after the restart: {doc}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let st = fronts.state();
        let other = if victim == 1 { 2 } else { 1 };
        let gets = |i: usize| -> u32 {
            st.gets
                .iter()
                .filter(|((n, _), _)| *n == i)
                .map(|(_, c)| c)
                .sum()
        };
        eprintln!(
            "fleet-{victim} SIGKILLed holding {slot}; its downloads stopped {downloads_stopped:?} after, \
             {taker} took the slot {taken_after:?} after; ready everywhere {:?} after the agents started; \
             fleet-{victim} received {} blob bytes in {} GETs ({} of them ranged), fleet-{other} {} in {}",
            watch.start.elapsed(),
            st.bytes[victim],
            gets(victim),
            st.ranged[victim],
            st.bytes[other],
            gets(other),
        );
        // The pull the kill cut short is fetched again, by the restarted agent; every other node
        // fetched each blob it lacked once.
        each_missing_blob_once(&st.gets, &lacked, &blobs, Some(victim));
        assert!(
            watch.over.is_empty(),
            "over the budget of 2: {:#?}",
            watch.over
        );
        wait_for(S(30), "every slot released", || async {
            slot_holders(&k)
                .iter()
                .all(|(_, h)| h.is_empty())
                .then_some(())
        })
        .await;
        drop(agents);
    }

    /// A slot Lease held by a node that is not on the bed, for an hour (renewed by nobody, but not
    /// expired by any agent's clock before the test ends).
    fn hold_slot(k: &Cluster, k_slot: u32) {
        // The namespace too: this may run before any agent made it.
        k.apply(&format!(
            r#"apiVersion: v1
kind: Namespace
metadata: {{name: runner-warden}}
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata:
  name: runner-warden-pull-{k_slot}
  namespace: runner-warden
  labels: {{runner-warden.ambient-code.io/pull-slot: "true"}}
spec:
  holderIdentity: runner-warden-elsewhere
  leaseDurationSeconds: 3600
"#
        ));
    }

    fn delete_slots(k: &Cluster) {
        k.kubectl(&[
            "-n",
            "runner-warden",
            "delete",
            "leases",
            "-l",
            "runner-warden.ambient-code.io/pull-slot=true",
        ]);
    }

    #[tokio::test]
    async fn a_node_waits_for_a_slot_with_its_reason_until_a_session_pod_there_needs_the_image() {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        let image = bed.image(&bed.push_fresh("fleet/urgent", &["2"]));
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        delete_slots(&k);
        hold_slot(&k, 0);
        let extra = "[fleet]\nmax_nodes_pulling = 1\nheartbeat = \"10s\"\n";
        let a = agent(&k, &bed, &f.node(1), &images, extra).await;
        let e = wait_for(S(60), "Waiting with its reason on fleet-1", || async {
            entry(&k, "fleet-1", &image)
                .filter(|e| e["state"] == "Waiting" && e["reason"].is_string())
        })
        .await;
        assert_eq!(
            e["reason"], "every pull slot is held (fleet.max_nodes_pulling = 1)",
            "{e}"
        );
        // It keeps waiting: nothing moves while the slot is held.
        tokio::time::sleep(S(5)).await;
        let mut ingests = Ingests::default();
        ingests.moving(&f, 1).await;
        tokio::time::sleep(S(1)).await;
        assert!(ingests.moving(&f, 1).await.is_empty());
        assert_eq!(entry(&k, "fleet-1", &image).unwrap()["state"], "Waiting");

        // A session pod on fleet-1 waits for the image (Pending, its container not started): the agent
        // pulls it at once, without the slot.
        let pod = runner_pod("default", "urgent-session", &image, "", "{}")
            .replace(&format!("nodeName: {}", k.node), "nodeName: fleet-1");
        k.apply(&pod);
        let ready = wait_for(
            S(60),
            "ready on fleet-1 for the waiting session",
            || async { entry(&k, "fleet-1", &image).filter(|e| e["state"] == "Ready") },
        )
        .await;
        assert!(ready.get("reason").is_none(), "{ready}");
        let holder = k.kubectl(&[
            "-n",
            "runner-warden",
            "get",
            "lease",
            "runner-warden-pull-0",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        assert_eq!(holder, "runner-warden-elsewhere", "the slot was not taken");
        assert!(
            a.logs()
                .contains("a session pod on this node waits for the image"),
            "{}",
            a.logs()
        );
        // No kubelet runs for fleet-1: the pod goes only when forced.
        k.kubectl(&[
            "-n",
            "default",
            "delete",
            "pod",
            "urgent-session",
            "--grace-period=0",
            "--force",
        ]);
        delete_slots(&k);
        drop(a);
    }

    /// Lines of the bed registry's log from byte `from` on (it logs each request it challenges: every
    /// resolution starts unauthenticated, containerd's and the reporter's alike).
    fn registry_log(bed: &Bed, from: u64) -> String {
        let text = std::fs::read(bed.dir.join("registry.log")).unwrap_or_default();
        String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned()
    }

    fn registry_log_len(bed: &Bed) -> u64 {
        std::fs::metadata(bed.dir.join("registry.log"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The digest the reporter published for `image`.
    fn published(k: &Cluster, image: &str) -> Option<String> {
        let out = k.try_kubectl(&[
            "-n",
            "runner-warden",
            "get",
            "configmap",
            "runner-warden-resolved-tags",
            "-o",
            "jsonpath={.data.resolved-tags\\.json}",
        ]);
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        doc["tags"][image].as_str().map(String::from)
    }

    /// `ctr images ls` of node `i`: (record name, pinned).
    fn records(bed: &Bed, f: &Fleet, i: usize) -> Vec<(String, bool)> {
        let out = std::process::Command::new(&bed.ctr)
            .arg("--address")
            .arg(&f.node(i).socket)
            .args(["-n", "k8s.io", "images", "ls"])
            .output()
            .expect("ctr images ls");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| {
                let name = l.split_whitespace().next()?.to_string();
                Some((name, l.contains("io.cri-containerd.pinned=pinned")))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_moved_tag_is_resolved_by_the_reporter_alone_and_re_pulled_once_per_node_under_the_budget(
    ) {
        let _g = serial().await;
        let (bed, k, f) = (Bed::get(), Cluster::get(), Fleet::get());
        assert!(f.nodes >= 5, "needs 5 fleet nodes");
        let repo_tag = bed.push_fresh("fleet/moved", &["20"]);
        let _proxy = Proxy::start(5002, bed.registry_port(), 10_000_000, 0).await;
        let image = format!("127.0.0.1:5002/{repo_tag}");
        let name = image.rsplit_once(':').unwrap().0.to_string();
        let repo = repo_tag.split(':').next().unwrap().to_string();
        let dir = tempfile::tempdir().unwrap();
        let images = images_toml(&bed, dir.path(), &image);
        delete_slots(&k);
        // The reporter re-resolves every 10 s; a node would itself only every hour.
        let prewarm = "resolve_interval = \"10s\"\n";
        let extra = "[fleet]\nmax_nodes_pulling = 2\nheartbeat = \"10s\"\n";
        let mut agents = Vec::new();
        for i in 1..=5 {
            agents.push(agent_with(&k, &bed, &f.node(i), prewarm, &images, extra).await);
        }
        wait_for(S(180), "ready on 5 nodes", || async {
            let (code, doc) = fleet_cli(&k, &["--image", &image]);
            (code == 0 && doc["images"][0]["ready"] == 5).then_some(())
        })
        .await;
        let old = wait_for(S(30), "the tag's digest published", || async {
            published(&k, &image)
        })
        .await;
        let old_ids: Vec<String> = (1..=5)
            .map(|i| {
                entry(&k, &f.node(i).name, &image).unwrap()["digest"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        let successes = |m: &str| {
            metric(m, "runner_warden_prewarm_pulls_total{result=\"success\"}").unwrap_or(0.0)
        };
        let mut before = Vec::new();
        for a in &agents {
            before.push(successes(&a.metrics().await));
        }

        // The tag moves: other content (pushed before the clock starts) copied under it.
        let other = bed.push_fresh("fleet/moved-next", &["20"]);
        let log_from = registry_log_len(&bed);
        retag(&bed, &other, &repo_tag);
        let deadline = std::time::Instant::now() + S(180);
        let mut most = 0;
        loop {
            let pulling = nodes_pulling(&bed, &f, 5);
            assert!(
                pulling.len() <= 2,
                "{} nodes pulling at once: {pulling:?}",
                pulling.len()
            );
            most = most.max(pulling.len());
            let moved = (1..=5).all(|i| {
                entry(&k, &f.node(i).name, &image).is_some_and(|e| {
                    e["state"] == "Ready" && e["digest"].as_str() != Some(old_ids[i - 1].as_str())
                })
            });
            if moved {
                break;
            }
            if std::time::Instant::now() >= deadline {
                let entries: Vec<_> = (1..=5)
                    .map(|i| entry(&k, &f.node(i).name, &image))
                    .collect();
                let logs: Vec<String> = agents
                    .iter()
                    .map(|a| {
                        let l = a.logs();
                        let lines: Vec<&str> = l
                            .lines()
                            .filter(|l| {
                                l.contains("tag") || l.contains("digest") || l.contains("reporter")
                            })
                            .collect();
                        lines[lines.len().saturating_sub(15)..].join("\n")
                    })
                    .collect();
                panic!(
                    "the moved tag did not reach 5 nodes in 180 s; published {:?} (was {old}); entries {entries:?}; old ids {old_ids:?}\n{}",
                    published(&k, &image),
                    logs.join("\n-----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            most >= 1,
            "no pull of the new digest was ever seen in flight"
        );
        let new = published(&k, &image).unwrap();
        assert_ne!(new, old);
        // Every node pulled the new content exactly once.
        for (i, a) in agents.iter().enumerate() {
            let m = a.metrics().await;
            assert_eq!(successes(&m) - before[i], 1.0, "fleet-{}: {m}", i + 1);
        }
        // Only the reporter asked the registry about the tag; nodes asked for the digest. containerd
        // starts every resolution unauthenticated, and the registry logs each such challenge with its
        // URI and user agent (the reporter's client, which keeps Basic auth per host, need not be).
        let log = registry_log(&bed, log_from);
        let tag_uri = format!("http.request.uri=/v2/{repo}/manifests/v1 ");
        let by_containerd = log
            .lines()
            .filter(|l| l.contains(&tag_uri) && l.contains("useragent=\"containerd"))
            .count();
        assert_eq!(by_containerd, 0, "a node resolved the tag itself:\n{log}");
        let digest_uri = format!("http.request.uri=\"/v2/{repo}/manifests/{new}\"");
        assert!(
            log.lines().any(|l| l.contains(&digest_uri)),
            "no node asked for the new digest:\n{log}"
        );
        let mut resolved = 0.0;
        for a in &agents {
            resolved += metric(
                &a.metrics().await,
                "runner_warden_tag_resolutions_total{result=\"resolved\"}",
            )
            .unwrap_or(0.0);
        }
        assert!(
            resolved >= 2.0,
            "the reporter resolved the tag {resolved} times"
        );
        // On each node: the tag and the new digest pinned, the old digest's pin gone.
        for i in 1..=5 {
            let recs = wait_for(S(30), "the old digest unpinned", || async {
                let r = records(&bed, &f, i);
                let pinned = |rec: &str| r.iter().any(|(n, p)| n == rec && *p);
                (pinned(&image)
                    && pinned(&format!("{name}@{new}"))
                    && !pinned(&format!("{name}@{old}")))
                .then_some(r)
            })
            .await;
            assert!(
                recs.iter().any(|(n, _)| n == &format!("{name}@{new}")),
                "fleet-{i}: {recs:?}"
            );
        }
        drop(agents);
        delete_slots(&k);
    }
}
