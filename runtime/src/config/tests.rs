use super::*;

#[test]
fn default_toml_matches_default() {
    assert_eq!(Config::parse(DEFAULT_TOML).unwrap(), Config::default());
}

#[test]
fn unknown_keys_are_rejected() {
    let err = Config::parse("sokcet = \"/x\"").unwrap_err().to_string();
    assert!(err.contains("sokcet"), "{err}");
}

#[test]
fn ima_config_is_validated() {
    let e = Config::parse("[ima]\ndefault_policy = \"strict\"\n").unwrap_err();
    assert!(e.contains("strict"), "{e}");
    let e = Config::parse("[ima.policies.default]\nrules = [\"measure func=NOPE\"]\n").unwrap_err();
    assert!(e.contains("NOPE"), "{e}");
    let e = Config::parse("[ima]\nbackend = \"magic\"\n").unwrap_err();
    assert!(e.contains("magic"), "{e}");
    let c = Config::parse("[ima]\nbackend = \"kernel\"\n").unwrap();
    assert_eq!(
        c.ima.backend,
        crate::integrity::setting::BackendChoice::Kernel
    );
}

#[test]
fn namespace_rules_name_known_policies_and_fall_back_to_the_star() {
    let e = Config::parse("[ima.namespaces.a]\npolicies = [\"nope\"]\n").unwrap_err();
    assert!(e.contains("nope") && e.contains("ima.namespaces"), "{e}");
    let e = Config::parse("[ima.namespaces.a]\nrequired = true\n").unwrap_err();
    assert!(e.contains("required"), "{e}");
    let c = Config::parse(
        "[ima.namespaces.a]\nrequire = true\n[ima.namespaces.\"*\"]\npolicies = [\"default\"]\n",
    )
    .unwrap();
    let (name, a) = c.ima.namespace_rule("a").unwrap();
    assert!(name == "a" && a.require && a.policies.is_empty());
    let (name, b) = c.ima.namespace_rule("b").unwrap();
    assert!(name == "*" && !b.require && b.policies == ["default"]);
    assert!(Config::default().ima.namespace_rule("a").is_none());
}

#[test]
fn partial_config_keeps_defaults() {
    let c = Config::parse("[containerd]\nnamespace = \"other\"\n").unwrap();
    assert_eq!(c.containerd.namespace, "other");
    assert_eq!(c.containerd.snapshotter, "overlayfs");
}
