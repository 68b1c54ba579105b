//! The history: every client operation as invoke → ok / fail / info, and every nemesis action,
//! in the order the harness saw them. Written as JSON lines, one event per line.
//!
//! Outcomes follow Jepsen: `ok` and `fail` are definite (the operation took effect, or
//! certainly did not); `info` is indeterminate (a timeout, a lost connection, a write that
//! may have been applied). A process that got `info` is retired: it may still have an
//! operation in flight, so its worker continues under a fresh process id.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// Client process ids from here on belong to the final reads, after the final heal.
pub const FINAL_PROCESSES: u64 = 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Invoke,
    Ok,
    Fail,
    Info,
}

/// Who acted: a client process, or the nemesis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Process {
    Client(u64),
    Nemesis(NemesisTag),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NemesisTag {
    Nemesis,
}

/// What an operation does. Values a read or search returns are filled in on its `ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Op {
    /// Register: read a key (None = absent).
    Read { key: u64, value: Option<u64> },
    /// Register: write a unique value.
    Write { key: u64, value: u64 },
    /// Register: set `to` if the value is `from`.
    Cas { key: u64, from: u64, to: u64 },
    /// Set: add a unique element to set `key`.
    Add { key: u64, element: u64 },
    /// Set: delete an element whose add was acknowledged. `found` is filled in on `ok`:
    /// whether there was anything to delete.
    Remove {
        key: u64,
        element: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        found: Option<bool>,
    },
    /// Set: read the whole set.
    ReadSet { key: u64, elements: Option<Vec<u64>> },
    /// Search: store memory `id` under its own vector.
    Put { id: u64 },
    /// Search: delete memory `id`; `found` as for `Remove`.
    Unput {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        found: Option<bool>,
    },
    /// Search: nearest neighbour of `id`'s vector.
    Search { id: u64, hits: Option<Vec<u64>> },
    /// Dedup: add the memory with text `fact <key>` (no id) to the key's dedup namespace;
    /// `id` is the memory the answer named, filled in on `ok`.
    DedupAdd {
        key: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Dedup: the ids of every memory in the key's namespace.
    DedupRead { key: u64, ids: Option<Vec<String>> },
    /// Bank: move `amount` from account `from` to account `to`, atomically.
    Transfer { from: u64, to: u64, amount: i64 },
    /// Bank: every account's balance.
    ReadBank { balances: Option<std::collections::BTreeMap<u64, i64>> },
    /// A fault starting or healing.
    Nemesis { fault: String, detail: String },
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Cas { .. } => "cas",
            Op::Add { .. } => "add",
            Op::Remove { .. } => "remove",
            Op::ReadSet { .. } => "read-set",
            Op::Put { .. } => "put",
            Op::Unput { .. } => "unput",
            Op::Search { .. } => "search",
            Op::DedupAdd { .. } => "dedup-add",
            Op::DedupRead { .. } => "dedup-read",
            Op::Transfer { .. } => "transfer",
            Op::ReadBank { .. } => "read-bank",
            Op::Nemesis { .. } => "nemesis",
        }
    }

    /// Reads change nothing, so an indeterminate read constrains nothing either.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Op::Read { .. } | Op::ReadSet { .. } | Op::Search { .. } | Op::DedupRead { .. } | Op::ReadBank { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub index: u64,
    /// Nanoseconds since the run started (monotonic).
    pub time_ns: u64,
    pub process: Process,
    #[serde(rename = "type")]
    pub kind: Kind,
    #[serde(flatten)]
    pub op: Op,
    /// The node slot the client sent the operation to first.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
}

/// Records events in order, appending each to the history file as it happens.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
    start: Instant,
}

struct Inner {
    events: Vec<Event>,
    out: Option<BufWriter<File>>,
}

impl Recorder {
    pub fn new(path: Option<&Path>) -> std::io::Result<Recorder> {
        let out = match path {
            Some(p) => Some(BufWriter::new(File::create(p)?)),
            None => None,
        };
        Ok(Recorder { inner: Arc::new(Mutex::new(Inner { events: Vec::new(), out })), start: Instant::now() })
    }

    pub fn elapsed_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn record(&self, process: Process, kind: Kind, op: Op, node: Option<usize>, error: Option<String>) {
        let mut inner = self.inner.lock().unwrap();
        // Time is taken under the lock so that indexes and times agree.
        let e = Event { index: inner.events.len() as u64, time_ns: self.elapsed_ns(), process, kind, op, node, error };
        if let Some(out) = inner.out.as_mut() {
            let _ = serde_json::to_writer(&mut *out, &e);
            let _ = out.write_all(b"\n");
        }
        inner.events.push(e);
    }

    pub fn flush(&self) -> std::io::Result<()> {
        match self.inner.lock().unwrap().out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }

    pub fn events(&self) -> Vec<Event> {
        self.inner.lock().unwrap().events.clone()
    }
}

pub fn load(path: &Path) -> anyhow::Result<Vec<Event>> {
    let mut out = Vec::new();
    for (n, line) in BufReader::new(File::open(path)?).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?);
    }
    Ok(out)
}

/// An operation with its invocation and completion paired up.
#[derive(Debug, Clone)]
pub struct Completed {
    pub process: u64,
    /// Event index of the invocation and of the completion (None: still open at the end,
    /// which the checkers treat exactly like `info`).
    pub invoke: u64,
    pub complete: Option<u64>,
    pub invoke_ns: u64,
    pub complete_ns: Option<u64>,
    pub kind: Kind,
    /// The op as completed (with read values), or as invoked when indeterminate.
    pub op: Op,
}

impl Completed {
    pub fn ok(&self) -> bool {
        self.kind == Kind::Ok
    }
}

/// Pairs each client invocation with its completion. Nemesis events are skipped.
pub fn pair(events: &[Event]) -> Vec<Completed> {
    let mut open: std::collections::HashMap<u64, usize> = Default::default();
    let mut out: Vec<Completed> = Vec::new();
    for e in events {
        let Process::Client(p) = e.process else { continue };
        match e.kind {
            Kind::Invoke => {
                open.insert(p, out.len());
                out.push(Completed {
                    process: p,
                    invoke: e.index,
                    complete: None,
                    invoke_ns: e.time_ns,
                    complete_ns: None,
                    kind: Kind::Info,
                    op: e.op.clone(),
                });
            }
            kind => {
                if let Some(i) = open.remove(&p) {
                    let c = &mut out[i];
                    c.complete = Some(e.index);
                    c.complete_ns = Some(e.time_ns);
                    c.kind = kind;
                    if kind == Kind::Ok {
                        c.op = e.op.clone();
                    }
                }
            }
        }
    }
    out
}
