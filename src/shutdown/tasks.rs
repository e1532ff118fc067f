//! What the shutdown timer needs from the node, as a trait: containerd's task events, CRI's containers
//! and their status, an image's STOPSIGNAL, and PID 1's shape in `/proc`. The agent uses containerd;
//! unit tests drive the timer with an in-memory fake.

use std::future::Future;
use std::pin::Pin;

use containerd_client::types::Envelope;
use futures::Stream;

use crate::runtime::containers::ContainerRef;
use crate::runtime::cri::{ContainerState, ContainerStatus};
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

/// The envelopes of a task-event subscription; ends when containerd goes away.
pub type TaskEvents = Pin<Box<dyn Stream<Item = Result<Envelope, tonic::Status>> + Send>>;

pub trait TaskRuntime: Clone + Send + Sync + 'static {
    /// The containerd namespace whose events count.
    fn namespace(&self) -> &str;
    fn subscribe_tasks(&self) -> impl Future<Output = Result<TaskEvents, RuntimeError>> + Send;
    fn containers_in(
        &self,
        state: ContainerState,
    ) -> impl Future<Output = Result<Vec<ContainerRef>, RuntimeError>> + Send;
    /// `None` when CRI does not know the id (a sandbox's task, or already removed).
    fn container_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<(ContainerRef, ContainerStatus)>, RuntimeError>> + Send;
    fn container_init_pid(&self, id: &str) -> impl Future<Output = Option<u32>> + Send;
    /// The image's STOPSIGNAL (empty when unset); `None` when containerd cannot say.
    fn image_stop_signal(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<String>, RuntimeError>> + Send;
    /// PID 1's command name and whether it has children.
    fn pid1_shape(&self, pid: u32) -> Option<(String, bool)>;
}

impl TaskRuntime for Runtime {
    fn namespace(&self) -> &str {
        Runtime::namespace(self)
    }

    async fn subscribe_tasks(&self) -> Result<TaskEvents, RuntimeError> {
        Ok(Box::pin(Runtime::subscribe_tasks(self).await?))
    }

    async fn containers_in(
        &self,
        state: ContainerState,
    ) -> Result<Vec<ContainerRef>, RuntimeError> {
        Runtime::containers_in(self, state).await
    }

    async fn container_status(
        &self,
        id: &str,
    ) -> Result<Option<(ContainerRef, ContainerStatus)>, RuntimeError> {
        Runtime::container_status(self, id).await
    }

    async fn container_init_pid(&self, id: &str) -> Option<u32> {
        Runtime::container_init_pid(self, id).await
    }

    async fn image_stop_signal(&self, image: &str) -> Result<Option<String>, RuntimeError> {
        Runtime::image_stop_signal(self, image).await
    }

    fn pid1_shape(&self, pid: u32) -> Option<(String, bool)> {
        crate::process_audit::proc_status::pid1_shape(pid)
    }
}
