//! Linearizability of a read / write / compare-and-set register, per key, by the
//! Wing–Gong search with Lowe's memoization (the algorithm behind Knossos' `wgl` and
//! Porcupine).
//!
//! The history of one key is a list of calls and returns in real-time order. The search
//! walks it, tentatively linearizing any call whose operation the register model accepts in
//! the current state, and backtracks when it meets the return of an operation it has not
//! linearized yet. A (linearized set, state) pair seen before is never explored again, which
//! keeps the search polynomial on the histories real systems produce.
//!
//! Indeterminate operations (`info`, or still open at the end) have no return: they may
//! take effect at any point after their call, or never. Failed operations did not happen and
//! are left out; so are reads that did not complete.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// One register operation with what it observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegOp {
    Read(Option<u64>),
    Write(u64),
    Cas(u64, u64),
}

/// An operation of one key's history. `complete` is None for an indeterminate operation.
/// Positions are event indexes (any totally ordered clock works).
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub op: RegOp,
    pub invoke: u64,
    pub complete: Option<u64>,
    /// Index into the caller's own list, for reporting.
    pub id: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Linearizable,
    /// No linearization exists. `stuck` is the completed operation the search could never
    /// get past, the place to start reading the history.
    NotLinearizable {
        stuck: usize,
    },
    /// The search ran out of its time budget: nothing is known.
    Unknown,
}

fn step(state: Option<u64>, op: RegOp) -> Option<Option<u64>> {
    match op {
        RegOp::Read(v) => (v == state).then_some(state),
        RegOp::Write(v) => Some(Some(v)),
        RegOp::Cas(from, to) => (state == Some(from)).then_some(Some(to)),
    }
}

#[derive(Clone, Copy)]
enum Entry {
    Call(usize),
    Return(usize),
}

/// A fixed-size bitset over operation numbers, hashed as the memo key.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Indeterminate writes (and compare-and-sets) whose value no operation ever observed can
/// be left out without changing the verdict: if one took effect, the next operation that
/// depends on the state is a write (no read returns its value, no compare-and-set expects
/// it), so removing it from a linearization leaves a linearization; and leaving it out is
/// one of its allowed outcomes anyway. With unique values almost every indeterminate write
/// is unobserved, and each one left in would double the search space.
fn prune_unobserved(calls: &[Call]) -> Vec<Call> {
    let mut observed = HashSet::new();
    for c in calls {
        match c.op {
            RegOp::Read(Some(v)) if c.complete.is_some() => {
                observed.insert(v);
            }
            RegOp::Cas(from, _) => {
                observed.insert(from);
            }
            _ => {}
        }
    }
    calls
        .iter()
        .filter(|c| match c.op {
            RegOp::Write(v) | RegOp::Cas(_, v) => c.complete.is_some() || observed.contains(&v),
            RegOp::Read(_) => true,
        })
        .copied()
        .collect()
}

