//! `[nri]` in the config: where plugins come from, their timeouts, and what
//! each may change (the administrator's lockdown).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NriConfig {
    /// Off by default: a plugin changes pods, so a node opts in.
    pub enable: bool,
    /// Socket external plugins connect to.
    pub socket_path: PathBuf,
    /// Plugins imacri starts itself: executables named `<index>-<name>`.
    pub plugin_path: PathBuf,
    /// Their configuration: `<index>-<name>.conf` or `<name>.conf`.
    pub plugin_config_path: PathBuf,
    pub plugin_registration_timeout_ms: u64,
    pub plugin_request_timeout_ms: u64,
    /// Only plugins from `plugin_path`; no socket.
    pub disable_connections: bool,
    /// Largest Synchronize message; a larger state goes in several, as
    /// upstream splits it (ttrpc's limit is 4 MiB).
    pub sync_message_bytes: usize,
    /// The rule for a plugin with no entry in `plugins`.
    pub default: PluginRule,
    /// Rules by `<index>-<name>` (e.g. "10-device-injector").
    pub plugins: BTreeMap<String, PluginRule>,
}

impl Default for NriConfig {
    fn default() -> Self {
        NriConfig {
            enable: false,
            socket_path: "/var/run/nri/nri.sock".into(),
            plugin_path: "/opt/nri/plugins".into(),
            plugin_config_path: "/etc/nri/conf.d".into(),
            plugin_registration_timeout_ms: 5000,
            plugin_request_timeout_ms: 2000,
            disable_connections: false,
            sync_message_bytes: 3 << 20,
            default: PluginRule::default(),
            plugins: BTreeMap::new(),
        }
    }
}

/// What one plugin may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginRule {
    /// Kinds of adjustment the plugin may make (see [`super::policy::Kind`]);
    /// `["all"]` for every kind.
    pub allow: Vec<String>,
    /// The rule for fields that change a pod's confinement.
    pub security: Security,
    /// A refused adjustment fails the request ("fail") or is dropped with a
    /// warning ("drop").
    pub on_refused: OnRefused,
    /// Socket peers (uids) this rule is for; empty: any. A plugin that
    /// registers with this name from another uid gets the default rule.
    pub uids: Vec<u32>,
}

impl Default for PluginRule {
    fn default() -> Self {
        PluginRule {
            allow: vec!["all".into()],
            security: Security::ConfineOnly,
            on_refused: OnRefused::Fail,
            uids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// No change to seccomp, namespaces, hooks, devices or mounts.
    None,
    /// Only changes that make the pod stricter.
    ConfineOnly,
    /// Anything (except in ima pods, whose guards no rule lifts).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRefused {
    Fail,
    Drop,
}

impl NriConfig {
    /// The rule for a plugin registered as `<idx>-<name>` from socket peer
    /// `uid` (None: launched by imacri itself).
    pub fn rule_for(&self, full_name: &str, uid: Option<u32>) -> &PluginRule {
        match self.plugins.get(full_name) {
            Some(r) if r.uids.is_empty() || uid.is_none_or(|u| r.uids.contains(&u)) => r,
            _ => &self.default,
        }
    }

    pub fn validate(&self) -> crate::Result<()> {
        for (name, r) in std::iter::once(("default", &self.default))
            .chain(self.plugins.iter().map(|(k, v)| (k.as_str(), v)))
        {
            for k in &r.allow {
                if k != "all" && super::policy::Kind::parse(k).is_none() {
                    return Err(crate::Error::InvalidArgument(format!(
                        "nri.plugins.{name}.allow: unknown kind {k:?} (one of \"all\", {})",
                        super::policy::Kind::ALL
                            .iter()
                            .map(|k| format!("{:?}", k.name()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        if self.sync_message_bytes == 0 || self.sync_message_bytes > 4 << 20 {
            return Err(crate::Error::InvalidArgument(
                "nri.sync_message_bytes: between 1 and 4194304 (ttrpc's message limit)".into(),
            ));
        }
        if self.plugin_request_timeout_ms == 0 || self.plugin_registration_timeout_ms == 0 {
            return Err(crate::Error::InvalidArgument(
                "nri: plugin timeouts must be above 0".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_rule_holds_only_for_its_uids() {
        let mut c = NriConfig::default();
        c.plugins.insert(
            "10-trusted".into(),
            PluginRule {
                security: Security::All,
                uids: vec![0],
                ..Default::default()
            },
        );
        assert_eq!(c.rule_for("10-trusted", Some(0)).security, Security::All);
        assert_eq!(c.rule_for("10-trusted", None).security, Security::All);
        assert_eq!(
            c.rule_for("10-trusted", Some(1000)).security,
            Security::ConfineOnly
        );
        assert_eq!(
            c.rule_for("20-other", Some(0)).security,
            Security::ConfineOnly
        );
    }

    #[test]
    fn unknown_kinds_are_config_errors() {
        let mut c = NriConfig::default();
        c.default.allow = vec!["env".into(), "seccom".into()];
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("seccom") && e.contains("\"seccomp\""), "{e}");
    }
}
