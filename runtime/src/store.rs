//! imacri's own records of pods and containers, in memory and persisted under
//! the root dir (`<root>/<kind>/<id>/{config.pb,state.json}`) so a restart
//! recovers them. The CRI config is stored as protobuf, as kubelet sent it.

use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::{Error, Result};

pub struct Entry<C, S> {
    pub id: String,
    /// Unique name derived from the CRI metadata.
    pub name: String,
    /// The CRI config, immutable.
    pub config: C,
    state: RwLock<S>,
    /// Serializes lifecycle operations (start/stop/remove) on this object
    /// (`write`). A pod's is also read-held by the container calls that
    /// need it ready (CreateContainer, StartContainer), so that its stop and
    /// removal wait for them and see what they made, and a call that
    /// waited for a stop finds the pod not ready.
    pub op: tokio::sync::RwLock<()>,
    /// A container's: a stop with a grace period sent its stop signal. A
    /// later stop sends none (the process may take a second SIGTERM for
    /// "quit now"), as containerd's `IsStopSignaledWithTimeout`.
    pub stop_signaled: std::sync::atomic::AtomicBool,
    dir: PathBuf,
}

impl<C, S: Clone + Serialize> Entry<C, S> {
    pub fn state(&self) -> S {
        match self.state.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Changes the state and persists it before returning.
    pub fn update<T>(&self, f: impl FnOnce(&mut S) -> T) -> Result<T> {
        let mut g = self
            .state
            .write()
            .map_err(|_| Error::Internal("state lock poisoned".into()))?;
        let out = f(&mut g);
        write_json(&self.dir.join("state.json"), &*g)?;
        Ok(out)
    }

    /// Changes the state in memory only, for what is true whether or not
    /// it reaches the disk (a process exited); [`persist`](Self::persist)
    /// writes it.
    pub fn update_in_memory<T>(&self, f: impl FnOnce(&mut S) -> T) -> Result<T> {
        let mut g = self
            .state
            .write()
            .map_err(|_| Error::Internal("state lock poisoned".into()))?;
        Ok(f(&mut g))
    }

    /// Writes the state as it is now.
    pub fn persist(&self) -> Result<()> {
        let g = self
            .state
            .read()
            .map_err(|_| Error::Internal("state lock poisoned".into()))?;
        write_json(&self.dir.join("state.json"), &*g)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming", path, e))
}

fn write_json<S: Serialize>(path: &Path, s: &S) -> Result<()> {
    let data = serde_json::to_vec_pretty(s).map_err(|e| Error::Internal(e.to_string()))?;
    write_atomic(path, &data)
}

/// Prefix of a removed record's directory until its files are deleted.
const REMOVED: &str = ".removed-";
/// Prefix of a new record's directory until both its files are written.
const STAGED: &str = ".staged-";

pub struct Store<C, S> {
    dir: PathBuf,
    items: RwLock<HashMap<String, Arc<Entry<C, S>>>>,
    names: Mutex<HashMap<String, String>>,
}

impl<C, S> Store<C, S>
where
    C: prost::Message + Default + Clone,
    S: Clone + Serialize + DeserializeOwned,
{
    /// Loads every record under `dir`; unreadable ones are skipped with a warning.
    pub fn open(dir: PathBuf, name_of: impl Fn(&C) -> String) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let mut items = HashMap::new();
        let mut names = HashMap::new();
        let rd = std::fs::read_dir(&dir).map_err(|e| Error::io("reading", &dir, e))?;
        for ent in rd.flatten() {
            let d = ent.path();
            let id = ent.file_name().to_string_lossy().into_owned();
            if id.starts_with(REMOVED) || id.starts_with(STAGED) {
                // Removed before a crash let its files go, or cut short by
                // one while it was written.
                let _ = std::fs::remove_dir_all(&d);
                continue;
            }
            let loaded = (|| -> Result<(C, S)> {
                let cfg = std::fs::read(d.join("config.pb"))
                    .map_err(|e| Error::io("reading", d.join("config.pb"), e))?;
                let cfg = C::decode(cfg.as_slice())
                    .map_err(|e| Error::Internal(format!("decoding config.pb: {e}")))?;
                let st = std::fs::read(d.join("state.json"))
                    .map_err(|e| Error::io("reading", d.join("state.json"), e))?;
                let st = serde_json::from_slice(&st)
                    .map_err(|e| Error::Internal(format!("decoding state.json: {e}")))?;
                Ok((cfg, st))
            })();
            match loaded {
                Ok((config, state)) => {
                    let name = name_of(&config);
                    names.insert(name.clone(), id.clone());
                    items.insert(
                        id.clone(),
                        Arc::new(Entry {
                            id,
                            name,
                            config,
                            state: RwLock::new(state),
                            op: tokio::sync::RwLock::new(()),
                            stop_signaled: Default::default(),
                            dir: d,
                        }),
                    );
                }
                Err(e) => {
                    tracing::warn!(dir = %d.display(), error = %e, "skipping unreadable record")
                }
            }
        }
        Ok(Store {
            dir,
            items: RwLock::new(items),
            names: Mutex::new(names),
        })
    }

    /// Reserves a name for a new object; AlreadyExists names the holder.
    pub fn reserve(&self, name: &str, id: &str) -> Result<()> {
        let mut names = self
            .names
            .lock()
            .map_err(|_| Error::Internal("name lock poisoned".into()))?;
        if let Some(holder) = names.get(name) {
            return Err(Error::AlreadyExists(format!(
                "name {name:?} is already in use by {holder}; remove it first"
            )));
        }
        names.insert(name.to_string(), id.to_string());
        Ok(())
    }

    pub fn release(&self, name: &str, id: &str) {
        if let Ok(mut names) = self.names.lock() {
            if names.get(name).map(String::as_str) == Some(id) {
                names.remove(name);
            }
        }
    }

    /// Persists and adds a new object (its name must be reserved).
    pub fn insert(&self, id: &str, name: &str, config: C, state: S) -> Result<Arc<Entry<C, S>>> {
        // Written beside and renamed into place whole: a crash never leaves
        // a record without its files (which a restart could not read, and
        // so neither use nor clean up).
        let d = self.dir.join(id);
        let staged = self.dir.join(format!("{STAGED}{id}"));
        let written = (|| {
            std::fs::create_dir(&staged).map_err(|e| Error::io("creating", &staged, e))?;
            let cfg = staged.join("config.pb");
            std::fs::write(&cfg, config.encode_to_vec())
                .map_err(|e| Error::io("writing", &cfg, e))?;
            let st = staged.join("state.json");
            let json =
                serde_json::to_vec_pretty(&state).map_err(|e| Error::Internal(e.to_string()))?;
            std::fs::write(&st, json).map_err(|e| Error::io("writing", &st, e))?;
            std::fs::rename(&staged, &d).map_err(|e| Error::io("renaming", &staged, e))
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
        let e = Arc::new(Entry {
            id: id.to_string(),
            name: name.to_string(),
            config,
            state: RwLock::new(state),
            op: tokio::sync::RwLock::new(()),
            stop_signaled: Default::default(),
            dir: d,
        });
        self.items
            .write()
            .map_err(|_| Error::Internal("store lock poisoned".into()))?
            .insert(id.to_string(), e.clone());
        Ok(e)
    }

    /// Deletes the record (memory and disk) and frees its name.
    pub fn remove(&self, id: &str) -> Result<()> {
        let e = self
            .items
            .write()
            .map_err(|_| Error::Internal("store lock poisoned".into()))?
            .remove(id);
        if let Some(e) = e {
            self.release(&e.name, id);
        }
        // One rename takes the record away for good (a restart never sees
        // it again); its files are deleted off the request path.
        let d = self.dir.join(id);
        let gone = self.dir.join(format!("{REMOVED}{id}"));
        match std::fs::rename(&d, &gone) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("removing", d, e)),
        }
        let delete = move || {
            if let Err(e) = std::fs::remove_dir_all(&gone) {
                tracing::warn!(dir = %gone.display(), error = %e, "removed record's files left behind");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => drop(h.spawn_blocking(delete)),
            Err(_) => delete(),
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry<C, S>>> {
        self.items.read().ok()?.get(id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Entry<C, S>>> {
        self.items
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Finds by full ID or unique ID prefix (as crictl users type them).
    pub fn find(&self, id_or_prefix: &str) -> Result<Arc<Entry<C, S>>> {
        if id_or_prefix.is_empty() {
            return Err(Error::InvalidArgument("ID must not be empty".into()));
        }
        let items = self
            .items
            .read()
            .map_err(|_| Error::Internal("store lock poisoned".into()))?;
        if let Some(e) = items.get(id_or_prefix) {
            return Ok(e.clone());
        }
        let mut matches = items.values().filter(|e| e.id.starts_with(id_or_prefix));
        match (matches.next(), matches.next()) {
            (Some(e), None) => Ok(e.clone()),
            (Some(_), Some(_)) => Err(Error::InvalidArgument(format!(
                "ID prefix {id_or_prefix:?} is ambiguous"
            ))),
            (None, _) => Err(Error::NotFound(format!("{id_or_prefix:?} not found"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imacri_api::cri;

    #[derive(Clone, serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct St {
        n: u32,
    }

    fn name(c: &cri::ContainerConfig) -> String {
        c.metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default()
    }

    #[test]
    fn a_record_cut_short_while_written_is_neither_loaded_nor_left() {
        let d = tempfile::tempdir().unwrap();
        let s: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        s.insert("id1", "a", cri::ContainerConfig::default(), St { n: 1 })
            .unwrap();
        // What a crash between the directory and its files leaves.
        let cut = d.path().join(format!("{STAGED}id2"));
        std::fs::create_dir(&cut).unwrap();
        std::fs::write(cut.join("config.pb"), b"").unwrap();
        let names = |p: &Path| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        let s: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        assert_eq!(s.all().len(), 1);
        assert_eq!(names(d.path()), vec!["id1".to_string()]);
        assert_eq!(
            names(&d.path().join("id1")),
            vec!["config.pb".to_string(), "state.json".to_string()]
        );
    }

    #[test]
    fn persists_and_reloads() {
        let d = tempfile::tempdir().unwrap();
        let s: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        let cfg = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "a".into(),
                attempt: 1,
            }),
            ..Default::default()
        };
        s.reserve("a", "id1").unwrap();
        assert!(s
            .reserve("a", "id2")
            .unwrap_err()
            .to_string()
            .contains("id1"));
        let e = s.insert("id1", "a", cfg.clone(), St { n: 1 }).unwrap();
        e.update(|st| st.n = 2).unwrap();
        let s2: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        let e2 = s2.find("id").unwrap();
        assert_eq!(e2.state(), St { n: 2 });
        assert_eq!(e2.config, cfg);
        assert!(s2.reserve("a", "x").is_err());
        s2.remove("id1").unwrap();
        assert!(s2.find("id1").is_err());
        s2.reserve("a", "x").unwrap();
        // Removed means gone from disk too (no runtime here: deleted inline).
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        let s3: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        assert!(s3.all().is_empty());
    }

    #[test]
    fn a_removal_cut_short_by_a_crash_stays_removed() {
        let d = tempfile::tempdir().unwrap();
        let s: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        s.reserve("a", "id1").unwrap();
        s.insert("id1", "a", Default::default(), St { n: 1 })
            .unwrap();
        // What remove leaves if imacri dies before the files are deleted.
        std::fs::rename(d.path().join("id1"), d.path().join(".removed-id1")).unwrap();
        let s2: Store<cri::ContainerConfig, St> = Store::open(d.path().into(), name).unwrap();
        assert!(s2.all().is_empty());
        assert!(!d.path().join(".removed-id1").exists());
    }
}
