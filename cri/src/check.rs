//! `imacri check`: one line per node capability imacri needs or offers
//! (containerd, runc, user namespaces, the measurement backends and the
//! ima guards, the TPM, ...), and whether pods can run here.

use anyhow::Result;
use imacri_runtime::config::Config;
use imacri_runtime::containerd::Containerd;
use std::path::Path;
use std::time::Duration;

/// What an inode mark costs the kernel, by its own reckoning (twice an
/// inode: the mark keeps its inode in memory), which sizes the default
/// `fs.fanotify.max_user_marks` to 1% of RAM: 205 049 on 24 GiB here.
const MARK_COST: u64 = 1228;

/// One line per node capability for `imacri check`; Err if pods cannot run.
pub async fn check(cfg: &Config) -> Result<bool> {
    let mut ok = true;
    let mut line = |name: &str, good: bool, detail: String| {
        println!(
            "{:<18} {:<8} {detail}",
            name,
            if good { "ok" } else { "missing" }
        );
        if !good && matches!(name, "containerd" | "containerd-cri" | "runc") {
            ok = false;
        }
    };
    match Containerd::connect(
        &cfg.containerd.address,
        &cfg.containerd.namespace,
        Duration::from_secs(2),
    )
    .await
    {
        Ok(c) => {
            let v = c.version().await.map(|v| v.version).unwrap_or_default();
            let cri = c.cri_plugin_loaded().await.unwrap_or(false);
            line(
                "containerd",
                true,
                format!("{} at {}", v, cfg.containerd.address.display()),
            );
            line(
                "containerd-cri",
                !cri,
                if cri {
                    "containerd's CRI plugin is enabled: disable it (disabled_plugins)".into()
                } else {
                    "disabled, as required".into()
                },
            );
            match imacri_runtime::idmap::probe_snapshotter(&c, &cfg.containerd.snapshotter).await {
                Ok(()) => line(
                    "idmapped-rootfs",
                    true,
                    "user-namespace pods run on ID-mapped image layers (no copy)".into(),
                ),
                Err(why) => line(
                    "idmapped-rootfs",
                    false,
                    format!("{why}; user-namespace pods get a chowned copy of their image"),
                ),
            }
        }
        Err(e) => line("containerd", false, e.to_string()),
    }
    let runc = std::process::Command::new("runc").arg("--version").output();
    match runc {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            line("runc", true, text.lines().next().unwrap_or("").to_string());
            match imacri_runtime::sysinfo::runc_exec_nofile_race(&text) {
                None => line(
                    "runc-exec-rlimits",
                    true,
                    "execs get the container's rlimits".into(),
                ),
                Some(why) => line("runc-exec-rlimits", false, why),
            }
        }
        _ => line("runc", false, "runc not found in PATH".into()),
    }
    line(
        "cgroups",
        true,
        format!("{:?}", imacri_runtime::sysinfo::cgroup_version()),
    );
    let userns = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    line(
        "user-namespaces",
        userns > 0,
        format!("max_user_namespaces={userns}"),
    );
    match imacri_runtime::sysinfo::criu_check() {
        Ok(()) => line("criu", true, "`criu check` passes".into()),
        Err(why) => line(
            "criu",
            false,
            format!("CheckpointContainer is unavailable: `criu check`: {why}"),
        ),
    }
    match imacri_runtime::integrity::kernel::probe() {
        Ok(()) => line(
            "ima-namespaces",
            true,
            "a user namespace's securityfs has ima/active".into(),
        ),
        Err(r) => line("ima-namespaces", false, r),
    }
    let fan = imacri_runtime::integrity::fanotify::probe();
    match &fan {
        Ok(()) => line(
            "fanotify",
            true,
            "permission events (FAN_OPEN_EXEC_PERM) with filesystem marks".into(),
        ),
        Err(r) => line("fanotify", false, r.clone()),
    }
    if fan.is_ok() {
        use imacri_runtime::integrity::fanotify::groups;
        let want = cfg.ima.fanotify_groups;
        match groups::limit(std::path::Path::new(groups::SYSCTL)) {
            Ok(n) if n >= want => line(
                "fanotify-groups",
                true,
                format!(
                    "fs.fanotify.max_user_groups = {n}: one or two groups per measured container"
                ),
            ),
            Ok(n) => line(
                "fanotify-groups",
                true,
                format!(
                    "fs.fanotify.max_user_groups = {n}; imacri raises it to {want} at start \
                     (ima.fanotify_groups): one or two groups per measured container"
                ),
            ),
            Err(e) => line("fanotify-groups", false, format!("{}: {e}", groups::SYSCTL)),
        }
        let marks = groups::MARKS_SYSCTL;
        let per = cfg.ima.max_watched_files.max(1) as u64;
        match groups::limit(std::path::Path::new(marks)) {
            Ok(n) => line(
                "fanotify-marks",
                true,
                format!(
                    "imacri's groups do not count against fs.fanotify.max_user_marks = {n} \
                     (FAN_UNLIMITED_MARKS); each measured container holds at most \
                     ima.max_watched_files = {per} inode marks, ~{} MiB of inodes they keep in memory",
                    (per * MARK_COST).div_ceil(1 << 20)
                ),
            ),
            Err(e) => line("fanotify-marks", false, format!("{marks}: {e}")),
        }
        let queued = std::fs::read_to_string("/proc/sys/fs/fanotify/max_queued_events")
            .map_or_else(|e| format!("unreadable: {e}"), |s| s.trim().to_string());
        let which = if imacri_runtime::integrity::fanotify::closes::kernel_multigrain() {
            "multigrain timestamps: closes after writing are asked for on overlays only"
        } else {
            "coarse timestamps: closes after writing are asked for on every measured filesystem"
        };
        line(
            "fanotify-closes",
            true,
            format!(
                "{which}, through a second group per container whose queue is bounded \
                 (fs.fanotify.max_queued_events = {queued}); past it the container's digests are forgotten"
            ),
        );
    }
    let landlock = imacri_runtime::integrity::init::probe().and_then(|abi| {
        if imacri_runtime::integrity::init::noexec(&cfg.root) {
            Err(format!(
                "root {} is on a filesystem mounted noexec: imacri's container init cannot run \
                 from there (nor from a bind mount of it)",
                cfg.root.display()
            ))
        } else {
            Ok(abi)
        }
    });
    match &landlock {
        Ok(abi) => line(
            "ima-landlock",
            true,
            format!(
                "Landlock ABI {abi}: ima pods' processes run through imacri's init ({}), which \
                 allows execution only beneath the container's root (no file from another \
                 filesystem, fd or root runs); ima containers get no_new_privs",
                imacri_runtime::integrity::init::PATH
            ),
        ),
        Err(r) => line("ima-landlock", false, r.clone()),
    }
    match imacri_runtime::integrity::fanotify::lease_probe() {
        Ok(()) => line(
            "ima-tomtou",
            true,
            "files ima containers map executable: an open for writing asks first (refused \
             under enforce), a truncate(2) breaks imacri's read lease and waits until the \
             violation is logged (under enforce, until the container is killed)"
                .into(),
        ),
        Err(r) => line(
            "ima-tomtou",
            false,
            format!("{r}; opens for writing of mapped files are still decided first"),
        ),
    }
    line_open_files(&mut line);
    match imacri_runtime::integrity::fanotify::deny_errno_probe() {
        Ok(()) => line(
            "ima-exec-window",
            true,
            "an execution of a rootfs (overlay) file is answered with a read lease held until \
             the kernel's writers check; a file open for writing is refused with ETXTBSY; a \
             program's ELF interpreter is watched for writers as a mapping"
                .into(),
        ),
        Err(r) => line("ima-exec-window", false, r),
    }
    let fan = fan.and_then(|()| landlock.clone().map(|_| ()));
    match imacri_runtime::integrity::guard::probe() {
        Ok(()) => line(
            "ima-guards",
            true,
            "ima pods: vm.memfd_noexec=2 per pid namespace, user.max_user_namespaces=0, \
             no SYS_ADMIN/SYS_RESOURCE/... capabilities (however spelt), volumes noexec with \
             every mount beneath them (under volumes=\"measure\" the pod's own tmpfs volumes \
             are marked whole and other volumes on local filesystems through the container's \
             own mount), no \
             mount propagation from the host, no 32-bit programs"
                .into(),
        ),
        Err(r) => line("ima-guards", false, r),
    }
    let denying: Vec<&str> = cfg
        .ima
        .policies
        .iter()
        .filter(|(_, p)| {
            p.anonymous_exec == imacri_runtime::integrity::setting::AnonymousExec::Deny
        })
        .map(|(n, _)| n.as_str())
        .collect();
    match (denying.is_empty(), &landlock) {
        (true, _) => line(
            "ima-anonymous-exec",
            true,
            "allowed by every policy, as under IMA (not measured); `anonymous_exec = \"deny\"` \
             in a policy refuses it for workloads without a JIT"
                .into(),
        ),
        (false, Ok(_)) => line(
            "ima-anonymous-exec",
            true,
            format!(
                "denied by policies {denying:?}: anonymous, written or writable memory made \
                 executable, userfaultfd and ptrace's pokes refused; their processes cannot open \
                 files beneath /proc for writing (imacri's init, Landlock), so no \
                 /proc/<pid>/mem write reaches a code page"
            ),
        ),
        (false, Err(why)) => line(
            "ima-anonymous-exec",
            false,
            format!("policies {denying:?} deny anonymous executable memory, but {why}"),
        ),
    }
    // The node's rules per Kubernetes namespace, as the config gives them.
    let rules: Vec<String> = cfg
        .ima
        .namespaces
        .iter()
        .map(|(ns, r)| {
            let policies = match r.policies.as_slice() {
                [] => "any policy".to_string(),
                p => format!("policies {p:?}"),
            };
            let ima = if r.require {
                "ima required"
            } else {
                "ima optional"
            };
            format!("{ns:?}: {ima}, {policies}")
        })
        .collect();
    line(
        "ima-ns-rules",
        true,
        if rules.is_empty() {
            "no [ima.namespaces] rule: any pod, any policy by its annotations".into()
        } else {
            rules.join("; ")
        },
    );
    let open_file = imacri_runtime::integrity::guard::node_open_file_interpreters();
    match imacri_runtime::integrity::guard::probe_binfmt() {
        Ok(()) => line(
            "ima-binfmt",
            true,
            format!(
                "ima pods get a binfmt_misc of their own: the node's interpreters ({} opened in \
                 advance with flag F) do not run there",
                open_file.len()
            ),
        ),
        Err(why) if open_file.is_empty() => line(
            "ima-binfmt",
            true,
            format!(
                "no node interpreter is opened in advance (flag F); a pod's own binfmt_misc: {why}"
            ),
        ),
        Err(why) => line(
            "ima-binfmt",
            false,
            format!(
                "ima pods are refused while the node has binfmt_misc interpreters opened in \
                 advance (flag F: {}) and cannot get a binfmt_misc of their own: {why}",
                open_file.join(", ")
            ),
        ),
    }
    match imacri_runtime::integrity::mapguard::probe() {
        Ok(()) => line(
            "ima-map-guard",
            true,
            format!(
                "ima pods: mmap/mprotect with PROT_EXEC of any file measured through seccomp user \
                 notification, {}; shmat(SHM_EXEC) and READ_IMPLIES_EXEC refused; native \
                 syscalls only; the tasks sharing a caller's fd table or memory held still \
                 (ptrace) during its call, refused if they cannot be; an overlay file mapped \
                 shared and writable held open for writing until its container is gone (not \
                 executable meanwhile), and one whose upper file is open for writing (a mapping \
                 from outside the pod) a writers violation; pause's rootfs noexec",
                imacri_runtime::integrity::mapguard::file_source()
            ),
        ),
        Err(r) => line("ima-map-guard", false, r),
    }
    match imacri_runtime::integrity::charge::available() {
        Ok(()) => line(
            "ima-charges",
            true,
            "imacri's hashing, seccomp answers and fanotify answers for an ima pod run in the \
             pod's cpu and cpuacct cgroups (counted against its CPU limit, throttled with it)"
                .into(),
        ),
        Err(why) => line("ima-charges", false, why),
    }
    line(
        "ima-restarts",
        true,
        "while imacri is down, ima pods' executions and executable mappings wait (fanotify \
         groups and seccomp listeners held by `imacri internal fd-keeper`; events taken but \
         unanswered are denied); if the keeper is lost too, gaps are logged (fail_mode)"
            .into(),
    );
    let node = imacri_runtime::integrity::setting::NodeSupport {
        kernel: imacri_runtime::integrity::kernel::probe(),
        fanotify: fan,
    };
    match imacri_runtime::integrity::setting::resolve_backend(cfg.ima.backend, &node) {
        Ok(b) => line(
            "ima-backend",
            !matches!(b, imacri_runtime::integrity::setting::Backend::None(_)),
            format!("configured {:?}: ima pods get {b}", cfg.ima.backend).to_lowercase(),
        ),
        Err(e) => line("ima-backend", false, e.to_string()),
    }
    // Which RuntimeClass handlers can run ima pods (RunPodSandbox refuses
    // the others): the runc v2 shim with runc.
    let handlers: Vec<(String, bool)> = cfg
        .runtimes
        .iter()
        .map(|(name, h)| {
            match imacri_runtime::sysinfo::ima_runtime(&h.runtime_type, &h.binary_name) {
                Ok(v) => (format!("{name} ({v})"), true),
                Err(why) => (format!("{name}: refused, {why}"), false),
            }
        })
        .collect();
    line(
        "ima-runtimes",
        handlers.iter().any(|(_, ok)| *ok),
        format!(
            "ima pods run on runtime handlers of {} with runc: {}",
            imacri_runtime::sysinfo::IMA_SHIM,
            handlers
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ),
    );
    if cfg.ima.tpm_tcti.is_empty() {
        line(
            "tpm",
            false,
            if Path::new("/dev/tpmrm0").exists() {
                "/dev/tpmrm0 exists but ima.tpm_tcti is empty: set it to \"device:/dev/tpmrm0\" to anchor measurements".into()
            } else {
                "no ima.tpm_tcti configured and no /dev/tpmrm0: measurements are unanchored".into()
            },
        );
    } else {
        let tcti = cfg.ima.tpm_tcti.clone();
        let pcr = cfg.ima.pcr;
        let probe = tokio::task::spawn_blocking(move || {
            imacri_runtime::integrity::tpm::probe(&tcti, pcr)
                .map(|v| (v, imacri_runtime::integrity::tpm::has_ek_certificate(&tcti)))
        })
        .await;
        match probe {
            Ok(Ok((v, cert))) => line(
                "tpm",
                true,
                format!(
                    "{} reachable, PCR {pcr} = {}; {}",
                    cfg.ima.tpm_tcti,
                    hex_short(&v),
                    if cert {
                        "RSA EK certificate present (verifiers enroll with --ek-ca)"
                    } else {
                        "no RSA EK certificate in NV: verifiers must pin the EK (attest ek)"
                    }
                ),
            ),
            Ok(Err(e)) => line("tpm", false, e.to_string()),
            Err(e) => line("tpm", false, e.to_string()),
        }
    }
    let cni = imacri_runtime::cni::Cni::new(
        cfg.cni.conf_dir.clone(),
        cfg.cni.bin_dirs.clone(),
        cfg.root.join("cni"),
    );
    match cni.config() {
        Ok(c) => line(
            "cni",
            true,
            format!("network {:?} from {}", c.name, c.file.display()),
        ),
        Err(e) => line(
            "cni",
            false,
            format!("{e} (only host-network pods can run)"),
        ),
    }
    if cfg.nri.enable {
        let launched = std::fs::read_dir(&cfg.nri.plugin_path)
            .map(|d| d.flatten().count())
            .unwrap_or(0);
        line(
            "nri",
            true,
            format!(
                "plugins on {} ({}) and {launched} in {}; default rule {:?}, {} named rule(s); ima pods are never weakened",
                cfg.nri.socket_path.display(),
                if cfg.nri.disable_connections { "closed" } else { "open" },
                cfg.nri.plugin_path.display(),
                cfg.nri.default.security,
                cfg.nri.plugins.len()
            ),
        );
    } else {
        line(
            "nri",
            false,
            "off: set [nri] enable = true to run NRI plugins".into(),
        );
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .map(|s| s.contains("Seccomp:"))
        .unwrap_or(false);
    line(
        "seccomp",
        seccomp,
        if seccomp {
            "filters supported".into()
        } else {
            "not in this kernel".into()
        },
    );
    let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false);
    line(
        "apparmor",
        apparmor,
        if apparmor {
            "enabled".into()
        } else {
            "not enabled: RuntimeDefault is not applied, Localhost profiles are rejected".into()
        },
    );
    let selinux = Path::new("/sys/fs/selinux/enforce").exists();
    line(
        "selinux",
        selinux,
        if selinux {
            "enabled".into()
        } else {
            "not enabled: SELinux options are ignored".into()
        },
    );
    Ok(ok)
}

