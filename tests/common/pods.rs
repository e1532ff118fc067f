//! Real containers through CRI for the runtime-audit tests: a host-network sandbox (empty hostname, as
//! containerd requires) and one container with the security settings under test, labelled the way
//! kubelet labels them. Removed on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use runner_warden::runtime::cri::runtime_service_client::RuntimeServiceClient;
use runner_warden::runtime::cri::*;
use runner_warden::shutdown::probe::{host_network_namespaces, host_network_sandbox};

use super::Bed;

pub struct PodSpec {
    pub name: String,
    pub container: String,
    pub image: String,
    pub command: Vec<String>,
    pub run_as_user: Option<i64>,
    pub add_capabilities: Vec<String>,
    pub no_new_privs: bool,
    pub envs: Vec<(String, String)>,
}

impl PodSpec {
    /// A compliant runner: UID 1001, drop ALL, no_new_privs.
    pub fn runner(bed: &Bed, name: &str) -> Self {
        PodSpec {
            name: name.to_string(),
            container: "ambient-code-runner".into(),
            image: bed.image("runners/runtime:v1"),
            command: vec!["/bin/sleep".into(), "3600".into()],
            run_as_user: Some(1001),
            add_capabilities: vec![],
            no_new_privs: true,
            envs: vec![],
        }
    }

    /// A shutdown fixture (the runnerd stand-in) as container `container`, listening on `port`.
    pub fn shutdown_fixture(
        bed: &Bed,
        name: &str,
        fixture: &str,
        container: &str,
        port: u16,
    ) -> Self {
        PodSpec {
            container: container.to_string(),
            image: bed.image(&format!("runners/{fixture}:v1")),
            command: vec![],
            envs: vec![("AGUI_PORT".into(), port.to_string())],
            ..PodSpec::runner(bed, name)
        }
    }
}

pub struct Pod {
    socket: std::path::PathBuf,
    pub sandbox_id: String,
    pub container_id: String,
    pub name: String,
    /// The container's CRI log file (kubelet's format: RFC 3339 time, stream, tag, line).
    pub log: std::path::PathBuf,
    removed: bool,
}

pub const NAMESPACE: &str = "rw-test";

async fn client(bed: &Bed) -> RuntimeServiceClient<tonic::transport::Channel> {
    RuntimeServiceClient::new(
        containerd_client::connect(&bed.socket)
            .await
            .expect("connect"),
    )
}

impl Pod {
    pub async fn run(bed: &Bed, spec: PodSpec) -> Pod {
        let rt = runner_warden::runtime::Runtime::new(&bed.socket, "k8s.io");
        if rt.image_status(&spec.image).await.unwrap().is_none() {
            let cred = bed.credential();
            rt.pull_image(&spec.image, Some(&cred))
                .await
                .expect("pull the runner image");
        }
        let uid = format!(
            "{}-{}",
            spec.name,
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let logs = bed.dir.join("pods").join(&uid);
        std::fs::create_dir_all(&logs).unwrap();
        let host_network = host_network_namespaces();
        let sandbox_config = host_network_sandbox(
            &spec.name,
            &uid,
            NAMESPACE,
            &logs,
            HashMap::from([("rw-test".to_string(), "true".to_string())]),
        );
        let mut c = client(bed).await;
        let sandbox_id = c
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let labels = HashMap::from([
            (
                "io.kubernetes.container.name".to_string(),
                spec.container.clone(),
            ),
            ("io.kubernetes.pod.name".to_string(), spec.name.clone()),
            (
                "io.kubernetes.pod.namespace".to_string(),
                NAMESPACE.to_string(),
            ),
            ("io.kubernetes.pod.uid".to_string(), uid.clone()),
        ]);
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: spec.container.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: spec.image.clone(),
                annotations: HashMap::new(),
            }),
            command: spec.command.clone(),
            args: vec![],
            working_dir: String::new(),
            envs: spec
                .envs
                .iter()
                .map(|(key, value)| KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            mounts: vec![],
            labels,
            annotations: HashMap::new(),
            log_path: "container.log".into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    capabilities: Some(Capability {
                        add_capabilities: spec.add_capabilities.clone(),
                        drop_capabilities: vec!["ALL".into()],
                        add_ambient_capabilities: vec![],
                    }),
                    privileged: false,
                    namespace_options: Some(host_network),
                    run_as_user: spec.run_as_user.map(|value| Int64Value { value }),
                    run_as_username: String::new(),
                    readonly_rootfs: false,
                    no_new_privs: spec.no_new_privs,
                    run_as_group: None,
                }),
            }),
        };
        let container_id = c
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        c.start_container(StartContainerRequest {
            container_id: container_id.clone(),
        })
        .await
        .expect("StartContainer");
        Pod {
            socket: bed.socket.clone(),
            sandbox_id,
            container_id,
            name: spec.name,
            log: logs.join("container.log"),
            removed: false,
        }
    }

    /// Stops the container as kubelet would (CRI StopContainer with the grace period), after writing the
    /// stop record the agent's stop clock reads. Returns when the container has exited.
    pub async fn stop_recorded(&self, records: &std::path::Path, grace_seconds: u64) {
        runner_warden::shutdown::stop_clock::RecordedStops::new(records)
            .record(
                &self.container_id,
                std::time::Duration::from_secs(grace_seconds),
            )
            .expect("write the stop record");
        RuntimeServiceClient::new(
            containerd_client::connect(&self.socket)
                .await
                .expect("connect"),
        )
        .stop_container(StopContainerRequest {
            container_id: self.container_id.clone(),
            timeout: grace_seconds as i64,
        })
        .await
        .expect("StopContainer");
    }

    /// The host pid of the container's first process.
    pub async fn init_pid(&self) -> u32 {
        runner_warden::runtime::Runtime::new(&self.socket, "k8s.io")
            .container_init_pid(&self.container_id)
            .await
            .expect("the container runs")
    }

    pub async fn remove(mut self) {
        remove(&self.socket, &self.sandbox_id, &self.container_id).await;
        self.removed = true;
    }
}

async fn remove(socket: &std::path::Path, sandbox: &str, container: &str) {
    let rt = runner_warden::runtime::Runtime::new(socket, "k8s.io");
    runner_warden::shutdown::probe::remove_pod(&rt, Some(sandbox), Some(container)).await;
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        // A panicking test still cleans up: a runtime of its own on a thread of its own.
        let (socket, sandbox, container) = (
            self.socket.clone(),
            self.sandbox_id.clone(),
            self.container_id.clone(),
        );
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(remove(&socket, &sandbox, &container));
            }
        })
        .join();
    }
}
