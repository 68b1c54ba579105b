//! Clients and generators. Every worker is a tokio task with a process id and a "home" node:
//! reads go to the home node only (so a stale node is caught serving stale reads), writes
//! go to the home node first and follow leader hints. Operations on one key are shared by a
//! small group of workers for a bounded number of operations, then the group moves to a fresh
//! key (Jepsen's independent keys), which keeps every per-key linearizability search small.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use engram::client::{Client, ClientError, Consistency, Metric, NewMemory, Precondition, RetryPolicy, WriteOutcome};
use engram::proto as pb;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tonic::Code;

use crate::checker::search::vector_for;
use crate::cluster::api_addr;
use crate::history::{Kind, Op, Process, Recorder};

pub const REGISTER_NS: &str = "register";
pub const SEARCH_NS: &str = "search";
pub const SEARCH_DIM: usize = 8;
pub const BANK_NS: &str = "bank";
/// Accounts `a0..a<BANK_ACCOUNTS>`, each starting at [`BANK_INITIAL`].
pub const BANK_ACCOUNTS: u64 = 5;
pub const BANK_INITIAL: i64 = 100;
const REGISTER_VEC: [f32; 4] = [1.0, 0.0, 0.0, 0.0];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadOptions {
    pub register: bool,
    pub set: bool,
    pub search: bool,
    #[serde(default)]
    pub dedup: bool,
    #[serde(default)]
    pub dedup_workers: usize,
    #[serde(default)]
    pub bank: bool,
    #[serde(default)]
    pub bank_workers: usize,
    /// Workers per register key group; there are `register_groups` groups.
    pub register_group: usize,
    pub register_groups: usize,
    pub set_workers: usize,
    pub search_workers: usize,
    pub ops_per_key: u64,
    pub set_ops_per_key: u64,
    /// Pause between a worker's operations, in ms (uniform in [d/2, 3d/2]).
    pub think_ms: u64,
}

/// What the final phase must read back.
#[derive(Default)]
pub struct Touched {
    pub register_keys: std::sync::Mutex<BTreeSet<u64>>,
    pub set_keys: std::sync::Mutex<BTreeSet<u64>>,
    pub search_ids: std::sync::Mutex<BTreeSet<u64>>,
    pub dedup_keys: std::sync::Mutex<BTreeSet<u64>>,
}

pub struct Ctx {
    pub rec: Recorder,
    pub nodes: usize,
    pub stop: AtomicBool,
    pub touched: Touched,
    values: AtomicU64,
    keys: AtomicU64,
    workers: u64,
}

fn retry(attempts: u32, timeout: Duration) -> RetryPolicy {
    RetryPolicy {
        max_attempts: attempts,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(250),
        timeout,
        ..RetryPolicy::default()
    }
}

/// A client whose first choice is `home`, then the others in order.
pub fn writer_for(home: usize, nodes: usize) -> Client {
    let eps: Vec<String> = (0..nodes).map(|i| api_addr((home + i) % nodes)).collect();
    Client::with_options(eps, crate::cluster::workload_options(retry(4, Duration::from_secs(2)))).expect("endpoints")
}

/// A client that only ever talks to `home`.
pub fn reader_for(home: usize) -> Client {
    Client::with_options([api_addr(home)], crate::cluster::workload_options(retry(1, Duration::from_secs(4))))
        .expect("endpoint")
}

/// How a failed call completes its operation.
fn outcome(e: &ClientError, read: bool) -> Kind {
    if read || e.outcome == WriteOutcome::NotApplied {
        Kind::Fail
    } else {
        Kind::Info
    }
}

struct Worker {
    ctx: Arc<Ctx>,
    process: u64,
    home: usize,
    writer: Client,
    reader: Client,
    rng: StdRng,
}

impl Worker {
    fn new(ctx: Arc<Ctx>, index: u64, seed: u64) -> Worker {
        let home = index as usize % ctx.nodes;
        Worker {
            writer: writer_for(home, ctx.nodes),
            reader: reader_for(home),
            process: index,
            home,
            rng: StdRng::seed_from_u64(seed ^ index.wrapping_mul(0x9E37_79B9)),
            ctx,
        }
    }

    fn invoke(&self, op: &Op) {
        self.ctx.rec.record(Process::Client(self.process), Kind::Invoke, op.clone(), Some(self.home), None);
    }

