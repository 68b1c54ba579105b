//! What the set and search checkers both track for one item (a set element, a memory): when
//! it was added, when it was known present, and which removals may have removed it.
//!
//! An item is *known present* from the earliest of its acknowledged add and the end of the
//! first read that returned it. A removal *may have removed* it when it was acknowledged as
//! deleting something or its outcome is unknown; a removal that definitely failed, or was
//! acknowledged as finding nothing, removed nothing. Times are history event indexes.

use crate::history::{Completed, Kind};

#[derive(Debug, Default)]
pub struct Lifecycle {
    add_invoke: Option<u64>,
    add_failed: bool,
    /// When the item was known present: its acknowledged add, or a read that returned it.
    present_by: Option<u64>,
    /// A removal that may have removed it (deleted something, or outcome unknown).
    remove_invoke: Option<u64>,
    remove_ok: Option<u64>,
    /// An acknowledged removal that found nothing to delete: (invoke, complete).
    remove_found_nothing: Option<(u64, u64)>,
}

fn earliest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Lifecycle {
    /// Records an add (any outcome).
    pub fn add(&mut self, o: &Completed) {
        self.add_invoke = Some(o.invoke);
        match o.kind {
            Kind::Ok => self.present_by = earliest(self.present_by, o.complete),
            Kind::Fail => self.add_failed = true,
            Kind::Info | Kind::Invoke => {}
        }
    }

    /// Records a removal (any outcome); `found` is what an acknowledged removal reported.
    /// Returns whether it was acknowledged as deleting something.
    pub fn remove(&mut self, o: &Completed, found: Option<bool>) -> bool {
        match (o.kind, found) {
            (Kind::Ok, Some(false)) => {
                self.remove_found_nothing = Some((o.invoke, o.complete.unwrap_or(u64::MAX)));
                false
            }
            (Kind::Ok, _) => {
                self.remove_invoke = Some(o.invoke);
                self.remove_ok = o.complete;
                true
            }
            (Kind::Info, _) => {
                self.remove_invoke = Some(o.invoke);
                false
            }
            (Kind::Fail | Kind::Invoke, _) => false,
        }
    }

    /// A read that ended at `complete` returned the item. Returns whether that is the first
    /// evidence of it being present (no acknowledged add, no earlier read).
    pub fn seen(&mut self, complete: Option<u64>) -> bool {
        let first = self.present_by.is_none();
        self.present_by = earliest(self.present_by, complete);
        first
    }

    pub fn present_by(&self) -> Option<u64> {
        self.present_by
    }

    /// When it was known present strictly before event `start`.
    pub fn present_before(&self, start: u64) -> Option<u64> {
        self.present_by.filter(|t| *t < start)
    }

    /// Whether a removal that may have removed it was invoked before event `end`.
    pub fn removing_before(&self, end: u64) -> bool {
        self.remove_invoke.is_some_and(|t| t < end)
    }

    /// Whether any removal that may have removed it was ever invoked.
    pub fn ever_removed(&self) -> bool {
        self.remove_invoke.is_some()
    }

    /// When a removal that deleted it was acknowledged, if strictly before event `start`.
    pub fn removed_before(&self, start: u64) -> Option<u64> {
        self.remove_ok.filter(|t| *t < start)
    }

    /// Whether its add was invoked before event `end`.
    pub fn added_before(&self, end: u64) -> bool {
        self.add_invoke.is_some_and(|t| t < end)
    }

    pub fn add_failed(&self) -> bool {
        self.add_failed
    }

    /// A removal acknowledged as finding nothing, invoked after the item was known present:
    /// the item was lost. Returns (known present by, removal invoke, removal complete).
    pub fn lost_to_empty_removal(&self) -> Option<(u64, u64, u64)> {
        match (self.present_by, self.remove_found_nothing) {
            (Some(t), Some((start, end))) if t < start => Some((t, start, end)),
            _ => None,
        }
    }
}