/// Checks one key's history, starting from an absent register, within `budget`.
pub fn check(calls: &[Call], budget: Duration) -> Verdict {
    let calls = &prune_unobserved(calls)[..];
    let deadline = Instant::now() + budget;
    let n = calls.len();
    // Entries in time order; a return sorts after a call at the same position.
    let mut entries: Vec<(u64, u8, Entry)> = Vec::with_capacity(2 * n);
    for (i, c) in calls.iter().enumerate() {
        entries.push((c.invoke, 0, Entry::Call(i)));
        if let Some(t) = c.complete {
            entries.push((t, 1, Entry::Return(i)));
        }
    }
    entries.sort_by_key(|e| (e.0, e.1));
    let m = entries.len();
    // A doubly-linked list over entries, with a head sentinel at index m.
    let head = m;
    let mut next: Vec<usize> = (1..=m).chain(std::iter::once(0)).collect();
    let mut prev: Vec<usize> = std::iter::once(m).chain(0..m).collect();
    next[head] = if m == 0 { usize::MAX } else { 0 };
    if m > 0 {
        next[m - 1] = usize::MAX;
    }
    prev.push(usize::MAX);
    let mut ret_pos = vec![usize::MAX; n];
    for (pos, e) in entries.iter().enumerate() {
        if let Entry::Return(i) = e.2 {
            ret_pos[i] = pos;
        }
    }
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, p: usize| {
        let (a, b) = (prev[p], next[p]);
        next[a] = b;
        if b != usize::MAX {
            prev[b] = a;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, p: usize| {
        let (a, b) = (prev[p], next[p]);
        next[a] = p;
        if b != usize::MAX {
            prev[b] = p;
        }
    };

    let mut remaining = calls.iter().filter(|c| c.complete.is_some()).count();
    let mut state: Option<u64> = None;
    let mut linearized = Bits::new(n);
    let mut seen: HashSet<(Bits, Option<u64>)> = HashSet::new();
    // (call position, state before it)
    let mut stack: Vec<(usize, Option<u64>)> = Vec::new();
    let mut cur = next[head];
    let mut iterations: u64 = 0;
    // The completed operation the search reached furthest before failing.
    let mut stuck: Option<usize> = None;
    loop {
        if remaining == 0 {
            return Verdict::Linearizable;
        }
        iterations += 1;
        if iterations.is_multiple_of(4096) && Instant::now() >= deadline {
            return Verdict::Unknown;
        }
        if cur == usize::MAX {
            // Only indeterminate calls are left ahead and none fits: backtrack.
            match backtrack(&mut stack, &mut state, &mut linearized, &mut remaining, &entries, calls) {
                Some(p) => {
                    relink_op(&mut next, &mut prev, p, &ret_pos, &entries, relink);
                    cur = next[p];
                }
                None => return Verdict::NotLinearizable { stuck: stuck.map_or(0, |s| calls[s].id) },
            }
            continue;
        }
        match entries[cur].2 {
            Entry::Call(i) => {
                if let Some(s) = step(state, calls[i].op) {
                    let mut lin = linearized.clone();
                    lin.set(i);
                    if seen.insert((lin.clone(), s)) {
                        stack.push((cur, state));
                        state = s;
                        linearized = lin;
                        if calls[i].complete.is_some() {
                            remaining -= 1;
                        }
                        // Lift the call and its return out of the list.
                        unlink(&mut next, &mut prev, cur);
                        if ret_pos[i] != usize::MAX {
                            unlink(&mut next, &mut prev, ret_pos[i]);
                        }
                        cur = next[head];
                        continue;
                    }
                }
                cur = next[cur];
            }
            Entry::Return(i) => {
                if stuck.is_none_or(|s: usize| calls[s].complete < calls[i].complete) {
                    stuck = Some(i);
                }
                match backtrack(&mut stack, &mut state, &mut linearized, &mut remaining, &entries, calls) {
                    Some(p) => {
                        relink_op(&mut next, &mut prev, p, &ret_pos, &entries, relink);
                        cur = next[p];
                    }
                    None => return Verdict::NotLinearizable { stuck: calls[stuck.unwrap_or(i)].id },
                }
            }
        }
    }
}

fn backtrack(
    stack: &mut Vec<(usize, Option<u64>)>,
    state: &mut Option<u64>,
    linearized: &mut Bits,
    remaining: &mut usize,
    entries: &[(u64, u8, Entry)],
    calls: &[Call],
) -> Option<usize> {
    let (p, s) = stack.pop()?;
    let Entry::Call(i) = entries[p].2 else { unreachable!("only calls are stacked") };
    *state = s;
    linearized.clear(i);
    if calls[i].complete.is_some() {
        *remaining += 1;
    }
    Some(p)
}

fn relink_op(
    next: &mut Vec<usize>,
    prev: &mut Vec<usize>,
    p: usize,
    ret_pos: &[usize],
    entries: &[(u64, u8, Entry)],
    relink: impl Fn(&mut Vec<usize>, &mut Vec<usize>, usize),
) {
    let Entry::Call(i) = entries[p].2 else { unreachable!() };
    // Reinsert in the reverse order of removal.
    if ret_pos[i] != usize::MAX {
        relink(next, prev, ret_pos[i]);
    }
    relink(next, prev, p);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, op: RegOp, invoke: u64, complete: Option<u64>) -> Call {
        Call { op, invoke, complete, id }
    }
    const B: Duration = Duration::from_secs(5);

    #[test]
    fn sequential_histories() {
        let h = [c(0, RegOp::Write(1), 0, Some(1)), c(1, RegOp::Read(Some(1)), 2, Some(3))];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        let h = [c(0, RegOp::Write(1), 0, Some(1)), c(1, RegOp::Read(None), 2, Some(3))];
        assert_eq!(check(&h, B), Verdict::NotLinearizable { stuck: 1 });
        assert_eq!(check(&[c(0, RegOp::Read(None), 0, Some(1))], B), Verdict::Linearizable);
        assert_eq!(check(&[], B), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        // write 1 overlaps a read of 1 and a read of nothing.
        let h = [
            c(0, RegOp::Write(1), 0, Some(10)),
            c(1, RegOp::Read(Some(1)), 1, Some(3)),
            c(2, RegOp::Read(None), 2, Some(4)),
        ];
        // The read of None ends after the read of 1 started but both overlap the write...
        // None must precede the write, 1 must follow it: read(None) [2,4] then write then
        // read(1) [1,3]? read(1) must finish by 3 and read(None) starts at 2: write at 2.5
        // after read(None) at 2.2 and before read(1) at 2.7 works.
        assert_eq!(check(&h, B), Verdict::Linearizable);
        // A stale read after a newer read completed is not linearizable.
        let h = [
            c(0, RegOp::Write(1), 0, Some(1)),
            c(1, RegOp::Write(2), 2, Some(10)),
            c(2, RegOp::Read(Some(2)), 3, Some(4)),
            c(3, RegOp::Read(Some(1)), 5, Some(6)),
        ];
        assert!(matches!(check(&h, B), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn indeterminate_writes_may_or_may_not_happen() {
        let w = c(0, RegOp::Write(7), 0, None);
        assert_eq!(check(&[w, c(1, RegOp::Read(Some(7)), 5, Some(6))], B), Verdict::Linearizable);
        assert_eq!(check(&[w, c(1, RegOp::Read(None), 5, Some(6))], B), Verdict::Linearizable);
        // ...but not both: once seen, it cannot vanish.
        let h = [w, c(1, RegOp::Read(Some(7)), 5, Some(6)), c(2, RegOp::Read(None), 7, Some(8))];
        assert!(matches!(check(&h, B), Verdict::NotLinearizable { .. }));
        // ...and not before it was invoked.
        let h = [c(1, RegOp::Read(Some(7)), 0, Some(1)), c(0, RegOp::Write(7), 2, None)];
        assert!(matches!(check(&h, B), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn compare_and_set() {
        let h = [
            c(0, RegOp::Write(1), 0, Some(1)),
            c(1, RegOp::Cas(1, 2), 2, Some(3)),
            c(2, RegOp::Read(Some(2)), 4, Some(5)),
        ];
        assert_eq!(check(&h, B), Verdict::Linearizable);
        let h = [c(0, RegOp::Write(1), 0, Some(1)), c(1, RegOp::Cas(3, 2), 2, Some(3))];
        assert!(matches!(check(&h, B), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn a_tiny_budget_gives_unknown_never_a_pass() {
        // Many concurrent indeterminate writes, each observed by a later read in an order
        // that no linearization explains (the reads see them in reverse): a big search.
        let n = 40;
        let mut h: Vec<Call> = (0..n).map(|i| c(i, RegOp::Write(i as u64), i as u64, None)).collect();
        for i in 0..n {
            h.push(c(n + i, RegOp::Read(Some((n - 1 - i) as u64)), 100 + 2 * i as u64, Some(101 + 2 * i as u64)));
        }
        h.push(c(2 * n, RegOp::Read(Some(999)), 1000, Some(1001)));
        assert_eq!(check(&h, Duration::ZERO), Verdict::Unknown);
    }

    #[test]
    fn unobserved_indeterminate_writes_do_not_blow_up_the_search() {
        // 60 concurrent writes that timed out, none ever read: decided at once.
        let mut h: Vec<Call> = (0..60).map(|i| c(i, RegOp::Write(i as u64), i as u64, None)).collect();
        h.push(c(60, RegOp::Read(None), 100, Some(101)));
        assert_eq!(check(&h, Duration::from_millis(100)), Verdict::Linearizable);
        h.push(c(61, RegOp::Read(Some(7)), 102, Some(103)));
        assert_eq!(check(&h, Duration::from_millis(100)), Verdict::Linearizable);
        // ...and a stale read after the observed one is still caught.
        h.push(c(62, RegOp::Read(None), 104, Some(105)));
        assert!(matches!(check(&h, Duration::from_millis(100)), Verdict::NotLinearizable { .. }));
    }
}
