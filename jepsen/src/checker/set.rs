//! The set workload's checker. An element is *known present* from the earliest of its
//! acknowledged add and the end of the first read that returned it (so an indeterminate add
//! that a read saw counts like an acknowledged one). A removal *may have removed* the element
//! when it was acknowledged as deleting something or its outcome is unknown; a removal that
//! definitely failed, or was acknowledged as finding nothing, removed nothing. For every set
//! (key):
//!
//! - **lost**: a read that began after the element was known present, while no removal that
//!   may have removed it had been invoked by the read's end, lacks the element; or a removal
//!   invoked after the element was known present found nothing to delete;
//! - **unexpected**: an element is present whose add was never invoked before the read ended,
//!   or whose add definitely failed;
//! - **resurrected**: an element whose deleting removal was acknowledged before the read began
//!   is present.
//!
//! The final reads (one per node, after the final heal) are ordinary reads here, so "every
//! acknowledged add survives to the end" is the lost check at the end of the history. A set
//! without a successful final read from every node makes the verdict unknown.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::lifecycle::Lifecycle;
use super::Check;
use crate::history::{Completed, Kind, Op};

/// `final_from` is the event index from which reads count as final reads; `nodes` is how
/// many final reads each set needs.
pub fn check(ops: &[Completed], final_from: u64, nodes: usize) -> Check {
    let mut c = Check::new("set");
    let mut sets: BTreeMap<u64, HashMap<u64, Lifecycle>> = BTreeMap::new();
    let mut reads: Vec<&Completed> = Vec::new();
    let (mut adds_ok, mut adds_info, mut removes_ok, mut seen_unacked) = (0u64, 0u64, 0u64, 0u64);
    for o in ops {
        match &o.op {
            Op::Add { key, element } => {
                sets.entry(*key).or_default().entry(*element).or_default().add(o);
                match o.kind {
                    Kind::Ok => adds_ok += 1,
                    Kind::Info => adds_info += 1,
                    Kind::Fail | Kind::Invoke => {}
                }
            }
            Op::Remove { key, element, found } => {
                let e = sets.entry(*key).or_default().entry(*element).or_default();
                if e.remove(o, *found) {
                    removes_ok += 1;
                }
            }
            Op::ReadSet { key, .. } => {
                sets.entry(*key).or_default();
                if o.kind == Kind::Ok {
                    reads.push(o);
                }
            }
            _ => {}
        }
    }
    // A read that returned an element proves it present from that read's end on.
    for r in &reads {
        let Op::ReadSet { key, elements: Some(got) } = &r.op else { continue };
        let elements = sets.get_mut(key).expect("every read's set is known");
        for el in got {
            if elements.get_mut(el).is_some_and(|e| e.seen(r.complete)) {
                seen_unacked += 1;
            }
        }
    }
    let mut final_reads: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut lost, mut unexpected, mut resurrected) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for (key, elements) in &sets {
        for (el, e) in elements {
            if let Some((t, start, end)) = e.lost_to_empty_removal() {
                if lost.insert((*key, *el)) {
                    c.anomaly(format!(
                        "set {key}: element {el} lost: present by event {t}, yet the removal at events {start}..{end} found nothing to delete"
                    ));
                }
            }
        }
    }
    for r in &reads {
        let Op::ReadSet { key, elements: Some(got) } = &r.op else { continue };
        let (start, end) = (r.invoke, r.complete.unwrap_or(u64::MAX));
        if start >= final_from {
            *final_reads.entry(*key).or_default() += 1;
        }
        let got: BTreeSet<u64> = got.iter().copied().collect();
        let elements = &sets[key];
        for (el, e) in elements {
            let removing = e.removing_before(end);
            if let Some(t) = e.present_before(start) {
                if !removing && !got.contains(el) && lost.insert((*key, *el)) {
                    c.anomaly(format!(
                        "set {key}: element {el} lost: present by event {t}, missing from the read at events {start}..{end}"
                    ));
                }
            }
            if let Some(t) = e.removed_before(start) {
                if got.contains(el) && resurrected.insert((*key, *el)) {
                    c.anomaly(format!(
                        "set {key}: element {el} resurrected: removal acknowledged at event {t}, present in the read at events {start}..{end}"
                    ));
                }
            }
        }
        for el in &got {
            let invoked = elements.get(el).is_some_and(|e| e.added_before(end));
            if !invoked && unexpected.insert((*key, *el)) {
                c.anomaly(format!(
                    "set {key}: element {el} unexpected: never added before the read at events {start}..{end}"
                ));
            }
            if elements.get(el).is_some_and(|e| e.add_failed()) && unexpected.insert((*key, *el)) {
                c.anomaly(format!(
                    "set {key}: element {el} unexpected: its add definitely failed, yet the read at events {start}..{end} has it"
                ));
            }
        }
    }
    for key in sets.keys() {
        let n = final_reads.get(key).copied().unwrap_or(0);
        if n < nodes {
            c.unknown(format!("set {key}: {n} of {nodes} final reads succeeded"));
        }
    }
    c.stat("sets", sets.len());
    c.stat("adds_ok", adds_ok);
    c.stat("adds_indeterminate", adds_info);
    c.stat("seen_without_ack", seen_unacked);
    c.stat("removes_ok", removes_ok);
    c.stat("reads_ok", reads.len());
    c.stat("lost", lost.len());
    c.stat("unexpected", unexpected.len());
    c.stat("resurrected", resurrected.len());
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, invoke: u64, complete: u64, kind: Kind, op: Op) -> Completed {
        Completed { process, invoke, complete: Some(complete), invoke_ns: 0, complete_ns: None, kind, op }
    }
    fn read(invoke: u64, complete: u64, els: &[u64]) -> Completed {
        op(9, invoke, complete, Kind::Ok, Op::ReadSet { key: 1, elements: Some(els.to_vec()) })
    }
    fn add(invoke: u64, complete: u64, kind: Kind, el: u64) -> Completed {
        op(1, invoke, complete, kind, Op::Add { key: 1, element: el })
    }

    #[test]
    fn acknowledged_adds_must_be_read() {
        let h = [add(0, 1, Kind::Ok, 5), read(2, 3, &[5])];
        assert_eq!(check(&h, 2, 1).valid, super::super::Validity::Valid);
        let h = [add(0, 1, Kind::Ok, 5), read(2, 3, &[])];
        let c = check(&h, 2, 1);
        assert_eq!(c.valid, super::super::Validity::Invalid);
        assert!(c.anomalies[0].contains("lost"), "{:?}", c.anomalies);
    }

    #[test]
    fn indeterminate_adds_may_go_either_way_but_nothing_appears_from_nowhere() {
        let h = [add(0, 1, Kind::Info, 5), read(2, 3, &[])];
        assert_eq!(check(&h, 2, 1).valid, super::super::Validity::Valid);
        let h = [add(0, 1, Kind::Info, 5), read(2, 3, &[5])];
        assert_eq!(check(&h, 2, 1).valid, super::super::Validity::Valid);
        let c = check(&[read(2, 3, &[6])], 2, 1);
        assert!(c.anomalies[0].contains("unexpected"), "{:?}", c.anomalies);
        // An add that definitely failed must not show up either.
        let c = check(&[add(0, 1, Kind::Fail, 5), read(2, 3, &[5])], 2, 1);
        assert!(c.anomalies[0].contains("definitely failed"), "{:?}", c.anomalies);
    }

    #[test]
    fn removed_elements_stay_removed() {
        let h = [add(0, 1, Kind::Ok, 5), remove(2, 3, Kind::Ok, Some(true)), read(4, 5, &[5])];
        let c = check(&h, 4, 1);
        assert!(c.anomalies[0].contains("resurrected"), "{:?}", c.anomalies);
        // A removal still in flight during the read excuses absence.
        let h = [add(0, 1, Kind::Ok, 5), remove(2, 9, Kind::Info, None), read(4, 5, &[])];
        assert_eq!(check(&h, 4, 1).valid, super::super::Validity::Valid);
    }

    fn remove(invoke: u64, complete: u64, kind: Kind, found: Option<bool>) -> Completed {
        op(1, invoke, complete, kind, Op::Remove { key: 1, element: 5, found })
    }

    #[test]
    fn removals_that_removed_nothing_excuse_nothing() {
        // The add was acknowledged, then the removal found nothing: the element was lost.
        let h = [add(0, 1, Kind::Ok, 5), remove(2, 3, Kind::Ok, Some(false)), read(4, 5, &[])];
        let c = check(&h, 4, 1);
        assert!(c.anomalies[0].contains("found nothing"), "{:?}", c.anomalies);
        // A removal that definitely failed removed nothing, so a later read must still have it.
        let h = [add(0, 1, Kind::Ok, 5), remove(2, 3, Kind::Fail, None), read(4, 5, &[])];
        let c = check(&h, 4, 1);
        assert!(c.anomalies[0].contains("missing from the read"), "{:?}", c.anomalies);
        // A removal concurrent with the add may find nothing; the add then wins.
        let h = [add(0, 3, Kind::Ok, 5), remove(1, 2, Kind::Ok, Some(false)), read(4, 5, &[5])];
        assert_eq!(check(&h, 4, 1).valid, super::super::Validity::Valid);
        let h = [add(0, 3, Kind::Ok, 5), remove(1, 2, Kind::Ok, Some(false)), read(4, 5, &[])];
        assert_eq!(check(&h, 4, 1).valid, super::super::Validity::Invalid);
    }

    #[test]
    fn an_indeterminate_add_once_read_must_stay() {
        let h = [add(0, 9, Kind::Info, 5), read(1, 2, &[5]), read(3, 4, &[])];
        let c = check(&h, 3, 1);
        assert!(c.anomalies[0].contains("present by event 2"), "{:?}", c.anomalies);
        // Reads that overlap say nothing about each other's order.
        let h = [add(0, 9, Kind::Info, 5), read(1, 4, &[5]), read(3, 5, &[])];
        assert_eq!(check(&h, 3, 1).valid, super::super::Validity::Valid);
    }

    #[test]
    fn missing_final_reads_make_it_unknown() {
        let h = [add(0, 1, Kind::Ok, 5), read(2, 3, &[5])];
        assert_eq!(check(&h, 2, 3).valid, super::super::Validity::Unknown);
    }
}
