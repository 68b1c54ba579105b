//! Cross-checks the harness's Wing–Gong checker against stateright's independent
//! linearizability tester on many small random histories: both must agree on every one,
//! linearizable or not. Indeterminate (never-returning) operations are included.

use std::time::Duration;

use engram_jepsen::checker::linear::{check, Call, RegOp, Verdict};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

#[derive(Clone, Debug, Default)]
struct Register(Option<u64>);

#[derive(Clone, Debug, PartialEq)]
enum SOp {
    Read,
    Write(u64),
    Cas(u64, u64),
}

#[derive(Clone, Debug, PartialEq)]
enum SRet {
    Read(Option<u64>),
    WriteOk,
    CasOk,
    CasFail,
}

impl SequentialSpec for Register {
    type Op = SOp;
    type Ret = SRet;
    fn invoke(&mut self, op: &SOp) -> SRet {
        match op {
            SOp::Read => SRet::Read(self.0),
            SOp::Write(v) => {
                self.0 = Some(*v);
                SRet::WriteOk
            }
            SOp::Cas(from, to) => {
                if self.0 == Some(*from) {
                    self.0 = Some(*to);
                    SRet::CasOk
                } else {
                    SRet::CasFail
                }
            }
        }
    }
}

/// One step of a random concurrent history: a thread invokes its next operation, or the
/// one it has in flight returns (or is abandoned: it never returns, like an `info`).
#[derive(Clone, Debug)]
struct Step {
    thread: usize,
    kind: u8,
    a: u64,
    b: u64,
    read: Option<u64>,
    abandon: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (0..3usize, 0..3u8, 1..4u64, 1..4u64, prop::option::of(1..4u64), prop::bool::weighted(0.15))
        .prop_map(|(thread, kind, a, b, read, abandon)| Step { thread, kind, a, b, read, abandon })
}

/// Returns (ours, stateright's) verdicts for the history the steps describe.
fn verdicts(steps: &[Step]) -> (bool, bool) {
    let mut tester = LinearizabilityTester::new(Register::default());
    let mut calls: Vec<Call> = Vec::new();
    // Per thread: the call index in flight, or abandoned for good.
    let mut in_flight: [Option<usize>; 3] = [None; 3];
    let mut dead = [false; 3];
    let mut clock = 0u64;
    for s in steps {
        if dead[s.thread] {
            continue;
        }
        clock += 1;
        match in_flight[s.thread] {
            None => {
                let (op, sop) = match s.kind {
                    0 => (RegOp::Read(s.read), SOp::Read),
                    1 => (RegOp::Write(s.a), SOp::Write(s.a)),
                    _ => (RegOp::Cas(s.a, s.b), SOp::Cas(s.a, s.b)),
                };
                tester.on_invoke(s.thread, sop).unwrap();
                in_flight[s.thread] = Some(calls.len());
                calls.push(Call { op, invoke: clock, complete: None, id: calls.len() });
            }
            Some(i) => {
                if s.abandon {
                    // Never returns. A pending read constrains nothing, so the harness drops
                    // it; stateright keeps it in flight, which is equivalent.
                    dead[s.thread] = true;
                    if matches!(calls[i].op, RegOp::Read(_)) {
                        calls[i].complete = Some(u64::MAX); // marked for removal below
                    }
                    continue;
                }
                let ret = match calls[i].op {
                    RegOp::Read(v) => SRet::Read(v),
                    RegOp::Write(_) => SRet::WriteOk,
                    RegOp::Cas(..) => SRet::CasOk,
                };
                tester.on_return(s.thread, ret).unwrap();
                calls[i].complete = Some(clock);
                in_flight[s.thread] = None;
            }
        }
    }
    // Reads still in flight at the end are dropped too (the harness never records them as ok).
    let ours: Vec<Call> = calls
        .iter()
        .filter(|c| !(matches!(c.op, RegOp::Read(_)) && matches!(c.complete, None | Some(u64::MAX))))
        .enumerate()
        .map(|(id, c)| Call { id, ..*c })
        .collect();
    let mine = match check(&ours, Duration::from_secs(10)) {
        Verdict::Linearizable => true,
        Verdict::NotLinearizable { .. } => false,
        Verdict::Unknown => panic!("small history ran out of budget"),
    };
    (mine, tester.is_consistent())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]
    #[test]
    fn agrees_with_stateright(steps in prop::collection::vec(step(), 1..18)) {
        let (mine, theirs) = verdicts(&steps);
        prop_assert_eq!(mine, theirs, "history: {:?}", steps);
    }
}

/// Both verdicts occur, so the agreement above is not vacuous.
#[test]
fn random_histories_cover_both_verdicts() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut yes, mut no) = (0, 0);
    for _ in 0..2000 {
        let steps = prop::collection::vec(step(), 1..18).new_tree(&mut runner).unwrap().current();
        let (mine, theirs) = verdicts(&steps);
        assert_eq!(mine, theirs, "{steps:?}");
        if mine {
            yes += 1
        } else {
            no += 1
        }
    }
    assert!(yes > 200 && no > 200, "linearizable {yes}, not {no}");
}
