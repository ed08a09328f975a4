//! Resolving the identity of a container's first process from the CRI
//! security context and the image's /etc/passwd and /etc/group.

use imacri_api::cri;
use oci_spec::image::ImageConfiguration;
use std::path::Path;

use crate::spec::ProcessUser;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then_some(())?;
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
            })
        })
        .collect()
}

/// (group name, gid, members)
pub fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4).then_some(())?;
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

fn read(rootfs: &Path, file: &str) -> String {
    // A missing file is an empty database, as in containerd.
    std::fs::read_to_string(rootfs.join(file)).unwrap_or_default()
}

/// An image's account databases: its `/etc/passwd` and `/etc/group`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accounts {
    pub passwd: String,
    pub group: String,
}

impl Accounts {
    /// Read from a mounted root filesystem.
    pub fn read(rootfs: &Path) -> Accounts {
        Accounts {
            passwd: read(rootfs, "etc/passwd"),
            group: read(rootfs, "etc/group"),
        }
    }
}

/// Images' account databases, by chain ID: a new container's root is its
/// image's, unchanged (its process has not run), so CreateContainer need
/// not mount it again to look its user up (0.4-0.7 ms of ~5.5). Images are
/// content-addressed, so an entry never goes stale; the cache is bounded
/// in entries and in each entry's size.
#[derive(Debug, Default)]
pub struct AccountsCache(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<Accounts>>>,
);

impl AccountsCache {
    /// Entries kept; past it, the cache starts over.
    pub const ENTRIES: usize = 256;
    /// Bytes of one image's databases kept; a larger pair is read each time.
    pub const BYTES: usize = 64 * 1024;

    pub fn get(&self, chain_id: &str) -> Option<std::sync::Arc<Accounts>> {
        self.0.lock().ok()?.get(chain_id).cloned()
    }

    pub fn put(&self, chain_id: &str, a: Accounts) -> std::sync::Arc<Accounts> {
        let a = std::sync::Arc::new(a);
        if a.passwd.len() + a.group.len() > Self::BYTES {
            return a;
        }
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= Self::ENTRIES {
                m.clear();
            }
            m.insert(chain_id.to_string(), a.clone());
        }
        a
    }
}

/// Resolves user, group and supplementary groups. `rootfs` is the
/// container's mounted root filesystem.
pub fn resolve(
    rootfs: &Path,
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: &ImageConfiguration,
) -> Result<ProcessUser> {
    resolve_with(&Accounts::read(rootfs), sc, image)
}

