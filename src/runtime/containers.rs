//! Running containers through CRI (kubelet's labels say which pod they belong to) and their processes
//! through containerd's task service.

use std::collections::BTreeMap;

use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::ListPidsRequest;

use super::cri::runtime_service_client::RuntimeServiceClient;
use super::cri::{
    ContainerFilter, ContainerState, ContainerStateValue, ContainerStatus, ContainerStatusRequest,
    ListContainersRequest,
};
use super::errors::RuntimeError;
use super::Runtime;

pub const LABEL_CONTAINER_NAME: &str = "io.kubernetes.container.name";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";

/// A running container and the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ContainerRef {
    pub id: String,
    pub name: String,
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
}

impl ContainerRef {
    pub fn from_labels(
        id: String,
        fallback_name: String,
        labels: &BTreeMap<String, String>,
    ) -> Self {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let name = labels
            .get(LABEL_CONTAINER_NAME)
            .cloned()
            .unwrap_or(fallback_name);
        Self {
            id,
            name,
            pod: get(LABEL_POD_NAME),
            namespace: get(LABEL_POD_NAMESPACE),
            pod_uid: get(LABEL_POD_UID),
        }
    }
}

impl Runtime {
    pub(crate) fn cri_runtime(&self) -> RuntimeServiceClient<tonic::transport::Channel> {
        RuntimeServiceClient::new(self.channel.clone())
    }

    /// Every running container CRI knows.
    pub async fn running_containers(&self) -> Result<Vec<ContainerRef>, RuntimeError> {
        self.containers_in(ContainerState::ContainerRunning).await
    }

    /// Every container CRI knows in `state`.
    pub async fn containers_in(
        &self,
        state: ContainerState,
    ) -> Result<Vec<ContainerRef>, RuntimeError> {
        let resp = self
            .cri_runtime()
            .list_containers(self.timed(ListContainersRequest {
                filter: Some(ContainerFilter {
                    state: Some(ContainerStateValue {
                        state: state as i32,
                    }),
                    ..Default::default()
                }),
            }))
            .await
            .map_err(|s| RuntimeError::call("ListContainers", self.socket(), s))?;
        Ok(resp
            .into_inner()
            .containers
            .into_iter()
            .map(|c| {
                let labels: BTreeMap<String, String> = c.labels.into_iter().collect();
                let fallback = c.metadata.map(|m| m.name).unwrap_or_default();
                ContainerRef::from_labels(c.id, fallback, &labels)
            })
            .collect())
    }

    /// A container's CRI status with its pod; `None` when CRI does not know it (a sandbox's task, or
    /// already removed).
    pub async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<(ContainerRef, ContainerStatus)>, RuntimeError> {
        let resp = self
            .cri_runtime()
            .container_status(self.timed(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            }))
            .await;
        let status = match resp {
            Ok(r) => r.into_inner().status,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(RuntimeError::call("ContainerStatus", self.socket(), s)),
        };
        Ok(status.map(|st| {
            let labels: BTreeMap<String, String> = st
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let fallback = st
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            (
                ContainerRef::from_labels(st.id.clone(), fallback, &labels),
                st,
            )
        }))
    }

    /// The host pid of a running container's first process (CRI's verbose status).
    pub async fn container_init_pid(&self, id: &str) -> Option<u32> {
        let resp = self
            .cri_runtime()
            .container_status(self.timed(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            }))
            .await
            .ok()?
            .into_inner();
        let info: serde_json::Value = serde_json::from_str(resp.info.get("info")?).ok()?;
        info.get("pid")?.as_u64().map(|p| p as u32)
    }

    /// Host pids of every process of a container; empty when its task is gone.
    pub async fn container_pids(&self, container_id: &str) -> Result<Vec<u32>, RuntimeError> {
        let resp = TasksClient::new(self.channel.clone())
            .list_pids(self.unary(ListPidsRequest {
                container_id: container_id.to_string(),
            }))
            .await;
        match resp {
            Ok(r) => Ok(r
                .into_inner()
                .processes
                .into_iter()
                .map(|p| p.pid)
                .collect()),
            // Deleted between list and read: normal churn, not an error.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(Vec::new()),
            Err(s) => Err(RuntimeError::call("tasks.ListPids", self.socket(), s)),
        }
    }
}
