//! containerd containers, snapshots and tasks: thin typed wrappers so the CRI
//! layer reads as the lifecycle it implements.

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteProcessRequest, DeleteTaskRequest, ExecProcessRequest, GetContainerRequest, GetRequest,
    KillRequest, StartRequest, WaitRequest,
};
use containerd_client::types::Mount;
use std::collections::HashMap;

use super::{any_json, Containerd, Lease, PROCESS_TYPE_URL, SPEC_TYPE_URL};
use crate::io::StdioPaths;
use crate::{Error, Result};

/// containerd's task status values (containerd.v1.types.Status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskStatus {
    Unknown,
    Created,
    Running,
    Stopped,
    Paused,
    Pausing,
}

impl From<i32> for TaskStatus {
    fn from(v: i32) -> Self {
        match v {
            1 => TaskStatus::Created,
            2 => TaskStatus::Running,
            3 => TaskStatus::Stopped,
            4 => TaskStatus::Paused,
            5 => TaskStatus::Pausing,
            _ => TaskStatus::Unknown,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TaskInfo {
    pub status: TaskStatus,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_at: i64,
}

pub struct NewContainer<'a> {
    pub id: &'a str,
    pub image: &'a str,
    pub labels: HashMap<String, String>,
    pub spec: &'a oci_spec::runtime::Spec,
    pub snapshotter: &'a str,
    pub runtime: &'a str,
    /// Add the draft OCI `ima` namespace (see `spec::add_ima_namespace`).
    pub ima_namespace: bool,
}

/// Nanoseconds since the epoch; Go's zero time (year 1) and anything before
/// 1970 mean "unset".
fn ts_nanos(t: Option<prost_types::Timestamp>) -> i64 {
    t.filter(|t| t.seconds > 0)
        .and_then(|t| {
            t.seconds
                .checked_mul(1_000_000_000)?
                .checked_add(i64::from(t.nanos))
        })
        .unwrap_or(0)
}

impl Containerd {
    pub async fn prepare_snapshot(
        &self,
        snapshotter: &str,
        key: &str,
        parent: &str,
        lease: &Lease,
    ) -> Result<Vec<Mount>> {
        Ok(self
            .snapshots()
            .prepare(self.leased(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.to_string(),
                    key: key.to_string(),
                    parent: parent.to_string(),
                    labels: HashMap::new(),
                },
                lease,
            ))
            .await
            .map_err(|e| Error::containerd(format!("preparing snapshot {key}"), e))?
            .into_inner()
            .mounts)
    }

    pub async fn snapshot_mounts(&self, snapshotter: &str, key: &str) -> Result<Vec<Mount>> {
        Ok(self
            .snapshots()
            .mounts(self.req(MountsRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("snapshot mounts {key}"), e))?
            .into_inner()
            .mounts)
    }

    /// Bytes and inodes a snapshot uses itself (a container's writable layer).
    pub async fn snapshot_usage(&self, snapshotter: &str, key: &str) -> Result<(u64, u64)> {
        use containerd_client::services::v1::snapshots::UsageRequest;
        let u = self
            .snapshots()
            .usage(self.req(UsageRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("snapshot usage {key}"), e))?
            .into_inner();
        Ok((u.size.max(0) as u64, u.inodes.max(0) as u64))
    }

    /// Bytes and inodes of committed snapshots (image layers).
    pub async fn committed_snapshot_usage(&self, snapshotter: &str) -> Result<(u64, u64)> {
        use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, UsageRequest};
        let mut list = self
            .snapshots()
            .list(self.req(ListSnapshotsRequest {
                snapshotter: snapshotter.to_string(),
                filters: vec![],
            }))
            .await
            .map_err(|e| Error::containerd("listing snapshots", e))?
            .into_inner();
        let mut committed = Vec::new();
        while let Some(msg) = list
            .message()
            .await
            .map_err(|e| Error::containerd("listing snapshots", e))?
        {
            // Kind 3 = committed.
            committed.extend(msg.info.into_iter().filter(|i| i.kind == 3).map(|i| i.name));
        }
        let (mut bytes, mut inodes) = (0u64, 0u64);
        for key in committed {
            if let Ok(u) = self
                .snapshots()
                .usage(self.req(UsageRequest {
                    snapshotter: snapshotter.to_string(),
                    key,
                }))
                .await
            {
                let u = u.into_inner();
                bytes += u.size.max(0) as u64;
                inodes += u.inodes.max(0) as u64;
            }
        }
        Ok((bytes, inodes))
    }

