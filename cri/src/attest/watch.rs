//! `attest watch`: every ready ima pod of a node verified each interval,
//! each new finding printed once as an `ALERT` line.

use anyhow::Result;
use imacri_api::attestation as pb;
use imacri_runtime::integrity::verify::Report;
use std::collections::HashSet;
use std::time::Duration;

use super::check::Checker;
use super::{client, fetch, Target, Trust};

pub(super) async fn watch(
    socket: &Target,
    trust: &Trust,
    interval: Duration,
    count: Option<u64>,
) -> Result<()> {
    let mut checker = Checker::load(trust)?;
    let mut seen: HashSet<String> = HashSet::new();
    let mut round = 0u64;
    loop {
        round += 1;
        match client(socket).await {
            Ok(mut c) => match c.list_pods(pb::ListPodsRequest {}).await {
                Ok(list) => {
                    for p in list.into_inner().pods.into_iter().filter(|p| p.ready) {
                        let nonce = rand::random::<[u8; 32]>().to_vec();
                        let alerts = match fetch(&mut c, &p.pod_sandbox_id, nonce.clone()).await {
                            Ok(ev) => match checker.check(&ev, &p.pod_sandbox_id, &nonce) {
                                Ok(r) => alert_lines(&p, &r),
                                Err(e) => vec![format!(
                                    "ALERT pod={} counters not recorded: {e:#}",
                                    p.pod_sandbox_id
                                )],
                            },
                            Err(e) => vec![format!(
                                "ALERT pod={} name={}/{} evidence unavailable: {e:#}",
                                p.pod_sandbox_id, p.namespace, p.name
                            )],
                        };
                        for a in alerts {
                            if seen.insert(a.clone()) {
                                println!("{a}");
                            }
                        }
                    }
                }
                Err(s) => eprintln!("ListPods: {}", s.message()),
            },
            Err(e) => eprintln!("{e:#}"),
        }
        if count.is_some_and(|n| round >= n) {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
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
    out
}