/// [`resolve`] from the image's account databases.
pub fn resolve_with(
    accounts: &Accounts,
    sc: Option<&cri::LinuxContainerSecurityContext>,
    image: &ImageConfiguration,
) -> Result<ProcessUser> {
    let passwd = parse_passwd(&accounts.passwd);
    let default = cri::LinuxContainerSecurityContext::default();
    let sc = sc.unwrap_or(&default);
    if sc.run_as_user.is_some() && !sc.run_as_username.is_empty() {
        return Err(Error::InvalidArgument(
            "run_as_user and run_as_username are mutually exclusive".into(),
        ));
    }
    if sc.run_as_group.is_some() && sc.run_as_user.is_none() && sc.run_as_username.is_empty() {
        return Err(Error::InvalidArgument(
            "run_as_group requires run_as_user or run_as_username".into(),
        ));
    }
    let by_name = |n: &str| passwd.iter().find(|p| p.name == n);
    let by_uid = |u: u32| passwd.iter().find(|p| p.uid == u);
    let groups = parse_group(&accounts.group);

    let (uid, mut gid, name) = if let Some(u) = &sc.run_as_user {
        let uid = u32::try_from(u.value).map_err(|_| {
            Error::InvalidArgument(format!("run_as_user {} is out of range", u.value))
        })?;
        let e = by_uid(uid);
        (uid, e.map_or(0, |e| e.gid), e.map(|e| e.name.clone()))
    } else if !sc.run_as_username.is_empty() {
        let e = by_name(&sc.run_as_username).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "run_as_username {:?} is not in the image's /etc/passwd",
                sc.run_as_username
            ))
        })?;
        (e.uid, e.gid, Some(e.name.clone()))
    } else {
        let user = image
            .config()
            .as_ref()
            .and_then(|c| c.user().clone())
            .unwrap_or_default();
        let (u, g) = user.split_once(':').unwrap_or((&user, ""));
        let (uid, gid, name) = if u.is_empty() {
            (0, 0, by_uid(0).map(|e| e.name.clone()))
        } else if let Ok(uid) = u.parse::<u32>() {
            let e = by_uid(uid);
            (uid, e.map_or(0, |e| e.gid), e.map(|e| e.name.clone()))
        } else {
            let e = by_name(u).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "image user {u:?} is not in the image's /etc/passwd"
                ))
            })?;
            (e.uid, e.gid, Some(e.name.clone()))
        };
        let gid = if g.is_empty() {
            gid
        } else if let Ok(n) = g.parse::<u32>() {
            n
        } else {
            groups
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, id, _)| *id)
                .ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "image group {g:?} is not in the image's /etc/group"
                    ))
                })?
        };
        (uid, gid, name)
    };
    if let Some(g) = &sc.run_as_group {
        gid = u32::try_from(g.value).map_err(|_| {
            Error::InvalidArgument(format!("run_as_group {} is out of range", g.value))
        })?;
    }
    let mut additional: Vec<u32> = Vec::new();
    let strict = sc.supplemental_groups_policy == cri::SupplementalGroupsPolicy::Strict as i32;
    if !strict {
        if let Some(name) = &name {
            for (_, id, members) in &groups {
                if members.iter().any(|m| m == name) && !additional.contains(id) {
                    additional.push(*id);
                }
            }
        }
    }
    for g in &sc.supplemental_groups {
        let g = u32::try_from(*g).map_err(|_| {
            Error::InvalidArgument(format!("supplemental group {g} is out of range"))
        })?;
        if !additional.contains(&g) {
            additional.push(g);
        }
    }
    additional.retain(|g| *g != gid);
    additional.insert(0, gid);
    Ok(ProcessUser {
        uid,
        gid,
        additional_gids: additional,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nalice:x:1000:\nwheel:x:10:alice\n",
        )
        .unwrap();
        d
    }

    fn img(user: &str) -> ImageConfiguration {
        serde_json::from_value(serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {"User": user},
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap()
    }

    #[test]
    fn an_images_accounts_are_kept_within_bounds() {
        let c = AccountsCache::default();
        let a = Accounts::read(rootfs().path());
        assert!(a.passwd.contains("alice") && a.group.contains("wheel"));
        c.put("sha256:a", a.clone());
        assert_eq!(c.get("sha256:a").as_deref(), Some(&a));
        let u = resolve_with(&c.get("sha256:a").unwrap(), None, &img("alice")).unwrap();
        assert_eq!(u.additional_gids, vec![1000, 10]);
        let big = Accounts {
            passwd: "x".repeat(AccountsCache::BYTES + 1),
            group: String::new(),
        };
        c.put("sha256:big", big);
        assert!(c.get("sha256:big").is_none(), "too large to keep");
        for i in 0..AccountsCache::ENTRIES {
            c.put(&format!("sha256:{i}"), a.clone());
        }
        assert!(c.get("sha256:a").is_none(), "started over past the bound");
        assert!(c.0.lock().unwrap().len() <= AccountsCache::ENTRIES);
    }

    #[test]
    fn image_user_by_name_with_groups() {
        let r = rootfs();
        let u = resolve(r.path(), None, &img("alice")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![1000, 10]);
    }

    #[test]
    fn cri_overrides_and_strict_policy() {
        let r = rootfs();
        let sc = cri::LinuxContainerSecurityContext {
            run_as_username: "alice".into(),
            run_as_group: Some(cri::Int64Value { value: 5 }),
            supplemental_groups: vec![7],
            supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
            ..Default::default()
        };
        let u = resolve(r.path(), Some(&sc), &img("")).unwrap();
        assert_eq!((u.uid, u.gid), (1000, 5));
        assert_eq!(u.additional_gids, vec![5, 7]);
    }

    #[test]
    fn unknown_names_fail_clearly() {
        let r = rootfs();
        let sc = cri::LinuxContainerSecurityContext {
            run_as_username: "bob".into(),
            ..Default::default()
        };
        let e = resolve(r.path(), Some(&sc), &img(""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bob"), "{e}");
        assert!(resolve(r.path(), None, &img("carol")).is_err());
        let both = cri::LinuxContainerSecurityContext {
            run_as_username: "alice".into(),
            run_as_user: Some(cri::Int64Value { value: 1 }),
            ..Default::default()
        };
        assert!(resolve(r.path(), Some(&both), &img("")).is_err());
    }

    #[test]
    fn numeric_user_without_passwd() {
        let d = tempfile::tempdir().unwrap();
        let u = resolve(d.path(), None, &img("123:456")).unwrap();
        assert_eq!((u.uid, u.gid), (123, 456));
    }
}
