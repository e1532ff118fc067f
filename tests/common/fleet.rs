//! The fleet bed (`scripts/fleet up N`): simulated nodes, each with a containerd of its own and a Node
//! object, against the cluster's API server; an agent per node started here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::cluster::Cluster;
use super::{free_port, Agent, Bed, BIN};

pub struct Fleet {
    pub dir: PathBuf,
    pub nodes: usize,
}

pub struct FleetNode {
    pub name: String,
    pub socket: PathBuf,
}

impl Fleet {
    pub fn get() -> Fleet {
        let bed =
            std::env::var("RW_TESTBED").unwrap_or_else(|_| "/var/tmp/runner-warden-testbed".into());
        let dir = Path::new(&bed).join("fleet");
        let env = std::fs::read_to_string(dir.join("env"))
            .expect("the fleet bed is not up: run scripts/fleet up 3 (scripts/test does)");
        let nodes = env
            .lines()
            .find_map(|l| l.strip_prefix("RW_FLEET_NODES="))
            .and_then(|n| n.parse().ok())
            .expect("RW_FLEET_NODES");
        Fleet { dir, nodes }
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> FleetNode {
        assert!(
            (1..=self.nodes).contains(&i),
            "the fleet bed has {} nodes",
            self.nodes
        );
        let name = format!("fleet-{i}");
        FleetNode {
            socket: self.dir.join(&name).join("containerd.sock"),
            name,
        }
    }

    /// Node `i` sees the bed's registry through a dead mirror (`dead`) or directly again.
    pub fn registry(&self, i: usize, dead: bool) {
        let ok = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fleet"))
            .args([
                "registry",
                &i.to_string(),
                if dead { "dead" } else { "live" },
            ])
            .status()
            .expect("scripts/fleet registry")
            .success();
        assert!(ok, "scripts/fleet registry {i}");
    }

    /// Node `i` sees the bed's registry through 127.0.0.1:`ports[i - 1]` until the guard drops (then
    /// directly again, even when the test failed: later tests expect every node's view live).
    pub fn registry_via(&self, ports: &[u16]) -> RegistryViews {
        for (i, port) in ports.iter().enumerate() {
            let ok = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fleet"))
                .args(["registry", &(i + 1).to_string(), "via", &port.to_string()])
                .status()
                .expect("scripts/fleet registry via")
                .success();
            assert!(ok, "scripts/fleet registry {} via {port}", i + 1);
        }
        RegistryViews(ports.len())
    }
}

/// Nodes 1..=n see the registry through a test's fronts; dropped, they see it directly again.
pub struct RegistryViews(usize);

impl Drop for RegistryViews {
    fn drop(&mut self) {
        for i in 1..=self.0 {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fleet"))
                .args(["registry", &i.to_string(), "live"])
                .status();
        }
    }
}

/// `runner-warden run --kubernetes` for `node` as the runner-warden ServiceAccount: its own containerd,
/// NODE_NAME and metrics port; `images` is TOML of [[images]] tables, `extra` more TOML.
pub async fn agent(k: &Cluster, bed: &Bed, node: &FleetNode, images: &str, extra: &str) -> Agent {
    agent_with(k, bed, node, "", images, extra).await
}

/// `agent` with more `[prewarm]` keys (`prewarm`, TOML lines).
pub async fn agent_with(
    k: &Cluster,
    bed: &Bed,
    node: &FleetNode,
    prewarm: &str,
    images: &str,
    extra: &str,
) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = k.agent_kubeconfig(dir.path()).await;
    let port = free_port();
    let config = dir.path().join("config.toml");
    let text = Agent::config_text(bed, port, dir.path(), prewarm, images).replace(
        &format!("socket = \"{}\"", bed.socket.display()),
        &format!("socket = \"{}\"", node.socket.display()),
    );
    std::fs::write(&config, format!("{text}{extra}")).unwrap();
    let child = spawn(&config, &kubeconfig, node, dir.path());
    Agent {
        child,
        dir,
        config,
        port,
    }
}

fn spawn(config: &Path, kubeconfig: &Path, node: &FleetNode, dir: &Path) -> std::process::Child {
    // Appended: a restarted agent's log follows its previous run's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    Command::new(BIN)
        .args([
            "--log-level",
            "runner_warden=debug,info",
            "run",
            "--kubernetes",
            "--config",
        ])
        .arg(config)
        .env("KUBECONFIG", kubeconfig)
        .env("NODE_NAME", &node.name)
        .env("POD_NAMESPACE", "runner-warden")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start agent")
}

/// Starts `node`'s agent again after it died: the same config file, kubeconfig, state and metrics port.
pub fn restart(a: &mut Agent, node: &FleetNode) {
    assert!(
        a.child.try_wait().unwrap().is_some(),
        "the agent still runs"
    );
    a.child = spawn(
        &a.config,
        &a.dir.path().join("agent.kubeconfig"),
        node,
        a.dir.path(),
    );
}

/// `runner-warden fleet ARGS --output json` as the cluster admin: (exit code, document).
pub fn fleet_cli(k: &Cluster, args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(BIN)
        .arg("fleet")
        .args(args)
        .args(["--output", "json"])
        .env("KUBECONFIG", &k.kubeconfig)
        .output()
        .expect("runner-warden fleet");
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "fleet printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), doc)
}
