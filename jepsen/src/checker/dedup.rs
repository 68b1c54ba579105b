//! The dedup workload's checker. Per key, every add writes the same content into a namespace
//! with exact dedup, so:
//!
//! - **duplicated**: two acknowledged adds named different memories, or a read returned more
//!   than one memory;
//! - **foreign**: a read returned a memory other than the one the acknowledged adds named;
//! - **lost**: a read that began after an add was acknowledged returned nothing.
//!
//! The final reads (one per node, after the final heal) are ordinary reads here; a key without
//! a successful final read from every node makes the verdict unknown.

use std::collections::{BTreeMap, BTreeSet};

use super::Check;
use crate::history::{Completed, Kind, Op};

#[derive(Default)]
struct Key<'a> {
    acked: BTreeSet<&'a str>,
    /// Completion event of the first acknowledged add.
    first_ack: Option<u64>,
    reads: Vec<&'a Completed>,
}

pub fn check(ops: &[Completed], final_from: u64, nodes: usize) -> Check {
    let mut c = Check::new("dedup");
    let mut keys: BTreeMap<u64, Key> = BTreeMap::new();
    let (mut adds_ok, mut adds_info) = (0u64, 0u64);
    for o in ops {
        match &o.op {
            Op::DedupAdd { key, id } => {
                let k = keys.entry(*key).or_default();
                match (o.kind, id) {
                    (Kind::Ok, Some(id)) => {
                        adds_ok += 1;
                        k.acked.insert(id.as_str());
                        k.first_ack = match (k.first_ack, o.complete) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    (Kind::Info, _) | (Kind::Invoke, _) => adds_info += 1,
                    _ => {}
                }
            }
            Op::DedupRead { key, .. } => {
                let k = keys.entry(*key).or_default();
                if o.kind == Kind::Ok {
                    k.reads.push(o);
                }
            }
            _ => {}
        }
    }
    let mut reads = 0u64;
    for (key, k) in &keys {
        if k.acked.len() > 1 {
            c.anomaly(format!(
                "key {key}: duplicated: acknowledged adds named {} memories {:?}",
                k.acked.len(),
                k.acked
            ));
        }
        let mut finals = 0usize;
        for r in &k.reads {
            let Op::DedupRead { ids: Some(ids), .. } = &r.op else { continue };
            reads += 1;
            if r.invoke >= final_from {
                finals += 1;
            }
            if ids.len() > 1 {
                c.anomaly(format!("key {key}: duplicated: the read at event {} returned {ids:?}", r.invoke));
            }
            if let Some(id) = ids.first() {
                if !k.acked.is_empty() && !k.acked.contains(id.as_str()) {
                    c.anomaly(format!(
                        "key {key}: foreign: the read at event {} returned {id}, adds named {:?}",
                        r.invoke, k.acked
                    ));
                }
            } else if k.first_ack.is_some_and(|t| r.invoke > t) {
                c.anomaly(format!(
                    "key {key}: lost: the read at event {} returned nothing after the add acknowledged at event {}",
                    r.invoke,
                    k.first_ack.unwrap_or(0)
                ));
            }
        }
        if finals < nodes {
            c.unknown(format!("key {key}: {finals} of {nodes} final reads succeeded"));
        }
    }
    c.stat("keys", keys.len());
    c.stat("adds_ok", adds_ok);
    c.stat("adds_indeterminate", adds_info);
    c.stat("reads", reads);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(invoke: u64, complete: u64, kind: Kind, op: Op) -> Completed {
        Completed { process: invoke, invoke, complete: Some(complete), invoke_ns: 0, complete_ns: None, kind, op }
    }

    #[test]
    fn one_memory_is_valid_two_or_none_are_not() {
        let add = |i, id: &str| op(i, i + 1, Kind::Ok, Op::DedupAdd { key: 1, id: Some(id.into()) });
        let read = |i, ids: &[&str]| {
            op(i, i + 1, Kind::Ok, Op::DedupRead { key: 1, ids: Some(ids.iter().map(|s| s.to_string()).collect()) })
        };
        let good =
            vec![add(0, "a"), add(2, "a"), read(4, &["a"]), read(10, &["a"]), read(12, &["a"]), read(14, &["a"])];
        assert_eq!(check(&good, 10, 3).valid, super::super::Validity::Valid);
        let two = vec![add(0, "a"), add(2, "b"), read(10, &["a"]), read(12, &["a"]), read(14, &["a"])];
        assert_eq!(check(&two, 10, 3).valid, super::super::Validity::Invalid);
        let both = vec![add(0, "a"), read(10, &["a", "b"]), read(12, &["a"]), read(14, &["a"])];
        assert_eq!(check(&both, 10, 3).valid, super::super::Validity::Invalid);
        let lost = vec![add(0, "a"), read(10, &[]), read(12, &["a"]), read(14, &["a"])];
        assert_eq!(check(&lost, 10, 3).valid, super::super::Validity::Invalid);
        let short = vec![add(0, "a"), read(10, &["a"])];
        assert_eq!(check(&short, 10, 3).valid, super::super::Validity::Unknown);
    }
}
