//! `attest watch`: every ready ima pod of a node verified each interval,
//! each new finding printed once as an `ALERT` line.

use anyhow::Result;
use imacri_api::attestation as pb;
use imacri_runtime::integrity::verify::{self, Report};
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::check::Checker;
use super::{client, Target, Trust};

pub(super) async fn watch(
    socket: &Target,
    trust: &Trust,
    interval: Duration,
    count: Option<u64>,
) -> Result<()> {
    let mut checker = Checker::load(trust)?;
    let mut seen = Seen::default();
    let mut round = 0u64;
    loop {
        round += 1;
        match client(socket).await {
            Ok(mut c) => match c.list_pods(pb::ListPodsRequest {}).await {
                Ok(list) => {
                    let ready: Vec<pb::ImaPod> = list
                        .into_inner()
                        .pods
                        .into_iter()
                        .filter(|p| p.ready)
                        .collect();
                    seen.keep_only(ready.iter().map(|p| p.pod_sandbox_id.as_str()));
                    for p in ready {
                        let nonce = rand::random::<[u8; 32]>().to_vec();
                        let alerts = match checker.fetch(&mut c, &p.pod_sandbox_id, &nonce).await {
                            Ok(f) => alert_lines(
                                &p,
                                &checker.check_fetched(f, &p.pod_sandbox_id, &nonce),
                            ),
                            Err(e) => vec![format!(
                                "ALERT pod={} name={}/{} evidence unavailable: {e:#}",
                                p.pod_sandbox_id, p.namespace, p.name
                            )],
                        };
                        for a in seen.new_ones(&p.pod_sandbox_id, alerts) {
                            println!("{a}");
                        }
                    }
                }
                Err(s) => eprintln!("ListPods: {}", s.message()),
            },
            Err(e) => eprintln!("{e:#}"),
        }
        // Once a round: the checkpoint names every pod of the node's epoch.
        if let Err(e) = checker.save() {
            println!("ALERT counters not recorded: {e:#}");
        }
        if count.is_some_and(|n| round >= n) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

/// The alerts printed so far, by pod, each printed once. Only pods still
/// listed are remembered: a pod can fill its log with distinct
/// violations up to its quota, and a watcher running for months sees
/// many pods come and go.
#[derive(Default)]
struct Seen(HashMap<String, HashSet<String>>);

impl Seen {
    /// Forgets the pods not among `listed`.
    fn keep_only<'a>(&mut self, listed: impl Iterator<Item = &'a str>) {
        let listed: HashSet<&str> = listed.collect();
        self.0.retain(|pod, _| listed.contains(pod.as_str()));
    }

    /// The alerts of `pod` not printed before.
    fn new_ones(&mut self, pod: &str, alerts: Vec<String>) -> Vec<String> {
        let seen = self.0.entry(pod.to_string()).or_default();
        alerts
            .into_iter()
            .filter(|a| seen.insert(a.clone()))
            .collect()
    }
}

fn alert_lines(p: &pb::ImaPod, r: &Report) -> Vec<String> {
    let who = format!("pod={} name={}/{}", p.pod_sandbox_id, p.namespace, p.name);
    let mut out: Vec<String> = r
        .errors
        .iter()
        .map(|e| format!("ALERT {who} evidence invalid: {e}"))
        .collect();
    out.extend(r.violations.iter().map(|v| {
        format!(
            "ALERT {who} container={} {} path={} digest={} reason={:?}",
            v.container,
            v.event.as_str(),
            v.path,
            v.digest,
            v.reason
        )
    }));
    // Changes as it grows: printed again then.
    if r.violations_unlisted > 0 {
        out.push(format!(
            "ALERT {who} {} more violations, not listed (a report lists the first {}; `imacri attest log` shows every entry)",
            r.violations_unlisted,
            verify::LISTED_VIOLATIONS
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_printed_once_and_gone_pods_forgotten() {
        let mut seen = Seen::default();
        let a = |s: &str| vec![s.to_string()];
        assert_eq!(seen.new_ones("p1", a("x")), a("x"));
        assert!(seen.new_ones("p1", a("x")).is_empty());
        assert_eq!(seen.new_ones("p2", a("x")), a("x"), "per pod");
        seen.keep_only(["p2"].into_iter());
        assert_eq!(seen.0.len(), 1);
        assert!(seen.new_ones("p2", a("x")).is_empty());
    }

    #[test]
    fn violations_not_listed_are_alerted_as_their_count() {
        let p = pb::ImaPod {
            pod_sandbox_id: "p1".into(),
            ..Default::default()
        };
        let mut r = Report::invalid("p1", vec![]);
        assert!(alert_lines(&p, &r).is_empty());
        r.violations_unlisted = 7;
        let lines = alert_lines(&p, &r);
        assert_eq!(lines.len(), 1);
        assert!(
            lines[0].contains("7 more violations, not listed"),
            "{lines:?}"
        );
    }
}
