//! The register workload's checker: linearizability per key (see [`super::linear`]).

use std::collections::BTreeMap;
use std::time::Duration;

use super::linear::{self, Call, RegOp, Verdict};
use super::Check;
use crate::history::{Completed, Kind, Op};

pub fn check(ops: &[Completed], budget_per_key: Duration) -> Check {
    let mut c = Check::new("register");
    let mut keys: BTreeMap<u64, Vec<Call>> = BTreeMap::new();
    let mut refs: BTreeMap<u64, Vec<&Completed>> = BTreeMap::new();
    let mut counts = [0u64; 3];
    for o in ops {
        let (key, op) = match (&o.op, o.kind) {
            (Op::Read { key, value }, Kind::Ok) => (*key, RegOp::Read(*value)),
            (Op::Write { key, value }, Kind::Ok | Kind::Info) => (*key, RegOp::Write(*value)),
            (Op::Cas { key, from, to }, Kind::Ok | Kind::Info) => (*key, RegOp::Cas(*from, *to)),
            _ => continue,
        };
        counts[match o.kind {
            Kind::Ok => 0,
            _ => 2,
        }] += 1;
        let list = keys.entry(key).or_default();
        let complete = if o.kind == Kind::Ok { o.complete } else { None };
        list.push(Call { op, invoke: o.invoke, complete, id: list.len() });
        refs.entry(key).or_default().push(o);
    }
    let mut unknown_keys = 0;
    for (key, calls) in &keys {
        match linear::check(calls, budget_per_key) {
            Verdict::Linearizable => {}
            Verdict::Unknown => {
                unknown_keys += 1;
                c.unknown(format!("key {key}: search exceeded its {budget_per_key:?} budget ({} ops)", calls.len()));
            }
            Verdict::NotLinearizable { stuck } => {
                let o = refs[key][stuck];
                c.anomaly(format!(
                    "key {key}: not linearizable; no order of the {} operations explains {} by process {} \
                     (events {}..{})",
                    calls.len(),
                    describe(&o.op),
                    o.process,
                    o.invoke,
                    o.complete.map_or("?".into(), |x| x.to_string())
                ));
            }
        }
    }
    c.stat("keys", keys.len());
    c.stat("ok_ops", counts[0]);
    c.stat("indeterminate_ops", counts[2]);
    c.stat("unknown_keys", unknown_keys);
    c.finish()
}

fn describe(op: &Op) -> String {
    match op {
        Op::Read { value, .. } => format!("read → {}", value.map_or("nil".into(), |v| v.to_string())),
        Op::Write { value, .. } => format!("write {value}"),
        Op::Cas { from, to, .. } => format!("cas {from}→{to}"),
        other => other.name().into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;

    fn op(process: u64, invoke: u64, complete: u64, kind: Kind, op: Op) -> Completed {
        Completed { process, invoke, complete: Some(complete), invoke_ns: 0, complete_ns: None, kind, op }
    }

    /// A CAS its precondition refused is recorded as the read it made (workload.rs); a stale
    /// one is an anomaly like any stale read.
    #[test]
    fn a_refused_cas_is_checked_as_the_read_it_made() {
        let w = |p, i, c, v| op(p, i, c, Kind::Ok, Op::Write { key: 1, value: v });
        let seen = |i, c, v| op(3, i, c, Kind::Ok, Op::Read { key: 1, value: Some(v) });
        let fresh = [w(1, 0, 1, 1), w(2, 2, 3, 2), seen(4, 5, 2)];
        assert_eq!(check(&fresh, Duration::from_secs(1)).valid, Validity::Valid);
        let stale = [w(1, 0, 1, 1), w(2, 2, 3, 2), seen(4, 5, 1)];
        let c = check(&stale, Duration::from_secs(1));
        assert_eq!(c.valid, Validity::Invalid, "{:?}", c.anomalies);
    }
}
