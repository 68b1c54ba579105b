//! The search-visibility checker. Every memory `id` is stored under its own vector (see
//! [`vector_for`]); a search asks for the nearest neighbour of that exact vector.
//! A memory is *known present* from the earliest of its acknowledged put and the end of the
//! first search that returned it; a delete *may have removed* it when it was acknowledged as
//! deleting something or its outcome is unknown. For every successful search:
//!
//! - **invisible**: the memory was known present before the search began and no delete that
//!   may have removed it had been invoked by the time the search ended, yet `id` is not the
//!   hit; or a delete invoked after it was known present found nothing to delete;
//! - **resurrected**: a hit whose deleting delete was acknowledged before the search began;
//! - **phantom**: a hit whose put was never invoked before the search ended, or definitely
//!   failed.
//!
//! Final searches (every acknowledged id, from every node, after the final heal) are
//! ordinary searches here.

use std::collections::{BTreeSet, HashMap};

use super::lifecycle::Lifecycle;
use super::Check;
use crate::history::{Completed, Kind, Op};

/// The vector memory `id` is stored under: deterministic, distinct per id, and far enough
/// apart that its exact nearest neighbour is itself.
pub fn vector_for(id: u64, dim: usize) -> Vec<f32> {
    // SplitMix64 over the id: cheap, well mixed, reproducible anywhere.
    let mut x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0x1234_5678);
    (0..dim)
        .map(|_| {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

pub fn check(ops: &[Completed], final_from: u64, nodes: usize) -> Check {
    let mut c = Check::new("search");
    let mut mems: HashMap<u64, Lifecycle> = HashMap::new();
    let mut searches: Vec<&Completed> = Vec::new();
    let (mut puts_ok, mut unputs_ok) = (0u64, 0u64);
    for o in ops {
        match &o.op {
            Op::Put { id } => {
                mems.entry(*id).or_default().add(o);
                if o.kind == Kind::Ok {
                    puts_ok += 1;
                }
            }
            Op::Unput { id, found } => unputs_ok += u64::from(mems.entry(*id).or_default().remove(o, *found)),
            Op::Search { .. } if o.kind == Kind::Ok => searches.push(o),
            _ => {}
        }
    }
    // A search that returned a memory proves it present from that search's end on.
    for s in &searches {
        let Op::Search { hits: Some(hits), .. } = &s.op else { continue };
        for h in hits {
            if let Some(m) = mems.get_mut(h) {
                m.seen(s.complete);
            }
        }
    }
    let (mut invisible, mut resurrected, mut phantom) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (id, m) in &mems {
        if let Some((t, start, end)) = m.lost_to_empty_removal() {
            if invisible.insert(*id) {
                c.anomaly(format!(
                    "memory {id} lost: present by event {t}, yet the delete at events {start}..{end} found nothing to delete"
                ));
            }
        }
    }
    let mut finals: HashMap<u64, usize> = HashMap::new();
    for s in &searches {
        let Op::Search { id, hits: Some(hits) } = &s.op else { continue };
        let (start, end) = (s.invoke, s.complete.unwrap_or(u64::MAX));
        if start >= final_from {
            *finals.entry(*id).or_default() += 1;
        }
        let m = mems.get(id);
        let present_before = m.and_then(|m| m.present_before(start));
        let deleting = m.is_some_and(|m| m.removing_before(end));
        if let Some(t) = present_before {
            if !deleting && !hits.contains(id) && invisible.insert(*id) {
                c.anomaly(format!(
                    "memory {id} invisible: present by event {t}, search at events {start}..{end} returned {hits:?}"
                ));
            }
        }
        for h in hits {
            let hm = mems.get(h);
            if let Some(t) = hm.and_then(|m| m.removed_before(start)) {
                if resurrected.insert(*h) {
                    c.anomaly(format!(
                        "memory {h} resurrected: delete acknowledged at event {t}, search at events {start}..{end} returned it"
                    ));
                }
            }
            let invoked = hm.is_some_and(|m| m.added_before(end));
            if (!invoked || hm.is_some_and(|m| m.add_failed())) && phantom.insert(*h) {
                c.anomaly(format!(
                    "memory {h} phantom: returned by the search at events {start}..{end} but never stored"
                ));
            }
        }
    }
    // Every present, never-deleted memory needs a final search from every node.
    let mut short = 0;
    for (id, m) in &mems {
        if m.present_by().is_some() && !m.ever_removed() && finals.get(id).copied().unwrap_or(0) < nodes {
            short += 1;
        }
    }
    if short > 0 {
        c.unknown(format!("{short} acknowledged memories lack a final search from each of {nodes} nodes"));
    }
    c.stat("memories", mems.len());
    c.stat("puts_ok", puts_ok);
    c.stat("deletes_ok", unputs_ok);
    c.stat("searches_ok", searches.len());
    c.stat("invisible", invisible.len());
    c.stat("resurrected", resurrected.len());
    c.stat("phantom", phantom.len());
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::super::Validity;
    use super::*;

    fn op(invoke: u64, complete: u64, kind: Kind, op: Op) -> Completed {
        Completed { process: 1, invoke, complete: Some(complete), invoke_ns: 0, complete_ns: None, kind, op }
    }
    fn search(invoke: u64, id: u64, hits: &[u64]) -> Completed {
        op(invoke, invoke + 1, Kind::Ok, Op::Search { id, hits: Some(hits.to_vec()) })
    }

    #[test]
    fn vectors_are_distinct_and_bounded() {
        let a = vector_for(1, 8);
        assert_eq!(a, vector_for(1, 8));
        assert_ne!(a, vector_for(2, 8));
        assert!(a.iter().all(|x| (-1.0..1.0).contains(x)));
    }

    #[test]
    fn acknowledged_puts_are_visible_and_deletes_stick() {
        let put = op(0, 1, Kind::Ok, Op::Put { id: 3 });
        assert_eq!(check(&[put.clone(), search(2, 3, &[3])], 2, 1).valid, Validity::Valid);
        let c = check(&[put.clone(), search(2, 3, &[])], 2, 1);
        assert!(c.anomalies[0].contains("invisible"));
        let del = op(2, 3, Kind::Ok, Op::Unput { id: 3, found: Some(true) });
        let c = check(&[put.clone(), del, search(4, 3, &[3])], 4, 1);
        assert!(c.anomalies[0].contains("resurrected"));
        let c = check(&[search(4, 3, &[7])], 4, 1);
        assert!(c.anomalies[0].contains("phantom"));
        // An indeterminate put may or may not be visible.
        let info = op(0, 1, Kind::Info, Op::Put { id: 3 });
        assert_eq!(check(&[info, search(2, 3, &[])], 2, 1).valid, Validity::Valid);
        // No final search: unknown.
        assert_eq!(check(&[put], 2, 1).valid, Validity::Unknown);
    }

    #[test]
    fn deletes_that_deleted_nothing_excuse_nothing() {
        let put = op(0, 1, Kind::Ok, Op::Put { id: 3 });
        let none = op(2, 3, Kind::Ok, Op::Unput { id: 3, found: Some(false) });
        let c = check(&[put.clone(), none, search(4, 3, &[])], 4, 1);
        assert!(c.anomalies.iter().any(|a| a.contains("found nothing")), "{:?}", c.anomalies);
        let failed = op(2, 3, Kind::Fail, Op::Unput { id: 3, found: None });
        let c = check(&[put, failed, search(4, 3, &[])], 4, 1);
        assert!(c.anomalies[0].contains("invisible"), "{:?}", c.anomalies);
        // An indeterminate put that a search saw must stay visible, and needs final searches.
        let info = op(0, 9, Kind::Info, Op::Put { id: 3 });
        let c = check(&[info.clone(), search(1, 3, &[3]), search(4, 3, &[])], 4, 1);
        assert!(c.anomalies[0].contains("invisible"), "{:?}", c.anomalies);
        assert_eq!(check(&[info, search(1, 3, &[3])], 4, 1).valid, Validity::Unknown);
    }
}
