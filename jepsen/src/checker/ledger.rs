//! The ledger check, run against the live nodes after the final reads: every node's hash chain
//! over its applied entries checks out against its own log (`VerifyLedger`), every node holds
//! the same head at the last index all of them applied, and every node's whole state digest
//! is the same right after one mark entry (`cluster verify`). Unlike the other checkers it
//! reads the nodes, not the history.

use std::collections::BTreeMap;

use super::Check;
use crate::cluster::Cluster;

pub async fn check(cluster: &Cluster) -> Check {
    let mut c = Check::new("ledger");
    let mut lasts = Vec::new();
    for slot in 0..cluster.len() {
        let node = format!("n{}", slot + 1);
        match cluster.admin_client(slot).admin().verify_ledger().await {
            Ok(r) if r.ok => {
                c.stat(&format!("{node}_rows"), r.rows);
                c.stat(&format!("{node}_checked_against_log"), r.checked_against_log);
                lasts.push((slot, r.last_index));
            }
            Ok(r) => {
                c.anomaly(format!("{node}: ledger broken at index {}: {}", r.broken_index, r.reason));
                lasts.push((slot, r.applied_index));
            }
            Err(e) => c.unknown(format!("{node}: VerifyLedger failed: {e}")),
        }
    }
    let Some(at) = lasts.iter().map(|(_, l)| *l).min() else { return c.finish() };
    c.stat("compared_at_index", at);
    let mut heads: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (slot, _) in &lasts {
        let node = format!("n{}", slot + 1);
        match cluster.admin_client(*slot).admin().export_ledger(at, at, 1).await {
            Ok(p) => match p.links.first().filter(|l| l.index == at) {
                Some(l) => heads.entry(hex::encode(&l.head)).or_default().push(node),
                None => c.anomaly(format!("{node}: no ledger row at index {at}, which it applied")),
            },
            Err(e) => c.unknown(format!("{node}: ExportLedger failed: {e}")),
        }
    }
    if heads.len() > 1 {
        c.anomaly(format!("the nodes' ledger heads differ at index {at}: {heads:?}"));
    }
    states(cluster, &mut c).await;
    c.finish()
}

/// `cluster verify`: a mark through the leader, then every node's full state digest right
/// after it; they must all be equal.
async fn states(cluster: &Cluster, c: &mut Check) {
    // A leader may still be settling after the final heal: a few tries.
    let mut last_error = String::from("no leader to propose a mark");
    let mut mark = None;
    for _ in 0..10 {
        if let Some(leader) = cluster.leader().await {
            match cluster.admin_client(leader).admin().propose_mark().await {
                Ok(m) => {
                    mark = Some(m);
                    break;
                }
                Err(e) => last_error = format!("ProposeMark failed: {e}"),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let Some(mark) = mark else { return c.unknown(last_error) };
    c.stat("mark_index", mark.index);
    let mut digests: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for slot in 0..cluster.len() {
        let node = format!("n{}", slot + 1);
        let client = cluster.admin_client_with_timeout(slot, std::time::Duration::from_secs(35));
        match client.admin().mark_digest(&mark.mark_id, 30_000).await {
            Ok(d) => digests.entry(hex::encode(&d.digest)).or_default().push(node),
            Err(e) => c.unknown(format!("{node}: no state digest at mark {}: {e}", mark.index)),
        }
    }
    if digests.len() > 1 {
        c.anomaly(format!("the nodes' states differ at mark index {}: {digests:?}", mark.index));
    }
}