    /// Records the completion; an indeterminate one retires the process.
    fn complete(&mut self, kind: Kind, op: Op, error: Option<String>) {
        self.ctx.rec.record(Process::Client(self.process), kind, op, Some(self.home), error);
        if kind == Kind::Info {
            self.process += self.ctx.workers;
        }
    }

    async fn think(&mut self, think_ms: u64) {
        let d = self.rng.random_range(think_ms / 2..=think_ms * 3 / 2);
        tokio::time::sleep(Duration::from_millis(d)).await;
    }

    fn value(&self) -> u64 {
        self.ctx.values.fetch_add(1, Ordering::Relaxed)
    }
}

/// Register key ownership shared by a group of workers.
struct KeyGroup {
    key: u64,
    left: u64,
    /// Values written to the current key, for plausible compare-and-sets.
    written: Vec<u64>,
}

impl KeyGroup {
    fn take(&mut self, ctx: &Ctx, per_key: u64) -> u64 {
        if self.left == 0 {
            self.key = ctx.keys.fetch_add(1, Ordering::Relaxed);
            self.left = per_key;
            self.written.clear();
            ctx.touched.register_keys.lock().unwrap().insert(self.key);
        }
        self.left -= 1;
        self.key
    }
}

async fn register_worker(mut w: Worker, group: Arc<Mutex<KeyGroup>>, opts: WorkloadOptions) {
    while !w.ctx.stop.load(Ordering::Relaxed) {
        let (key, cas_from) = {
            let mut g = group.lock().await;
            let key = g.take(&w.ctx, opts.ops_per_key);
            let from = (!g.written.is_empty()).then(|| g.written[g.written.len().saturating_sub(3)..].to_vec());
            (key, from)
        };
        let id = format!("k{key}");
        let roll: f64 = w.rng.random();
        let op = match cas_from {
            Some(from) if roll < 0.25 => {
                let from = from[w.rng.random_range(0..from.len())];
                Op::Cas { key, from, to: w.value() }
            }
            _ if roll < 0.6 => Op::Write { key, value: w.value() },
            _ => Op::Read { key, value: None },
        };
        if let Op::Write { value, .. } | Op::Cas { to: value, .. } = op {
            group.lock().await.written.push(value);
        }
        w.invoke(&op);
        let (kind, done, err) = match op.clone() {
            Op::Read { key, .. } => match read_register(&w.reader, &id).await {
                Ok((value, _)) => (Kind::Ok, Op::Read { key, value }, None),
                Err(e) => (outcome(&e, true), op, Some(e.to_string())),
            },
            Op::Write { value, .. } => {
                let m = NewMemory::new(value.to_string(), REGISTER_VEC.to_vec()).with_id(&id);
                match w.writer.put(REGISTER_NS, m).await {
                    Ok(_) => (Kind::Ok, op, None),
                    Err(e) => (outcome(&e, false), op, Some(e.to_string())),
                }
            }
            Op::Cas { from, to, .. } => match read_register(&w.reader, &id).await {
                Ok((Some(v), rev)) if v == from => {
                    let m = NewMemory::new(to.to_string(), REGISTER_VEC.to_vec()).with_id(&id);
                    match w.writer.put_if(REGISTER_NS, m, Precondition::IfRevision(rev)).await {
                        Ok(_) => (Kind::Ok, op, None),
                        // Refused by its revision: nothing was written, and the linearizable
                        // read it made inside this operation's window saw `from`. Recorded as
                        // that read, the checker can use it (a refused CAS is an observation).
                        Err(e) if e.code == Code::FailedPrecondition => {
                            (Kind::Ok, Op::Read { key, value: Some(from) }, None)
                        }
                        Err(e) => (outcome(&e, false), op, Some(e.to_string())),
                    }
                }
                // The precondition does not hold: the CAS is the linearizable read it made.
                Ok((v, _)) => (Kind::Ok, Op::Read { key, value: v }, None),
                Err(e) => (Kind::Fail, op, Some(format!("reading before cas: {e}"))),
            },
            _ => unreachable!(),
        };
        w.complete(kind, done, err);
        w.think(opts.think_ms).await;
    }
}

