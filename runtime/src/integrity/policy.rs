//! IMA policies in the kernel's policy syntax (Documentation/ABI/testing/
//! ima_policy): one rule per line, `action [condition=value ...]`. Parsed
//! here so a bad policy fails at start, not when a pod is created; the
//! kernel backend writes the rules to `ima/policy`, the fanotify backend
//! compiles the same source.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

const ACTIONS: [&str; 7] = [
    "measure",
    "dont_measure",
    "appraise",
    "dont_appraise",
    "audit",
    "hash",
    "dont_hash",
];

const FUNCS: [&str; 13] = [
    "FILE_CHECK",
    "MMAP_CHECK",
    "MMAP_CHECK_REQPROT",
    "BPRM_CHECK",
    "CREDS_CHECK",
    "FILE_MMAP",
    "PATH_CHECK",
    "MODULE_CHECK",
    "FIRMWARE_CHECK",
    "KEXEC_KERNEL_CHECK",
    "KEXEC_INITRAMFS_CHECK",
    "POLICY_CHECK",
    "KEY_CHECK",
];

const MASKS: [&str; 4] = ["MAY_EXEC", "MAY_WRITE", "MAY_READ", "MAY_APPEND"];

const KEYS: [&str; 20] = [
    "func",
    "mask",
    "fsmagic",
    "fsuuid",
    "fsname",
    "uid",
    "euid",
    "gid",
    "egid",
    "fowner",
    "fgroup",
    "obj_user",
    "obj_role",
    "obj_type",
    "subj_user",
    "subj_role",
    "subj_type",
    "appraise_type",
    "template",
    "pcr",
];

/// Whether violations are only recorded or also denied (fanotify backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Measure,
    Enforce,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub action: String,
    pub conditions: Vec<(String, String)>,
}

impl Rule {
    pub fn condition(&self, key: &str) -> Option<&str> {
        self.conditions
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses one rule; errors say which token is wrong.
pub fn parse_rule(line: &str) -> Result<Rule> {
    let mut tokens = line.split_whitespace();
    let action = tokens
        .next()
        .ok_or_else(|| Error::InvalidArgument("empty IMA rule".into()))?;
    if !ACTIONS.contains(&action) {
        return Err(Error::InvalidArgument(format!(
            "IMA rule {line:?}: unknown action {action:?}"
        )));
    }
    let mut conditions = Vec::new();
    for t in tokens {
        let (k, v) = t.split_once(['=', '>', '<']).ok_or_else(|| {
            Error::InvalidArgument(format!("IMA rule {line:?}: {t:?} is not key=value"))
        })?;
        if !KEYS.contains(&k) {
            return Err(Error::InvalidArgument(format!(
                "IMA rule {line:?}: unknown condition {k:?}"
            )));
        }
        let ok = match k {
            "func" => FUNCS.contains(&v),
            "mask" => MASKS.contains(&v.trim_start_matches('^')),
            "uid" | "euid" | "gid" | "egid" | "fowner" | "fgroup" | "pcr" => {
                v.parse::<u32>().is_ok()
            }
            _ => !v.is_empty(),
        };
        if !ok {
            return Err(Error::InvalidArgument(format!(
                "IMA rule {line:?}: bad value {v:?} for {k}"
            )));
        }
        conditions.push((k.to_string(), v.to_string()));
    }
    Ok(Rule {
        action: action.to_string(),
        conditions,
    })
}

/// A policy source: rules, blank lines and `#` comments.
pub fn parse(text: &str) -> Result<Vec<Rule>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(parse_rule)
        .collect()
}

/// The text written to the kernel's `ima/policy`.
pub fn render(rules: &[Rule]) -> String {
    rules
        .iter()
        .map(|r| {
            let mut s = r.action.clone();
            for (k, v) in &r.conditions {
                s.push(' ');
                s.push_str(k);
                s.push('=');
                s.push_str(v);
            }
            s.push('\n');
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_syntax() {
        let rules = parse(
            "# executions and mmap-exec of the pod\nmeasure func=BPRM_CHECK mask=MAY_EXEC\n\nmeasure func=FILE_CHECK mask=^MAY_READ uid=0\ndont_measure fsmagic=0x9fa0\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].condition("func"), Some("BPRM_CHECK"));
        assert_eq!(rules[1].condition("mask"), Some("^MAY_READ"));
        assert_eq!(rules[2].action, "dont_measure");
        assert_eq!(
            render(&rules[..1]),
            "measure func=BPRM_CHECK mask=MAY_EXEC\n"
        );
    }

    #[test]
    fn rejects_bad_rules_naming_the_token() {
        for (bad, needle) in [
            ("mesure func=BPRM_CHECK", "mesure"),
            ("measure func=EXEC", "EXEC"),
            ("measure colour=red", "colour"),
            ("measure uid=root", "root"),
            ("measure func", "func"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
