//! Devices: CRI device mappings and their cgroup rules.

use super::*;

pub(crate) fn device(
    d: &cri::Device,
) -> Result<(
    oci_spec::runtime::LinuxDevice,
    oci_spec::runtime::LinuxDeviceCgroup,
)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    validate_container_path("device container_path", &d.container_path)?;
    let meta = std::fs::metadata(&d.host_path)
        .map_err(|e| Error::InvalidArgument(format!("device host_path {:?}: {e}", d.host_path)))?;
    let ft = meta.file_type();
    let typ = if ft.is_char_device() {
        LinuxDeviceType::C
    } else if ft.is_block_device() {
        LinuxDeviceType::B
    } else {
        return Err(Error::InvalidArgument(format!(
            "device host_path {:?} is not a device",
            d.host_path
        )));
    };
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev) as i64, libc::minor(rdev) as i64);
    let perms = if d.permissions.is_empty() {
        "rwm"
    } else {
        d.permissions.as_str()
    };
    if !perms.chars().all(|c| "rwm".contains(c)) {
        return Err(Error::InvalidArgument(format!(
            "device {}: permissions {perms:?} must be a combination of r, w, m",
            d.container_path
        )));
    }
    let dev = oci(LinuxDeviceBuilder::default()
        .path(PathBuf::from(&d.container_path))
        .typ(typ)
        .major(major)
        .minor(minor)
        .file_mode(meta.mode() & 0o777)
        .uid(meta.uid())
        .gid(meta.gid())
        .build())?;
    let rule = oci(LinuxDeviceCgroupBuilder::default()
        .allow(true)
        .typ(typ)
        .major(major)
        .minor(minor)
        .access(perms)
        .build())?;
    Ok((dev, rule))
}

/// The container's device nodes, with their cgroup rules added to `res`:
/// CRI devices, and for a privileged container every host device (the
/// caller's `host_devices`) and access to all.
pub fn container_devices(
    i: &ContainerInputs<'_>,
    sc: &cri::LinuxContainerSecurityContext,
    res: &mut LinuxResources,
) -> Result<Vec<oci_spec::runtime::LinuxDevice>> {
    let mut devices = Vec::new();
    let mut dev_rules = res.devices().clone().unwrap_or_default();
    if sc.privileged {
        dev_rules = vec![oci(LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .access("rwm")
            .build())?];
        // Every device node of the host, as containerd's WithHostDevices.
        devices.extend(i.host_devices.iter().cloned());
    }
    for d in &i.config.devices {
        let (dev, rule) = device(d)?;
        devices.retain(|x| x.path() != dev.path());
        devices.push(dev);
        dev_rules.push(rule);
    }
    res.set_devices(Some(dev_rules));
    Ok(devices)
}

/// In a user namespace runc cannot make device nodes: it bind-mounts the
/// host's file *at the device's container path* instead (runc 1.1
/// `bindMountDeviceNode`), not the `host_path` it was given. A device
/// mapped to another path would bind whatever the host has there: a
/// regular file, executable (no `noexec` on it) and on a filesystem no mark
/// of an ima pod watches, so it ran unmeasured even under `enforce` (until
/// 2026-12-04). Every device of a user-namespace container must be, at its
/// container path on the host, that very device.
pub fn check_userns_devices(spec: &Spec) -> Result<()> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let devices = spec.linux().as_ref().and_then(|l| l.devices().as_ref());
    for d in devices.into_iter().flatten() {
        let path = d.path();
        let same = std::fs::metadata(path).is_ok_and(|m| {
            let ft = m.file_type();
            let kind = match d.typ() {
                LinuxDeviceType::B => ft.is_block_device(),
                LinuxDeviceType::C | LinuxDeviceType::U => ft.is_char_device(),
                _ => false,
            };
            let rdev = m.rdev();
            kind && libc::major(rdev) as i64 == d.major() && libc::minor(rdev) as i64 == d.minor()
        });
        if !same {
            return Err(Error::InvalidArgument(format!(
                "device {}: in a user namespace the runtime binds the host's {} as this device, and \
                 it is not the device {}:{} (map the device to the path it has on the host)",
                path.display(),
                path.display(),
                d.major(),
                d.minor()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::test_support::*;

    fn inputs_devices(privileged: bool, host: Vec<oci_spec::runtime::LinuxDevice>) -> Vec<String> {
        let cfg = cri::ContainerConfig {
            devices: vec![cri::Device {
                container_path: "/dev/mine".into(),
                host_path: "/dev/null".into(),
                permissions: "rw".into(),
            }],
            ..Default::default()
        };
        let sh = shared();
        let (sb, img) = (cri::PodSandboxConfig::default(), busybox());
        let i = ContainerInputs {
            host_devices: host,
            ..inputs(&cfg, &sb, &img, &sh)
        };
        let sc = cri::LinuxContainerSecurityContext {
            privileged,
            ..Default::default()
        };
        let mut res = LinuxResources::default();
        let devs = container_devices(&i, &sc, &mut res).unwrap();
        let rules = res.devices().clone().unwrap();
        if privileged {
            assert!(rules[0].allow() && rules[0].major().is_none(), "{rules:?}");
        }
        devs.iter()
            .map(|d| d.path().display().to_string())
            .collect()
    }

    #[test]
    fn privileged_gets_host_devices_and_cri_ones_win() {
        let host = |p: &str| {
            LinuxDeviceBuilder::default()
                .path(p)
                .typ(LinuxDeviceType::C)
                .major(1)
                .minor(7)
                .build()
                .unwrap()
        };
        let hosts = vec![host("/dev/full"), host("/dev/mine")];
        assert_eq!(
            inputs_devices(true, hosts.clone()),
            ["/dev/full", "/dev/mine"]
        );
        // Not privileged: the host's list is never used.
        assert_eq!(inputs_devices(false, hosts), ["/dev/mine"]);
    }

    #[test]
    fn userns_devices_must_be_themselves_at_their_path() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let spec_with_device = |path: &str, major: i64, minor: i64| {
            let dev = LinuxDeviceBuilder::default()
                .path(path)
                .typ(LinuxDeviceType::C)
                .major(major)
                .minor(minor)
                .build()
                .unwrap();
            let mut spec = Spec::default();
            let mut linux = spec.linux().clone().unwrap_or_default();
            linux.set_devices(Some(vec![dev]));
            spec.set_linux(Some(linux));
            spec
        };
        // /dev/null is 1:3 on Linux.
        assert!(check_userns_devices(&spec_with_device("/dev/null", 1, 3)).is_ok());
        for (path, major, minor) in [
            ("/dev/zero", 1, 3),
            (file.path().to_str().unwrap(), 1, 3),
            ("/nonexistent/dev", 1, 3),
        ] {
            let e = check_userns_devices(&spec_with_device(path, major, minor)).unwrap_err();
            assert!(e.to_string().contains(path), "{e}");
        }
        assert!(check_userns_devices(&Spec::default()).is_ok());
    }
}