/// A read that returned something the workload never writes: failed, nothing applied.
fn unreadable(message: String) -> ClientError {
    ClientError { code: Code::Internal, message, field: None, outcome: WriteOutcome::NotApplied, retry_after: None }
}

/// The register's value and revision, None when absent.
async fn read_register(c: &Client, id: &str) -> Result<(Option<u64>, u64), ClientError> {
    match c.get_with(REGISTER_NS, id, Consistency::Linearizable).await {
        Ok(r) => {
            let m = r.memory.unwrap_or_default();
            let v = m.text.parse::<u64>().map_err(|_| unreadable(format!("register {id} holds {:?}", m.text)))?;
            Ok((Some(v), m.revision))
        }
        Err(e) if e.code == Code::NotFound => Ok((None, 0)),
        Err(e) => Err(e),
    }
}

pub fn set_ns(key: u64) -> String {
    format!("set-{key}")
}

struct SetGroup {
    key: Option<u64>,
    left: u64,
    acked: Vec<u64>,
}

async fn create_namespace(c: &Client, ns: &str, dim: u32, metric: Metric, ctx: &Ctx) -> bool {
    while !ctx.stop.load(Ordering::Relaxed) {
        match c.create_namespace(ns, dim, metric).await {
            Ok(_) => return true,
            Err(e) if e.code == Code::AlreadyExists => return true,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    false
}

async fn set_worker(mut w: Worker, group: Arc<Mutex<SetGroup>>, opts: WorkloadOptions) {
    while !w.ctx.stop.load(Ordering::Relaxed) {
        let (key, victim) = {
            let mut g = group.lock().await;
            if g.key.is_none() || g.left == 0 {
                let key = w.ctx.keys.fetch_add(1, Ordering::Relaxed);
                if !create_namespace(&w.writer, &set_ns(key), 4, Metric::Cosine, &w.ctx).await {
                    return;
                }
                w.ctx.touched.set_keys.lock().unwrap().insert(key);
                *g = SetGroup { key: Some(key), left: opts.set_ops_per_key, acked: Vec::new() };
            }
            g.left -= 1;
            let roll: f64 = w.rng.random();
            let victim = if roll < 0.1 && !g.acked.is_empty() {
                let i = w.rng.random_range(0..g.acked.len());
                Some(g.acked.swap_remove(i))
            } else {
                None
            };
            (g.key.unwrap(), victim.map(Some).unwrap_or_else(|| (roll > 0.8).then_some(u64::MAX)))
        };
        let ns = set_ns(key);
        let op = match victim {
            Some(u64::MAX) => Op::ReadSet { key, elements: None },
            Some(element) => Op::Remove { key, element, found: None },
            None => Op::Add { key, element: w.value() },
        };
        w.invoke(&op);
        let (kind, done, err) = match op.clone() {
            Op::Add { element, .. } => {
                let m =
                    NewMemory::new(format!("element {element}"), REGISTER_VEC.to_vec()).with_id(format!("e{element}"));
                match w.writer.put(&ns, m).await {
                    Ok(_) => {
                        group.lock().await.acked.push(element);
                        (Kind::Ok, op, None)
                    }
                    Err(e) => (outcome(&e, false), op, Some(e.to_string())),
                }
            }
            Op::Remove { element, .. } => match w.writer.delete(&ns, &format!("e{element}")).await {
                Ok(r) => (Kind::Ok, Op::Remove { key, element, found: Some(r.deleted) }, None),
                Err(e) => (outcome(&e, false), op, Some(e.to_string())),
            },
            Op::ReadSet { .. } => match read_set(&w.reader, key).await {
                Ok(elements) => (Kind::Ok, Op::ReadSet { key, elements: Some(elements) }, None),
                Err(e) => (Kind::Fail, op, Some(e.to_string())),
            },
            _ => unreachable!(),
        };
        w.complete(kind, done, err);
        w.think(opts.think_ms).await;
    }
}

pub fn dedup_ns(key: u64) -> String {
    format!("dedup/k{key}")
}

/// Operations the dedup workers spend on one key before moving on together.
const DEDUP_OPS_PER_KEY: u64 = 40;

struct DedupGroup {
    key: Option<u64>,
    left: u64,
}

/// All dedup workers add the same memory (no id, so the leader makes a new id each time) to
/// the same key at once, and read the key's namespace back: exact dedup in `apply` must
/// leave one memory, named in every acknowledged answer, never two and never none.
async fn dedup_worker(mut w: Worker, group: Arc<Mutex<DedupGroup>>, _opts: WorkloadOptions) {
    while !w.ctx.stop.load(Ordering::Relaxed) {
        let key = {
            let mut g = group.lock().await;
            if g.key.is_none() || g.left == 0 {
                let key = w.ctx.keys.fetch_add(1, Ordering::Relaxed);
                let policy = pb::MemoryPolicy { dedup: pb::DedupMode::Text as i32, ..Default::default() };
                loop {
                    if w.ctx.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    match w
                        .writer
                        .create_namespace_with_policy(&dedup_ns(key), 4, Metric::Cosine, Some(policy.clone()))
                        .await
                    {
                        Ok(_) => break,
                        Err(e) if e.code == Code::AlreadyExists => break,
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
                w.ctx.touched.dedup_keys.lock().unwrap().insert(key);
                *g = DedupGroup { key: Some(key), left: DEDUP_OPS_PER_KEY };
            }
            g.left -= 1;
            g.key.unwrap()
        };
        let read = w.rng.random::<f64>() < 0.3;
        let op = if read { Op::DedupRead { key, ids: None } } else { Op::DedupAdd { key, id: None } };
        w.invoke(&op);
        let (kind, done, err) = if read {
            match read_dedup(&w.reader, key).await {
                Ok(ids) => (Kind::Ok, Op::DedupRead { key, ids: Some(ids) }, None),
                Err(e) => (Kind::Fail, op, Some(e.to_string())),
            }
        } else {
            match w.writer.put(&dedup_ns(key), NewMemory::new(format!("fact {key}"), REGISTER_VEC.to_vec())).await {
                Ok(r) => (Kind::Ok, Op::DedupAdd { key, id: Some(r.id) }, None),
                Err(e) => (outcome(&e, false), op, Some(e.to_string())),
            }
        };
        w.complete(kind, done, err);
        w.think(40).await;
    }
}

pub async fn read_dedup(c: &Client, key: u64) -> Result<Vec<String>, ClientError> {
    Ok(c.list_all(&dedup_ns(key)).await?.into_iter().map(|m| m.id).collect())
}

pub async fn read_set(c: &Client, key: u64) -> Result<Vec<u64>, ClientError> {
    let mut out = Vec::new();
    for m in c.list_all(&set_ns(key)).await? {
        out.push(m.id.strip_prefix('e').and_then(|s| s.parse().ok()).unwrap_or(u64::MAX));
    }
    Ok(out)
}

struct SearchPool {
    acked: Vec<u64>,
}

pub fn search_request(id: u64) -> pb::SearchRequest {
    pb::SearchRequest {
        namespace: SEARCH_NS.into(),
        vector: vector_for(id, SEARCH_DIM),
        k: 1,
        consistency: Consistency::Linearizable as i32,
        ..Default::default()
    }
}

pub fn hit_ids(r: &pb::SearchResponse) -> Vec<u64> {
    r.hits.iter().map(|h| h.id.strip_prefix('m').and_then(|s| s.parse().ok()).unwrap_or(u64::MAX)).collect()
}

async fn search_worker(mut w: Worker, pool: Arc<Mutex<SearchPool>>, opts: WorkloadOptions) {
    while !w.ctx.stop.load(Ordering::Relaxed) {
        let op = {
            let mut p = pool.lock().await;
            let roll: f64 = w.rng.random();
            if p.acked.is_empty() || roll < 0.45 {
                Op::Put { id: w.value() }
            } else if roll < 0.55 {
                let i = w.rng.random_range(0..p.acked.len());
                Op::Unput { id: p.acked.swap_remove(i), found: None }
            } else {
                // Mostly recent memories: the freshest writes are the interesting ones.
                let n = p.acked.len();
                let i = n - 1 - w.rng.random_range(0..n.min(20));
                Op::Search { id: p.acked[i], hits: None }
            }
        };
        w.invoke(&op);
        let (kind, done, err) = match op.clone() {
            Op::Put { id } => {
                w.ctx.touched.search_ids.lock().unwrap().insert(id);
                let m = NewMemory::new(format!("memory {id}"), vector_for(id, SEARCH_DIM)).with_id(format!("m{id}"));
                match w.writer.put(SEARCH_NS, m).await {
                    Ok(_) => {
                        pool.lock().await.acked.push(id);
                        (Kind::Ok, op, None)
                    }
                    Err(e) => (outcome(&e, false), op, Some(e.to_string())),
                }
            }
            Op::Unput { id, .. } => match w.writer.delete(SEARCH_NS, &format!("m{id}")).await {
                Ok(r) => (Kind::Ok, Op::Unput { id, found: Some(r.deleted) }, None),
                Err(e) => (outcome(&e, false), op, Some(e.to_string())),
            },
            Op::Search { id, .. } => match w.reader.search_with(search_request(id)).await {
                Ok(r) => (Kind::Ok, Op::Search { id, hits: Some(hit_ids(&r)) }, None),
                Err(e) => (Kind::Fail, op, Some(e.to_string())),
            },
            _ => unreachable!(),
        };
        w.complete(kind, done, err);
        w.think(opts.think_ms).await;
    }
}

impl Ctx {
    pub fn new(rec: Recorder, nodes: usize, opts: &WorkloadOptions) -> Arc<Ctx> {
        let workers = total_workers(opts);
        Arc::new(Ctx {
            rec,
            nodes,
            stop: AtomicBool::new(false),
            touched: Touched::default(),
            values: AtomicU64::new(1),
            keys: AtomicU64::new(1),
            workers,
        })
    }
}

pub fn total_workers(o: &WorkloadOptions) -> u64 {
    let mut n = 0;
    if o.register {
        n += o.register_group * o.register_groups;
    }
    if o.set {
        n += o.set_workers;
    }
    if o.search {
        n += o.search_workers;
    }
    if o.dedup {
        n += o.dedup_workers;
    }
    if o.bank {
        n += o.bank_workers;
    }
    n as u64
}

/// Creates the fixed namespaces.
pub async fn setup(ctx: &Ctx, opts: &WorkloadOptions) -> anyhow::Result<()> {
    let c = writer_for(0, ctx.nodes);
    if opts.register && !create_namespace(&c, REGISTER_NS, 4, Metric::Cosine, ctx).await {
        anyhow::bail!("could not create the register namespace");
    }
    if opts.search && !create_namespace(&c, SEARCH_NS, SEARCH_DIM as u32, Metric::L2, ctx).await {
        anyhow::bail!("could not create the search namespace");
    }
    if opts.bank {
        if !create_namespace(&c, BANK_NS, 4, Metric::Cosine, ctx).await {
            anyhow::bail!("could not create the bank namespace");
        }
        // Every account at once, each only if absent: a retry after an indeterminate first
        // try is refused whole, never applied twice.
        let accounts: Vec<(NewMemory, Precondition)> =
            (0..BANK_ACCOUNTS).map(|a| (account(a, BANK_INITIAL), Precondition::IfAbsent)).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match c.put_batch(BANK_NS, accounts.clone()).await {
                Ok(_) => break,
                Err(e) if e.code == Code::FailedPrecondition => break,
                Err(e) if std::time::Instant::now() > deadline => anyhow::bail!("opening the bank: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    Ok(())
}

fn account(a: u64, balance: i64) -> NewMemory {
    NewMemory::new(balance.to_string(), REGISTER_VEC.to_vec()).with_id(format!("a{a}"))
}

/// Every account's balance (a linearizable list of the bank).
pub async fn read_bank(c: &Client) -> Result<std::collections::BTreeMap<u64, i64>, ClientError> {
    let mut out = std::collections::BTreeMap::new();
    for m in c.list_all(BANK_NS).await? {
        let a = m.id.strip_prefix('a').and_then(|s| s.parse().ok()).unwrap_or(u64::MAX);
        let v = m.text.parse::<i64>().map_err(|_| unreadable(format!("account {} holds {:?}", m.id, m.text)))?;
        out.insert(a, v);
    }
    Ok(out)
}

/// The balance and revision of one account.
async fn read_account(c: &Client, a: u64) -> Result<(i64, u64), ClientError> {
    let m = c.get_with(BANK_NS, &format!("a{a}"), Consistency::Linearizable).await?.memory.unwrap_or_default();
    let v = m.text.parse::<i64>().map_err(|_| unreadable(format!("account a{a} holds {:?}", m.text)))?;
    Ok((v, m.revision))
}

/// Transfers between random accounts, each one `PutBatch` of both new balances guarded by
/// both revisions (so it applies whole or not at all, and never on a stale balance), and
/// reads of every balance.
async fn bank_worker(mut w: Worker, opts: WorkloadOptions) {
    while !w.ctx.stop.load(Ordering::Relaxed) {
        let op = if w.rng.random::<f64>() < 0.3 {
            Op::ReadBank { balances: None }
        } else {
            let from = w.rng.random_range(0..BANK_ACCOUNTS);
            let to = (from + w.rng.random_range(1..BANK_ACCOUNTS)) % BANK_ACCOUNTS;
            Op::Transfer { from, to, amount: w.rng.random_range(1..=BANK_INITIAL / 2) }
        };
        w.invoke(&op);
        let (kind, done, err) = match op.clone() {
            Op::ReadBank { .. } => match read_bank(&w.reader).await {
                Ok(b) => (Kind::Ok, Op::ReadBank { balances: Some(b) }, None),
                Err(e) => (Kind::Fail, op, Some(e.to_string())),
            },
            Op::Transfer { from, to, amount } => {
                match (read_account(&w.reader, from).await, read_account(&w.reader, to).await) {
                    (Ok((bf, _)), Ok(_)) if bf < amount => (Kind::Fail, op, Some(format!("a{from} holds only {bf}"))),
                    (Ok((bf, rf)), Ok((bt, rt))) => {
                        let items = vec![
                            (account(from, bf - amount), Precondition::IfRevision(rf)),
                            (account(to, bt + amount), Precondition::IfRevision(rt)),
                        ];
                        match w.writer.put_batch(BANK_NS, items).await {
                            Ok(_) => (Kind::Ok, op, None),
                            Err(e) => (outcome(&e, false), op, Some(e.to_string())),
                        }
                    }
                    (Err(e), _) | (_, Err(e)) => (Kind::Fail, op, Some(format!("reading before transfer: {e}"))),
                }
            }
            _ => unreachable!(),
        };
        w.complete(kind, done, err);
        w.think(opts.think_ms).await;
    }
}

/// Starts every worker; they run until `ctx.stop` is set.
pub fn spawn(ctx: &Arc<Ctx>, opts: &WorkloadOptions, seed: u64) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let mut index = 0u64;
    let mut next = || {
        let i = index;
        index += 1;
        i
    };
    if opts.register {
        for _ in 0..opts.register_groups {
            let g = Arc::new(Mutex::new(KeyGroup { key: 0, left: 0, written: Vec::new() }));
            for _ in 0..opts.register_group {
                let w = Worker::new(ctx.clone(), next(), seed);
                tasks.push(tokio::spawn(register_worker(w, g.clone(), opts.clone())));
            }
        }
    }
    if opts.set {
        let g = Arc::new(Mutex::new(SetGroup { key: None, left: 0, acked: Vec::new() }));
        for _ in 0..opts.set_workers {
            let w = Worker::new(ctx.clone(), next(), seed);
            tasks.push(tokio::spawn(set_worker(w, g.clone(), opts.clone())));
        }
    }
    if opts.search {
        let p = Arc::new(Mutex::new(SearchPool { acked: Vec::new() }));
        for _ in 0..opts.search_workers {
            let w = Worker::new(ctx.clone(), next(), seed);
            tasks.push(tokio::spawn(search_worker(w, p.clone(), opts.clone())));
        }
    }
    if opts.dedup {
        let g = Arc::new(Mutex::new(DedupGroup { key: None, left: 0 }));
        for _ in 0..opts.dedup_workers {
            let w = Worker::new(ctx.clone(), next(), seed);
            tasks.push(tokio::spawn(dedup_worker(w, g.clone(), opts.clone())));
        }
    }
    if opts.bank {
        for _ in 0..opts.bank_workers {
            let w = Worker::new(ctx.clone(), next(), seed);
            tasks.push(tokio::spawn(bank_worker(w, opts.clone())));
        }
    }
    tasks
}

/// How many times a final read is tried before its key is left without one (which makes
/// the checkers' verdict unknown, never valid).
const FINAL_READ_ATTEMPTS: usize = 10;
/// The pause between final-read attempts.
const FINAL_READ_RETRY: Duration = Duration::from_millis(500);

/// One final read, tried until it succeeds: each attempt is recorded as `pending`, then as
/// a failure or as the operation `read` completed.
async fn final_read<F, Fut>(rec: &Recorder, process: Process, node: usize, pending: Op, mut read: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Op, ClientError>>,
{
    for _ in 0..FINAL_READ_ATTEMPTS {
        rec.record(process, Kind::Invoke, pending.clone(), Some(node), None);
        match read().await {
            Ok(done) => {
                rec.record(process, Kind::Ok, done, Some(node), None);
                return;
            }
            Err(e) => {
                rec.record(process, Kind::Fail, pending.clone(), Some(node), Some(e.to_string()));
                tokio::time::sleep(FINAL_READ_RETRY).await;
            }
        }
    }
}

/// Final reads from every node: each register key, each set, each stored memory. Recorded
/// as ordinary operations by processes of their own; a read that fails is retried a few
/// times (each attempt recorded).
pub async fn final_reads(ctx: &Arc<Ctx>, opts: &WorkloadOptions) {
    let base = crate::history::FINAL_PROCESSES;
    let mut tasks = Vec::new();
    for node in 0..ctx.nodes {
        let ctx = ctx.clone();
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            let c = &reader_for(node);
            let process = Process::Client(base + node as u64);
            let rec = &ctx.rec;
            if opts.register {
                let keys: Vec<u64> = ctx.touched.register_keys.lock().unwrap().iter().copied().collect();
                for key in keys {
                    let read = || async move {
                        let (value, _) = read_register(c, &format!("k{key}")).await?;
                        Ok(Op::Read { key, value })
                    };
                    final_read(rec, process, node, Op::Read { key, value: None }, read).await;
                }
            }
            if opts.set {
                let keys: Vec<u64> = ctx.touched.set_keys.lock().unwrap().iter().copied().collect();
                for key in keys {
                    let read = || async move {
                        let elements = read_set(c, key).await?;
                        Ok(Op::ReadSet { key, elements: Some(elements) })
                    };
                    final_read(rec, process, node, Op::ReadSet { key, elements: None }, read).await;
                }
            }
            if opts.dedup {
                let keys: Vec<u64> = ctx.touched.dedup_keys.lock().unwrap().iter().copied().collect();
                for key in keys {
                    let read = || async move {
                        let ids = read_dedup(c, key).await?;
                        Ok(Op::DedupRead { key, ids: Some(ids) })
                    };
                    final_read(rec, process, node, Op::DedupRead { key, ids: None }, read).await;
                }
            }
            if opts.bank {
                let read = || async move { Ok(Op::ReadBank { balances: Some(read_bank(c).await?) }) };
                final_read(rec, process, node, Op::ReadBank { balances: None }, read).await;
            }
            if opts.search {
                let ids: Vec<u64> = ctx.touched.search_ids.lock().unwrap().iter().copied().collect();
                for chunk in ids.chunks(64) {
                    for _ in 0..FINAL_READ_ATTEMPTS {
                        // One batch behind one read barrier; each query is its own operation,
                        // all invoked before and completed after the batch.
                        let ps: Vec<Process> = (0..chunk.len())
                            .map(|i| Process::Client(base * 2 + node as u64 * 1000 + i as u64))
                            .collect();
                        for (id, p) in chunk.iter().zip(&ps) {
                            rec.record(*p, Kind::Invoke, Op::Search { id: *id, hits: None }, Some(node), None);
                        }
                        let queries = chunk.iter().map(|id| search_request(*id)).collect();
                        match c.search_batch(queries, Consistency::Linearizable).await {
                            Ok(r) => {
                                for ((id, p), res) in chunk.iter().zip(&ps).zip(&r.results) {
                                    let op = Op::Search { id: *id, hits: Some(hit_ids(res)) };
                                    rec.record(*p, Kind::Ok, op, Some(node), None);
                                }
                                break;
                            }
                            Err(e) => {
                                for (id, p) in chunk.iter().zip(&ps) {
                                    let op = Op::Search { id: *id, hits: None };
                                    rec.record(*p, Kind::Fail, op, Some(node), Some(e.to_string()));
                                }
                                tokio::time::sleep(FINAL_READ_RETRY).await;
                            }
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}