    pub async fn remove_snapshot(&self, snapshotter: &str, key: &str) -> Result<()> {
        self.snapshots()
            .remove(self.req(RemoveSnapshotRequest {
                snapshotter: snapshotter.to_string(),
                key: key.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("removing snapshot {key}"), e))?;
        Ok(())
    }

    pub async fn create_container(&self, n: NewContainer<'_>, lease: &Lease) -> Result<()> {
        let spec = if n.ima_namespace {
            let mut v = serde_json::to_value(n.spec)
                .map_err(|e| Error::Internal(format!("encoding spec: {e}")))?;
            crate::spec::add_ima_namespace(&mut v);
            any_json(SPEC_TYPE_URL, &v)?
        } else {
            any_json(SPEC_TYPE_URL, n.spec)?
        };
        let now = prost_types::Timestamp::from(std::time::SystemTime::now());
        self.containers()
            .create(self.leased(
                CreateContainerRequest {
                    container: Some(Container {
                        id: n.id.to_string(),
                        labels: n.labels,
                        image: n.image.to_string(),
                        runtime: Some(Runtime {
                            name: n.runtime.to_string(),
                            options: None,
                        }),
                        spec: Some(spec),
                        snapshotter: n.snapshotter.to_string(),
                        snapshot_key: n.id.to_string(),
                        created_at: Some(now),
                        updated_at: Some(now),
                        ..Default::default()
                    }),
                },
                lease,
            ))
            .await
            .map_err(|e| Error::containerd(format!("creating container {}", n.id), e))?;
        Ok(())
    }

    pub async fn delete_container(&self, id: &str) -> Result<()> {
        self.containers()
            .delete(self.req(DeleteContainerRequest { id: id.to_string() }))
            .await
            .map_err(|e| Error::containerd(format!("deleting container {id}"), e))?;
        Ok(())
    }

    /// The OCI spec stored with a containerd container.
    pub async fn container_spec(&self, id: &str) -> Result<oci_spec::runtime::Spec> {
        let c = self
            .containers()
            .get(self.req(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(|e| Error::containerd(format!("getting container {id}"), e))?
            .into_inner()
            .container
            .ok_or_else(|| Error::NotFound(format!("container {id} not in containerd")))?;
        let spec = c
            .spec
            .ok_or_else(|| Error::Internal(format!("container {id} has no spec")))?;
        serde_json::from_slice(&spec.value)
            .map_err(|e| Error::Internal(format!("container {id} spec: {e}")))
    }

    pub async fn create_task(
        &self,
        id: &str,
        rootfs: Vec<Mount>,
        stdio: &StdioPaths,
    ) -> Result<u32> {
        let (stdin, stdout, stderr) = stdio.as_strings();
        let r = self
            .tasks()
            .create(self.req(CreateTaskRequest {
                container_id: id.to_string(),
                rootfs,
                stdin,
                stdout,
                stderr,
                terminal: stdio.terminal,
                ..Default::default()
            }))
            .await
            .map_err(|e| Error::containerd(format!("creating task {id}"), e))?;
        Ok(r.into_inner().pid)
    }

    pub async fn start_task(&self, id: &str, exec_id: &str) -> Result<u32> {
        let r = self
            .tasks()
            .start(self.req(StartRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("starting task {id}"), e))?;
        Ok(r.into_inner().pid)
    }

    /// Changes a running task's cgroup limits.
    pub async fn update_task(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        use containerd_client::services::v1::UpdateTaskRequest;
        self.tasks()
            .update(self.req(UpdateTaskRequest {
                container_id: id.to_string(),
                resources: Some(any_json(
                    "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                    resources,
                )?),
                annotations: HashMap::new(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("updating task {id}"), e))?;
        Ok(())
    }

    /// Closes a process's stdin (the shim holds its own end of the FIFO).
    pub async fn close_stdin(&self, id: &str, exec_id: &str) -> Result<()> {
        use containerd_client::services::v1::CloseIoRequest;
        self.tasks()
            .close_io(self.req(CloseIoRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                stdin: true,
            }))
            .await
            .map_err(|e| Error::containerd(format!("closing stdin of {id}"), e))?;
        Ok(())
    }

    /// Resizes the terminal of a task or exec.
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        use containerd_client::services::v1::ResizePtyRequest;
        self.tasks()
            .resize_pty(self.req(ResizePtyRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                width,
                height,
            }))
            .await
            .map_err(|e| Error::containerd(format!("resizing terminal of {id}"), e))?;
        Ok(())
    }

    pub async fn kill_task(&self, id: &str, exec_id: &str, signal: u32) -> Result<()> {
        self.tasks()
            .kill(self.req(KillRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal,
                all: exec_id.is_empty(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("signalling task {id}"), e))?;
        Ok(())
    }

    /// Blocks until the task (or exec) exits: (exit status, exited at ns).
    pub async fn wait_task(&self, id: &str, exec_id: &str) -> Result<(u32, i64)> {
        let r = self
            .tasks()
            .wait(self.req(WaitRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("waiting for task {id}"), e))?
            .into_inner();
        Ok((r.exit_status, ts_nanos(r.exited_at)))
    }

    pub async fn delete_task(&self, id: &str) -> Result<()> {
        self.tasks()
            .delete(self.req(DeleteTaskRequest {
                container_id: id.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("deleting task {id}"), e))?;
        Ok(())
    }

    /// None when the container has no task.
    pub async fn task_info(&self, id: &str) -> Result<Option<TaskInfo>> {
        match self
            .tasks()
            .get(self.req(GetRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().process.map(|p| TaskInfo {
                status: TaskStatus::from(p.status),
                pid: p.pid,
                exit_status: p.exit_status,
                exited_at: ts_nanos(p.exited_at),
            })),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(Error::containerd(format!("getting task {id}"), s)),
        }
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process: &oci_spec::runtime::Process,
        stdio: &StdioPaths,
    ) -> Result<()> {
        let (stdin, stdout, stderr) = stdio.as_strings();
        self.tasks()
            .exec(self.req(ExecProcessRequest {
                container_id: id.to_string(),
                stdin,
                stdout,
                stderr,
                terminal: stdio.terminal,
                spec: Some(any_json(PROCESS_TYPE_URL, process)?),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("exec in {id}"), e))?;
        Ok(())
    }

    pub async fn delete_process(&self, id: &str, exec_id: &str) -> Result<()> {
        self.tasks()
            .delete_process(self.req(DeleteProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await
            .map_err(|e| Error::containerd(format!("deleting exec {exec_id}"), e))?;
        Ok(())
    }
}
