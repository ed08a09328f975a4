//! Persisted lifecycle state of pod sandboxes and containers (the CRI config
//! itself is stored beside it, see `store`).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxPhase {
    /// RunPodSandbox is in progress (a crash here is rolled back at start).
    Creating,
    Ready,
    NotReady,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxState {
    pub phase: SandboxPhase,
    pub created_at: i64,
    pub runtime_handler: String,
    pub pid: u32,
    /// None: host network.
    pub netns: Option<PathBuf>,
    pub image_id: String,
    pub image_name: String,
    /// Volatile directory with hostname, hosts, resolv.conf and shm.
    pub dir: PathBuf,
    pub shm: bool,
    /// The pod's own user namespace, if it has one.
    #[serde(default)]
    pub userns: Option<UsernsState>,
    /// The `ima` setting, if enabled.
    #[serde(default)]
    pub ima: Option<ImaState>,
    /// Pod IPs from CNI, IPv4 first.
    #[serde(default)]
    pub ips: Vec<String>,
    /// A pod without a pause process: the UTS and IPC namespaces imacri
    /// pinned for its containers (None: a pause container holds them).
    #[serde(default)]
    pub pinned: Option<crate::podns::Pinned>,
    /// NRI plugins were told of its stop (once, as containerd does: a
    /// repeated StopPodSandbox is no new event).
    #[serde(default)]
    pub nri_stopped: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UsernsState {
    pub mappings: crate::userns::Mappings,
    /// Pinned namespace file.
    pub path: PathBuf,
    /// Taken from imacri's pool (freed on RemovePodSandbox), not from kubelet.
    pub allocated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImaState {
    /// What measures the pod, e.g. "kernel" or "none (measurement unavailable: ...)".
    pub backend: String,
    pub policy: String,
    pub mode: crate::integrity::policy::Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerPhase {
    Created,
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub phase: ContainerPhase,
    pub sandbox_id: String,
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub pid: u32,
    pub image_id: String,
    /// Name the image was resolved from (the CRI request's image).
    pub image_name: String,
    /// A digest reference of the image, for `image_ref`.
    pub image_ref: String,
    /// Absolute path of the CRI log; empty when kubelet asked for none.
    pub log_path: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub stop_signal: i32,
    /// containerd reported an OOM kill; the exit reason becomes OOMKilled.
    #[serde(default)]
    pub oom_killed: bool,
    /// Resources set by UpdateContainerResources (CRI protobuf), replacing
    /// the config's in ContainerStatus.
    #[serde(default)]
    pub updated_resources: Option<Vec<u8>>,
    /// The snapshot's image layers are ID-mapped at task creation (a pod
    /// user namespace without a chowned copy).
    #[serde(default)]
    pub idmapped_rootfs: bool,
    /// NRI plugins were told of its stop: once per container, when it stops
    /// (by request or on its own), else before its removal.
    #[serde(default)]
    pub nri_stopped: bool,
    /// Destinations of the pod's own memory-backed volumes CreateContainer
    /// left executable: their filesystem is marked at StartContainer. Every
    /// other executable volume is marked through the container's mount.
    #[serde(default)]
    pub tmpfs_volumes: Vec<String>,
}
