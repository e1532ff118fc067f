//! What the scanner needs from the node, as two traits: the running containers and their pids
//! (containerd: CRI `ListContainers`, `Tasks.ListPids`), and the kernel's view of each process (`/proc`,
//! cgroup files). The agent uses containerd and the host's `/proc`; unit tests use in-memory fakes.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use super::proc_status;
use crate::contract::process::ProcFacts;
use crate::runtime::containers::ContainerRef;
use crate::runtime::errors::RuntimeError;
use crate::runtime::Runtime;

pub trait ContainerLister: Send + Sync + 'static {
    fn running_containers(
        &self,
    ) -> impl Future<Output = Result<Vec<ContainerRef>, RuntimeError>> + Send;
    fn container_pids(
        &self,
        container_id: &str,
    ) -> impl Future<Output = Result<Vec<u32>, RuntimeError>> + Send;
}

impl ContainerLister for Runtime {
    async fn running_containers(&self) -> Result<Vec<ContainerRef>, RuntimeError> {
        Runtime::running_containers(self).await
    }

    async fn container_pids(&self, container_id: &str) -> Result<Vec<u32>, RuntimeError> {
        Runtime::container_pids(self, container_id).await
    }
}

/// The kernel's view of processes.
pub trait ProcFs: Send + Sync + 'static {
    /// `/proc/<pid>/status`, `Ok(None)` when the process is gone (churn, never a finding).
    fn status(&self, pid: u32, buf: &mut Vec<u8>) -> io::Result<Option<ProcFacts>>;
    /// `/proc/<tgid>/task/<tid>/status`: one thread's own credentials (pid `tid` in the facts).
    fn thread_status(
        &self,
        tgid: u32,
        tid: u32,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<ProcFacts>>;
    /// The `cgroup.procs` file listing `container_id`'s processes, found from one of them.
    fn cgroup_procs_file(&self, pid: u32, container_id: &str) -> Option<PathBuf>;
    /// Hands each pid the file lists to `each` (streamed: no list as long as the tenant's is).
    fn read_cgroup_procs(&self, file: &Path, each: &mut dyn FnMut(u32)) -> io::Result<()>;
    /// Which of `ids` the process's cgroup names, if any.
    fn container_of(&self, pid: u32, ids: &[String]) -> Option<String>;
}

/// The host's `/proc` and `/sys/fs/cgroup`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostProc;

impl ProcFs for HostProc {
    fn status(&self, pid: u32, buf: &mut Vec<u8>) -> io::Result<Option<ProcFacts>> {
        proc_status::read_with(pid, buf)
    }

    fn thread_status(
        &self,
        tgid: u32,
        tid: u32,
        buf: &mut Vec<u8>,
    ) -> io::Result<Option<ProcFacts>> {
        proc_status::read_thread_with(tgid, tid, buf)
    }

    fn cgroup_procs_file(&self, pid: u32, container_id: &str) -> Option<PathBuf> {
        proc_status::cgroup_procs_file(pid, container_id)
    }

    fn read_cgroup_procs(&self, file: &Path, each: &mut dyn FnMut(u32)) -> io::Result<()> {
        proc_status::read_cgroup_procs(file, each)
    }

    fn container_of(&self, pid: u32, ids: &[String]) -> Option<String> {
        proc_status::container_of(pid, ids)
    }
}