fn hex_short(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        + "..."
}

/// imacri's share of open files for pods' leases and held writers, as a
/// daemon started from here would have it (its hard limit, at most
/// `keeper::MAX_OPEN_FILES`), and whether a full node's pods fit in it.
fn line_open_files(line: &mut impl FnMut(&str, bool, String)) {
    use imacri_runtime::integrity::fanotify::{
        held_share, share_of, FULL_NODE_NEED, LEASES_PER_POD,
    };
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit on a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let open = imacri_runtime::integrity::keeper::open_files_limit(lim.rlim_max);
    let share = share_of(open);
    let detail = format!(
        "imacri runs with {open} open files (the hard limit here, at most {}): {share} for \
         ima pods' leases, execution windows and held writers, {LEASES_PER_POD} per pod, {} \
         held writers per pod; when all are taken the pods holding the most give watch \
         leases up",
        imacri_runtime::integrity::keeper::MAX_OPEN_FILES,
        held_share(share)
    );
    if share >= FULL_NODE_NEED {
        line("ima-open-files", true, detail);
    } else {
        line(
            "ima-open-files",
            false,
            format!(
                "{detail}; fewer than a full node of ima pods needs ({FULL_NODE_NEED}): raise \
                 imacri's hard open-file limit (systemd: LimitNOFILE=infinity)"
            ),
        );
    }
}
