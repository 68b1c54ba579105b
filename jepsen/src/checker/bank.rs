//! The bank workload's checker. Accounts `a0..aN` in one namespace start at
//! [`INITIAL`](crate::workload::BANK_INITIAL) each; a transfer moves an amount between two of
//! them in one atomic `PutBatch` guarded by both revisions. Whatever transfers applied, and
//! however many are indeterminate:
//!
//! - **wrong total**: a read's balances do not add up to the starting total (a transfer
//!   applied in part, or applied twice);
//! - **missing account**: a read lacks an account, or holds one that was never made;
//! - **negative**: an account went below zero (a transfer applied on a stale balance).
//!
//! Reads are linearizable `List`s of the namespace from the worker's home node; the final
//! reads (one per node) are ordinary reads here, and a missing one makes the verdict unknown.

use super::Check;
use crate::history::{Completed, Kind, Op};

pub fn check(ops: &[Completed], final_from: u64, nodes: usize, accounts: u64, initial: i64) -> Check {
    let mut c = Check::new("bank");
    let total = initial * accounts as i64;
    let (mut ok, mut failed, mut info, mut reads, mut finals) = (0u64, 0u64, 0u64, 0u64, 0usize);
    for o in ops {
        match &o.op {
            Op::Transfer { .. } => match o.kind {
                Kind::Ok => ok += 1,
                Kind::Fail => failed += 1,
                Kind::Info | Kind::Invoke => info += 1,
            },
            Op::ReadBank { balances: Some(b) } if o.kind == Kind::Ok => {
                reads += 1;
                if o.invoke >= final_from {
                    finals += 1;
                }
                let at = o.invoke;
                let keys: Vec<u64> = b.keys().copied().collect();
                if keys != (0..accounts).collect::<Vec<_>>() {
                    c.anomaly(format!("missing account: the read at event {at} holds accounts {keys:?}"));
                }
                let sum: i64 = b.values().sum();
                if sum != total {
                    c.anomaly(format!("wrong total: the read at event {at} adds up to {sum}, not {total}: {b:?}"));
                }
                if let Some((a, v)) = b.iter().find(|(_, v)| **v < 0) {
                    c.anomaly(format!("negative: the read at event {at} has account {a} at {v}"));
                }
            }
            _ => {}
        }
    }
    if ok + failed + info + reads > 0 && finals < nodes {
        c.unknown(format!("{finals} of {nodes} final reads succeeded"));
    }
    c.stat("transfers_ok", ok);
    c.stat("transfers_failed", failed);
    c.stat("transfers_indeterminate", info);
    c.stat("reads", reads);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;

    fn read(i: u64, b: &[i64]) -> Completed {
        let balances = Some(b.iter().enumerate().map(|(k, v)| (k as u64, *v)).collect());
        Completed {
            process: i,
            invoke: i,
            complete: Some(i + 1),
            invoke_ns: 0,
            complete_ns: None,
            kind: Kind::Ok,
            op: Op::ReadBank { balances },
        }
    }

    #[test]
    fn totals_must_be_conserved() {
        let good = vec![read(0, &[10, 10, 10]), read(10, &[5, 15, 10]), read(12, &[30, 0, 0]), read(14, &[1, 2, 27])];
        assert_eq!(check(&good, 10, 3, 3, 10).valid, Validity::Valid);
        let half =
            vec![read(0, &[5, 10, 10]), read(10, &[10, 10, 10]), read(12, &[10, 10, 10]), read(14, &[10, 10, 10])];
        assert_eq!(check(&half, 10, 3, 3, 10).valid, Validity::Invalid);
        let negative = vec![read(10, &[-5, 25, 10]), read(12, &[10, 10, 10]), read(14, &[10, 10, 10])];
        assert_eq!(check(&negative, 10, 3, 3, 10).valid, Validity::Invalid);
        let missing = vec![read(10, &[15, 15]), read(12, &[10, 10, 10]), read(14, &[10, 10, 10])];
        assert_eq!(check(&missing, 10, 3, 3, 10).valid, Validity::Invalid);
        let short = vec![read(10, &[10, 10, 10])];
        assert_eq!(check(&short, 10, 3, 3, 10).valid, Validity::Unknown);
    }
}
