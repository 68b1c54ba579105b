//! Checkers: each reads the paired history and returns a [`Check`].

pub mod bank;
pub mod dedup;
pub mod ledger;
mod lifecycle;
pub mod linear;
pub mod register;
pub mod search;
pub mod set;

use serde::{Deserialize, Serialize};

/// Jepsen's three-valued verdict. Unknown is never a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Validity {
    Valid,
    Invalid,
    Unknown,
}

impl Validity {
    /// Invalid beats unknown beats valid.
    pub fn and(self, other: Validity) -> Validity {
        use Validity::*;
        match (self, other) {
            (Invalid, _) | (_, Invalid) => Invalid,
            (Unknown, _) | (_, Unknown) => Unknown,
            _ => Valid,
        }
    }

    pub fn exit_code(self) -> i32 {
        match self {
            Validity::Valid => 0,
            Validity::Invalid => 1,
            Validity::Unknown => 2,
        }
    }
}

/// One checker's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub checker: String,
    pub valid: Validity,
    /// Counts worth reading (operations seen, keys checked, ...).
    pub stats: serde_json::Map<String, serde_json::Value>,
    /// Anomalies, each one line a person can follow back into the history (event indexes).
    pub anomalies: Vec<String>,
    /// Why the verdict is unknown, when it is.
    pub unknown: Vec<String>,
}

impl Check {
    pub fn new(checker: &str) -> Check {
        Check {
            checker: checker.into(),
            valid: Validity::Valid,
            stats: Default::default(),
            anomalies: Vec::new(),
            unknown: Vec::new(),
        }
    }

    pub fn stat(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.stats.insert(k.into(), v.into());
    }

    pub fn anomaly(&mut self, s: String) {
        self.valid = Validity::Invalid;
        self.anomalies.push(s);
    }

    pub fn unknown(&mut self, s: String) {
        self.valid = self.valid.and(Validity::Unknown);
        self.unknown.push(s);
    }

    /// Long anomaly lists are cut in the report; the count stays exact.
    pub fn finish(mut self) -> Check {
        self.stat("anomalies", self.anomalies.len());
        self.anomalies.truncate(200);
        self
    }
}
