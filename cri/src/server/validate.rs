//! Request validation shared by the RPCs: every failure names the field.

use imacri_api::cri;
use imacri_runtime::{Error, Result};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

pub fn require<'a, T>(field: &str, v: Option<&'a T>) -> Result<&'a T> {
    v.ok_or_else(|| Error::InvalidArgument(format!("{field} is required")))
}

pub fn non_empty(field: &str, v: &str) -> Result<()> {
    if v.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} must not be empty")));
    }
    Ok(())
}

/// `<name>_<namespace>_<uid>_<attempt>`, unique per pod incarnation.
pub fn sandbox_name(c: &cri::PodSandboxConfig) -> String {
    let m = c.metadata.clone().unwrap_or_default();
    format!("{}_{}_{}_{}", m.name, m.namespace, m.uid, m.attempt)
}

/// The pod's metadata, which must be there; its fields may be empty, as
/// containerd takes them (the name made of them is what must be unique).
pub fn sandbox_metadata(c: &cri::PodSandboxConfig) -> Result<&cri::PodSandboxMetadata> {
    require("config.metadata", c.metadata.as_ref())
}

/// `<container>_<pod>_<namespace>_<uid>_<attempt>` (containerd's scheme).
pub fn container_name(c: &cri::ContainerConfig, sandbox: &cri::PodSandboxConfig) -> String {
    let m = c.metadata.clone().unwrap_or_default();
    let s = sandbox.metadata.clone().unwrap_or_default();
    format!(
        "{}_{}_{}_{}_{}",
        m.name, s.name, s.namespace, s.uid, m.attempt
    )
}

/// The container log path: `log_directory` joined with the relative
/// `log_path`, refusing anything that escapes the directory.
pub fn log_path(sandbox: &cri::PodSandboxConfig, c: &cri::ContainerConfig) -> Result<PathBuf> {
    if c.log_path.is_empty() {
        return Ok(PathBuf::new());
    }
    if sandbox.log_directory.is_empty() {
        return Err(Error::InvalidArgument(
            "config.log_path is set but the pod has no log_directory".into(),
        ));
    }
    let dir = Path::new(&sandbox.log_directory);
    if !dir.is_absolute() || dir.components().any(|c| c == Component::ParentDir) {
        return Err(Error::InvalidArgument(format!(
            "log_directory {:?} must be an absolute path without \"..\"",
            sandbox.log_directory
        )));
    }
    let rel = Path::new(&c.log_path);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Error::InvalidArgument(format!(
            "config.log_path {:?} must be a relative path inside the log directory",
            c.log_path
        )));
    }
    Ok(dir.join(rel))
}

/// CRI label selectors: every key must match exactly.
pub fn labels_match(selector: &HashMap<String, String>, labels: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb(dir: &str) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            log_directory: dir.into(),
            ..Default::default()
        }
    }

    fn c(path: &str) -> cri::ContainerConfig {
        cri::ContainerConfig {
            log_path: path.into(),
            ..Default::default()
        }
    }

    #[test]
    fn log_paths_stay_inside_the_directory() {
        assert_eq!(
            log_path(&sb("/var/log/pods/x"), &c("c/0.log")).unwrap(),
            PathBuf::from("/var/log/pods/x/c/0.log")
        );
        assert!(log_path(&sb("/var/log/pods/x"), &c("../../etc/passwd")).is_err());
        assert!(log_path(&sb("/var/log/pods/x"), &c("/etc/passwd")).is_err());
        assert!(log_path(&sb("relative"), &c("a.log")).is_err());
        assert!(log_path(&sb(""), &c("a.log")).is_err());
        assert_eq!(log_path(&sb(""), &c("")).unwrap(), PathBuf::new());
    }

    #[test]
    fn metadata_is_required() {
        let mut cfg = cri::PodSandboxConfig::default();
        assert!(sandbox_metadata(&cfg)
            .unwrap_err()
            .to_string()
            .contains("config.metadata"));
        // Empty fields are taken, as containerd takes them.
        cfg.metadata = Some(cri::PodSandboxMetadata {
            name: "p".into(),
            namespace: String::new(),
            uid: String::new(),
            attempt: 0,
        });
        assert!(sandbox_metadata(&cfg).is_ok());
    }

    #[test]
    fn selectors_and_handlers() {
        let labels = HashMap::from([("a".to_string(), "1".to_string())]);
        assert!(labels_match(&HashMap::new(), &labels));
        assert!(labels_match(&labels.clone(), &labels));
        assert!(!labels_match(
            &HashMap::from([("a".into(), "2".into())]),
            &labels
        ));
    }
}
