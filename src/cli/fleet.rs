//! `runner-warden fleet` (also `kubectl runner-warden fleet`): reads every node's `NodeRunnerImages` with
//! one LIST and answers per image: on how many nodes it is desired, ready, pulling (with bytes), failed
//! (by class, naming the nodes) and stale — an object its agent has not confirmed within twice its
//! heartbeat (plus one more, at most a minute) counts as stale, never as ready, so a dead agent does not look healthy.
//! Exit status: 0 every desired image ready on every node, 1 otherwise (or no object at all), 2 the API
//! server could not be asked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::Serialize;

use runner_warden::report::node_status::object::{
    api_resource, NodeImagesStatus, NodeRunnerImages, PullState,
};

use super::{fail, OutputArgs, OutputFormat};

#[derive(clap::Args)]
pub struct FleetArgs {
    /// Only this image (as the agents were configured with it).
    #[arg(long, env = "RUNNER_WARDEN_FLEET_IMAGE")]
    pub image: Option<String>,
    /// Kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Slack on top of twice an object's heartbeat before it counts as stale (a write may take a while):
/// one more heartbeat, at most a minute.
const STALE_SLACK_MAX: Duration = Duration::from_secs(60);

#[derive(Debug, Default, PartialEq, Serialize)]
pub struct FleetView {
    pub images: Vec<ImageView>,
}

#[derive(Debug, Default, PartialEq, Serialize)]
pub struct ImageView {
    pub image: String,
    /// Nodes that desire it.
    pub nodes: usize,
    pub ready: usize,
    pub pulling: usize,
    pub failed: usize,
    pub stale: usize,
    pub failures: Vec<FailureView>,
    /// Table only: who is pulling how far, and which objects are stale.
    #[serde(skip)]
    pub pulling_nodes: Vec<(String, u64, u64)>,
    #[serde(skip)]
    pub stale_nodes: Vec<String>,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct FailureView {
    pub node: String,
    pub class: String,
    pub message: String,
}

/// Whether `status` was confirmed recently enough at `now`.
fn is_stale(status: &NodeImagesStatus, now: SystemTime) -> bool {
    let Ok(updated) = humantime::parse_rfc3339_weak(&status.updated) else {
        return true;
    };
    let heartbeat = Duration::from_secs(status.heartbeat_seconds);
    let allowed = heartbeat.saturating_mul(2) + heartbeat.min(STALE_SLACK_MAX);
    now.duration_since(updated).unwrap_or_default() > allowed
}

/// The per-image view of `objects` at `now`, optionally of one image only.
pub fn aggregate(objects: &[NodeRunnerImages], only: Option<&str>, now: SystemTime) -> FleetView {
    let mut by_image: BTreeMap<String, ImageView> = BTreeMap::new();
    for o in objects {
        let node = o.metadata.name.clone().unwrap_or_default();
        let Some(status) = &o.status else { continue };
        let stale = is_stale(status, now);
        for e in &status.images {
            if only.is_some_and(|i| i != e.image) {
                continue;
            }
            let v = by_image
                .entry(e.image.clone())
                .or_insert_with(|| ImageView {
                    image: e.image.clone(),
                    ..ImageView::default()
                });
            v.nodes += 1;
            if stale {
                v.stale += 1;
                v.stale_nodes.push(node.clone());
                continue;
            }
            match e.state {
                PullState::Ready => v.ready += 1,
                PullState::Pulling => {
                    v.pulling += 1;
                    v.pulling_nodes
                        .push((node.clone(), e.bytes_done, e.bytes_total));
                }
                PullState::Failed | PullState::HeldBack => {
                    v.failed += 1;
                    let (class, message) = match (&e.failure, e.state) {
                        (Some(f), _) => (f.class.clone(), f.message.clone()),
                        (None, PullState::HeldBack) => {
                            ("held_back".into(), "over this node's image caps".into())
                        }
                        (None, _) => ("other".into(), String::new()),
                    };
                    v.failures.push(FailureView {
                        node: node.clone(),
                        class,
                        message,
                    });
                }
                PullState::Waiting => {}
            }
        }
    }
    FleetView {
        images: by_image.into_values().collect(),
    }
}

impl FleetView {
    /// Every desired image ready on every node that desires it, nothing stale.
    pub fn all_ready(&self) -> bool {
        !self.images.is_empty()
            && self
                .images
                .iter()
                .all(|i| i.ready == i.nodes && i.stale == 0)
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let w = self
            .images
            .iter()
            .map(|i| i.image.len())
            .max()
            .unwrap_or(5)
            .max(5);
        out.push_str(&format!(
            "{:<w$}  {:>5}  {:>5}  {:>7}  {:>6}  {:>5}\n",
            "IMAGE", "NODES", "READY", "PULLING", "FAILED", "STALE"
        ));
        for i in &self.images {
            out.push_str(&format!(
                "{:<w$}  {:>5}  {:>5}  {:>7}  {:>6}  {:>5}\n",
                i.image, i.nodes, i.ready, i.pulling, i.failed, i.stale
            ));
            for (node, done, total) in &i.pulling_nodes {
                let of = if *total > 0 {
                    format!(" of {}", bytesize::ByteSize::b(*total))
                } else {
                    String::new()
                };
                out.push_str(&format!(
                    "  pulling on {node}: {}{of}\n",
                    bytesize::ByteSize::b(*done)
                ));
            }
            for f in &i.failures {
                out.push_str(&format!(
                    "  failed on {}: {}: {}\n",
                    f.node, f.class, f.message
                ));
            }
            if !i.stale_nodes.is_empty() {
                out.push_str(&format!(
                    "  stale (agent not heard from within twice its heartbeat): {}\n",
                    i.stale_nodes.join(", ")
                ));
            }
        }
        out
    }
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client, String> {
    let config = match kubeconfig.filter(|p| !p.to_string_lossy().contains(':')) {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => kube::Config::infer().await.map_err(|e| e.to_string())?,
    };
    kube::Client::try_from(config).map_err(|e| e.to_string())
}

pub async fn run(args: FleetArgs) -> anyhow::Result<ExitCode> {
    let client = match client(args.kubeconfig.as_deref()).await {
        Ok(c) => c,
        Err(e) => {
            let m = format!("cannot reach a cluster: {e} (set --kubeconfig or KUBECONFIG)");
            return Ok(fail(&args.output, &m, serde_json::json!({})));
        }
    };
    let api: Api<NodeRunnerImages> = Api::all_with(client, &api_resource());
    // From the API server's cache (resourceVersion 0): seconds of staleness do not matter here.
    let objects = match api.list(&ListParams::default().match_any()).await {
        Ok(l) => l.items,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let m = "the NodeRunnerImages CRD is not installed (kubectl apply -f deploy/crd/noderunnerimages.yaml, or kubectl apply -k deploy/)";
            return Ok(fail(&args.output, m, serde_json::json!({})));
        }
        Err(e) => {
            let m = format!("cannot list NodeRunnerImages: {e}");
            return Ok(fail(&args.output, &m, serde_json::json!({})));
        }
    };
    let view = aggregate(&objects, args.image.as_deref(), SystemTime::now());
    match args.output.format {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&view)?),
        OutputFormat::Table => {
            if objects.is_empty() {
                eprintln!("runner-warden: no NodeRunnerImages objects: is runner-warden running with kubernetes.enabled on the nodes?");
            } else if view.images.is_empty() {
                eprintln!(
                    "runner-warden: no node desires {}",
                    args.image.as_deref().unwrap_or("any image")
                );
            }
            print!("{}", view.table());
        }
    }
    Ok(if view.all_ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use runner_warden::report::node_status::object::{
        AuditState, FailureEntry, ImageEntry, NoSpec,
    };

    fn node(name: &str, updated: SystemTime, images: Vec<ImageEntry>) -> NodeRunnerImages {
        let mut o = NodeRunnerImages::new(name, &api_resource(), NoSpec {});
        o.status = Some(NodeImagesStatus::build(
            images,
            humantime::format_rfc3339_seconds(updated).to_string(),
            600,
        ));
        o
    }
    fn e(image: &str, state: PullState) -> ImageEntry {
        ImageEntry {
            image: image.into(),
            state,
            audit: AuditState::Passed,
            ..ImageEntry::default()
        }
    }

    #[test]
    fn ready_pulling_failed_by_class_and_stale_per_image() {
        let now = SystemTime::now();
        let fresh = now - Duration::from_secs(30);
        let dead = now - Duration::from_secs(2 * 600 + 61);
        let failed = ImageEntry {
            failure: Some(FailureEntry {
                class: "network".into(),
                message: "connection refused".into(),
                since: "t".into(),
            }),
            ..e("r:1", PullState::Failed)
        };
        let pulling = ImageEntry {
            bytes_done: 40,
            bytes_total: 100,
            ..e("r:2", PullState::Pulling)
        };
        let objects = vec![
            node(
                "a",
                fresh,
                vec![e("r:1", PullState::Ready), e("r:2", PullState::Ready)],
            ),
            node("b", fresh, vec![e("r:1", PullState::Ready), pulling]),
            node("c", fresh, vec![failed]),
            node("d", dead, vec![e("r:1", PullState::Ready)]),
        ];
        let v = aggregate(&objects, None, now);
        let r1 = &v.images[0];
        assert_eq!(
            (
                r1.image.as_str(),
                r1.nodes,
                r1.ready,
                r1.pulling,
                r1.failed,
                r1.stale
            ),
            ("r:1", 4, 2, 0, 1, 1)
        );
        assert_eq!(
            r1.failures,
            vec![FailureView {
                node: "c".into(),
                class: "network".into(),
                message: "connection refused".into()
            }]
        );
        assert_eq!(r1.stale_nodes, vec!["d".to_string()]);
        let r2 = &v.images[1];
        assert_eq!((r2.nodes, r2.ready, r2.pulling), (2, 1, 1));
        assert_eq!(r2.pulling_nodes, vec![("b".to_string(), 40, 100)]);
        assert!(!v.all_ready());
        let table = v.table();
        assert!(
            table.contains("failed on c: network: connection refused"),
            "{table}"
        );
        assert!(table.contains("pulling on b: 40 B of 100 B"), "{table}");
        assert!(
            table.contains("stale (agent not heard from within twice its heartbeat): d"),
            "{table}"
        );
        // JSON as the contract names it.
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(
            json["images"][0],
            serde_json::json!({"image": "r:1", "nodes": 4, "ready": 2, "pulling": 0, "failed": 1,
                "stale": 1, "failures": [{"node": "c", "class": "network", "message": "connection refused"}]})
        );
        // One image only.
        let only = aggregate(&objects, Some("r:2"), now);
        assert_eq!(only.images.len(), 1);
    }

    #[test]
    fn all_ready_only_when_every_node_is_ready_and_fresh() {
        let now = SystemTime::now();
        let fresh = now - Duration::from_secs(5);
        let ok = vec![
            node("a", fresh, vec![e("r:1", PullState::Ready)]),
            node("b", fresh, vec![e("r:1", PullState::Ready)]),
        ];
        assert!(aggregate(&ok, None, now).all_ready());
        assert!(
            !aggregate(&[], None, now).all_ready(),
            "nothing known is not ready"
        );
        let waiting = vec![node("a", fresh, vec![e("r:1", PullState::Waiting)])];
        assert!(!aggregate(&waiting, None, now).all_ready());
        // Within twice the heartbeat plus a minute (stamps are whole seconds) is fresh; beyond is stale.
        let edge = now - Duration::from_secs(1259);
        assert!(aggregate(
            &[node("a", edge, vec![e("r:1", PullState::Ready)])],
            None,
            now
        )
        .all_ready());
        let over = now - Duration::from_secs(1262);
        assert!(!aggregate(
            &[node("a", over, vec![e("r:1", PullState::Ready)])],
            None,
            now
        )
        .all_ready());
        // A short heartbeat: stale after three of them.
        let short = |age: u64| {
            let mut o = node(
                "a",
                now - Duration::from_secs(age),
                vec![e("r:1", PullState::Ready)],
            );
            o.status.as_mut().unwrap().heartbeat_seconds = 10;
            o
        };
        assert!(aggregate(&[short(28)], None, now).all_ready());
        assert_eq!(aggregate(&[short(32)], None, now).images[0].stale, 1);
        let garbled = {
            let mut o = node("a", fresh, vec![e("r:1", PullState::Ready)]);
            o.status.as_mut().unwrap().updated = "yesterday".into();
            o
        };
        assert_eq!(aggregate(&[garbled], None, now).images[0].stale, 1);
    }
}
