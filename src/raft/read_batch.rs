//! Shared read barriers: linearizable reads that arrive while a leadership confirmation is in
//! flight wait for the next one and share it, as etcd batches ReadIndex requests.
//!
//! A read may use a confirmation only if the confirmation began after the read arrived
//! (otherwise a leader deposed in between could confirm a stale read index). So a round takes
//! exactly the reads waiting when it starts; reads arriving during the round wait for the next.
//! However many reads are concurrent, a node runs at most one round at a time, and a read waits
//! at most two rounds. Rounds run in their own task: a read whose client goes away leaves
//! nothing stuck for the others.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type RoundFn<T> = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = T> + Send>> + Send + Sync>;

/// Coalesces calls of one round function (a leadership confirmation).
pub(crate) struct ReadBatcher<T> {
    round: RoundFn<T>,
    state: Mutex<State<T>>,
    /// For metrics: which barrier this is.
    name: &'static str,
}

struct State<T> {
    /// A driver task is running rounds.
    running: bool,
    /// Reads waiting for the next round.
    waiting: Vec<oneshot::Sender<T>>,
}

impl<T: Clone + Send + 'static> ReadBatcher<T> {
    pub fn new<F, Fut>(name: &'static str, round: F) -> Arc<Self>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        Arc::new(ReadBatcher {
            round: Arc::new(move || Box::pin(round())),
            state: Mutex::new(State { running: false, waiting: Vec::new() }),
            name,
        })
    }

    /// The result of a round that started after this call; `None` only if the round's task
    /// died (the runtime is shutting down).
    pub async fn join(self: &Arc<Self>) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.waiting.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.drive().await });
        }
        rx.await.ok()
    }

    /// Runs rounds while reads wait, each for the reads waiting when it starts.
    async fn drive(&self) {
        loop {
            let batch = {
                let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
                if s.waiting.is_empty() {
                    s.running = false;
                    return;
                }
                std::mem::take(&mut s.waiting)
            };
            metrics::histogram!("engram_read_barrier_batch_size", "barrier" => self.name).record(batch.len() as f64);
            let result = (self.round)().await;
            for tx in batch {
                let _ = tx.send(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_that_start_after_they_arrive() {
        // Each round returns the number of rounds started before it, and takes 20 ms.
        let started = Arc::new(AtomicU64::new(0));
        let s = started.clone();
        let batcher = ReadBatcher::new("test", move || {
            let n = s.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                n
            }
        });
        // 200 reads at once: far fewer rounds than reads.
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (b, s) = (batcher.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                let before = s.load(Ordering::SeqCst);
                let got = b.join().await.unwrap();
                // The round that answered started at or after this read arrived.
                assert!(got >= before, "answered by round {got}, which started before the read (round {before})");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let rounds = started.load(Ordering::SeqCst);
        assert!((1..=3).contains(&rounds), "{rounds} rounds for 200 concurrent reads");
        // A read arriving during a round is answered by the next one, not the running one.
        let b = batcher.clone();
        let first = tokio::spawn(async move { b.join().await.unwrap() });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let second = batcher.join().await.unwrap();
        assert_eq!(second, first.await.unwrap() + 1);
    }

    #[tokio::test]
    async fn a_cancelled_read_leaves_nothing_stuck() {
        let batcher = ReadBatcher::new("test", || async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            7u8
        });
        let b = batcher.clone();
        let abandoned = tokio::spawn(async move { b.join().await });
        tokio::time::sleep(Duration::from_millis(1)).await;
        abandoned.abort();
        let got = tokio::time::timeout(Duration::from_secs(5), batcher.join()).await;
        assert_eq!(got.unwrap(), Some(7));
    }
}
