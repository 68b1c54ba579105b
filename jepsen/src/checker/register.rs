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
