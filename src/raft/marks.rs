//! State digests at [`Op::Mark`](super::Op::Mark) entries, for comparing replicas at one
//! common index (`engramctl cluster verify`).
//!
//! `apply` commits the entries up to and including a mark on their own, then opens a read
//! transaction: it sees the state exactly at the mark's index. The digest is computed from it on
//! the blocking pool, so applies go on meanwhile. Answers are kept for the last [`KEEP`]
//! marks: a node asked after it applied the mark still answers, and a node asked before waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redb::ReadTransaction;

/// Marks remembered per node.
const KEEP: usize = 16;
/// Digests computed at once per node.
const MAX_RUNNING: usize = 2;
/// Longest mark id a query may name (ids are 32 hex digits).
const MAX_ID_BYTES: usize = 64;
/// Longest a query may wait for a node to apply its mark.
const MAX_WAIT_MS: u32 = 60_000;

/// The field and the reason a query for mark `id`, waiting `wait_ms`, is refused; `None`: it is
/// well-formed. The admin and peer `MarkDigest` share these bounds.
pub fn bad_query(id: &str, wait_ms: u32) -> Option<(&'static str, String)> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Some(("mark_id", format!("a mark id has 1 to {MAX_ID_BYTES} characters")));
    }
    (wait_ms > MAX_WAIT_MS).then(|| ("wait_ms", format!("{wait_ms} ms is over {MAX_WAIT_MS}")))
}

/// What a node found at one mark (also a peer `MarkDigest` answer, bincode).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MarkDigest {
    pub id: String,
    pub index: u64,
    /// BLAKE3 over the data tables (`StateReader::data_digest`: not `sm_meta`, whose applied
    /// id is the mark's anyway, nor the ledger, whose chain may start at another index on a
    /// node that predates it), or why it could not be read.
    pub digest: Result<[u8; 32], String>,
    /// The ledger's head at the mark.
    pub head: Option<[u8; 32]>,
}

/// Cheap to clone: clones share the remembered digests.
#[derive(Clone)]
pub struct Marks {
    done: Arc<Mutex<VecDeque<MarkDigest>>>,
    /// Bumped after each digest is remembered.
    changed: Arc<tokio::sync::watch::Sender<u64>>,
    running: Arc<AtomicUsize>,
}

impl Default for Marks {
    fn default() -> Self {
        Marks { done: Arc::default(), changed: Arc::new(tokio::sync::watch::channel(0).0), running: Arc::default() }
    }
}

impl Marks {
    /// Digests the state `txn` sees (the mark `id` at `index` was its last applied entry) on a
    /// thread of its own.
    pub(crate) fn digest_later(&self, id: String, index: u64, txn: ReadTransaction) {
        // Each digest scans the whole state: a node replaying many marks (or asked for many)
        // answers the ones over the limit with an error instead of scanning them all at once.
        if self.running.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
            self.running.fetch_sub(1, Ordering::SeqCst);
            let digest = Err(format!("more than {MAX_RUNNING} mark digests were running"));
            return self.remember(MarkDigest { id, index, digest, head: None });
        }
        let this = self.clone();
        // Called from apply's blocking task, so inside the runtime.
        tokio::task::spawn_blocking(move || {
            let digest = crate::storage::StateReader::digest_in(&txn, false).map_err(|e| e.to_string());
            let head = crate::storage::ledger::last(&txn).ok().flatten().map(|l| l.head);
            drop(txn);
            this.running.fetch_sub(1, Ordering::SeqCst);
            this.remember(MarkDigest { id, index, digest, head });
        });
    }

    fn remember(&self, d: MarkDigest) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if done.len() == KEEP {
            done.pop_front();
        }
        done.push_back(d);
        drop(done);
        self.changed.send_modify(|n| *n += 1);
    }

    fn find(&self, id: &str) -> Option<MarkDigest> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).iter().find(|d| d.id == id).cloned()
    }

    /// The digest at mark `id`, waiting up to `timeout` for this node to apply it.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Option<MarkDigest> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(d) = self.find(id) {
                return Some(d);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Err(_) => return None,
                Ok(Err(_)) => return self.find(id),
                Ok(Ok(())) => {}
            }
        }
    }
}
