//! Restore: a new node's data dir from a backup, for a new cluster (like `etcdutl snapshot
//! restore`). Run it once per member with the same backup and the same member list; every
//! member then holds the same state at the backup's log id, with the new membership and a new
//! cluster id, and the nodes elect a leader when started. No `cluster init` is needed.
//!
//! Nothing is written to the target until the whole archive has been authenticated and its
//! dump checked: the state is loaded in one redb transaction in a staging dir beside the
//! target, committed only after the manifest checked out, and the staging dir is renamed into
//! place last. A non-empty target is refused unless `force` is set.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use redb::Database;

use super::{read_archive, BackupError, BackupInfo, Keyring};
use crate::raft::{EngramNode, LogId, LogStore, Membership, NodeId, StoredMembership, Vote};
use crate::storage::dump::ErasedNamespace;
use crate::storage::vault::{DataKeyRow, Vault};
use crate::storage::{codec, dump, META_APPLIED, META_CLUSTER_ID, META_MEMBERSHIP, SM_META};

/// Where and as whom to restore.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    pub data_dir: PathBuf,
    pub node_id: NodeId,
    /// Every voter of the new cluster, this node included.
    pub members: BTreeMap<NodeId, EngramNode>,
    /// Replace a non-empty data dir.
    pub force: bool,
    /// For a backup of a cluster encrypted at rest: the master keyring and the live cluster's
    /// data keys (a backup holds none). `None` refuses a backup with sealed rows.
    pub at_rest: Option<AtRest>,
}

/// What restoring a backup sealed at rest needs.
#[derive(Debug, Clone)]
pub struct AtRest {
    pub master: Keyring,
    /// The data keys of the cluster now (`engramctl keys export --at-rest`).
    pub keys: Vec<DataKeyRow>,
    /// The erasures it remembers: a namespace erased after the backup is left out, plain rows
    /// too, and reported.
    pub erasures: Vec<crate::storage::vault::Erasure>,
}

/// A restore's outcome: the backup, and the namespaces it left out as erased.
#[derive(Debug, Clone)]
pub struct Restored {
    pub info: BackupInfo,
    pub erased: Vec<ErasedNamespace>,
}

/// The id of a cluster restored from `backup_id` with `members`: the same on every member,
/// different from the source cluster's.
pub fn restored_cluster_id(backup_id: &[u8; 16], members: &BTreeMap<NodeId, EngramNode>) -> [u8; 16] {
    let mut h = blake3::Hasher::new_derive_key("engram restored cluster id v1");
    h.update(backup_id);
    for (id, n) in members {
        h.update(&id.to_le_bytes());
        for s in [&n.raft_addr, &n.api_addr] {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
    }
    h.finalize().as_bytes()[..16].try_into().expect("16 of 32 bytes")
}

fn check_target(t: &RestoreTarget) -> Result<(), BackupError> {
    if t.node_id == 0 || !t.members.contains_key(&t.node_id) {
        return Err(BackupError::Target(format!("node {} is not among the members {:?}", t.node_id, t.members.keys())));
    }
    if t.members.contains_key(&0) {
        return Err(BackupError::Target("member ids must be >= 1".into()));
    }
    let non_empty = match std::fs::read_dir(&t.data_dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e.into()),
    };
    if non_empty && !t.force {
        return Err(BackupError::Target(format!(
            "data dir {} is not empty; pass --force to replace it",
            t.data_dir.display()
        )));
    }
    Ok(())
}

/// A sibling path of `dir` with `tag`: same file system, so renames are atomic.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf, BackupError> {
    let name = dir.file_name().ok_or_else(|| BackupError::Target(format!("bad data dir {}", dir.display())))?;
    Ok(dir.with_file_name(format!(".{}.{tag}-{}", name.to_string_lossy(), uuid::Uuid::now_v7())))
}

/// Restores `input` into `target.data_dir`; see the module docs.
pub fn restore(input: impl Read, keys: &Keyring, target: &RestoreTarget) -> Result<Restored, BackupError> {
    check_target(target)?;
    if let Some(parent) = target.data_dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let staging = sibling(&target.data_dir, "restore")?;
    std::fs::create_dir_all(&staging)?;
    let result = stage(input, keys, target, &staging).and_then(|info| {
        swap_into_place(&staging, &target.data_dir)?;
        Ok(info)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn stage(input: impl Read, keys: &Keyring, target: &RestoreTarget, staging: &Path) -> Result<Restored, BackupError> {
    let db = Database::create(staging.join("state.redb")).map_err(crate::error::StorageError::from)?;
    let mut txn = db.begin_write().map_err(crate::error::StorageError::from)?;
    crate::storage::set_durable(&mut txn, "state")?;
    let vault = match &target.at_rest {
        Some(a) => Vault::new(Some(a.master.clone())),
        None => Vault::off(),
    };
    let given = target.at_rest.as_ref().map(|a| (a.keys.as_slice(), a.erasures.as_slice()));
    let mut erased = Vec::new();
    let info = read_archive(input, keys, |r| {
        let (summary, gone) = dump::load_restored(r, &txn, &vault, given)?;
        erased = gone;
        Ok(summary)
    })?;
    let h = &info.header;
    let applied = LogId::new(
        openraft::vote::leader_id_adv::LeaderId { term: h.applied_term, node_id: h.applied_node },
        h.applied_index,
    );
    let voters: BTreeSet<NodeId> = target.members.keys().copied().collect();
    let membership = Membership::new(vec![voters], target.members.clone())
        .map_err(|e| BackupError::Target(format!("members: {e}")))?;
    let membership = StoredMembership::new(Some(applied), membership);
    let cluster_id = restored_cluster_id(&h.backup_id, &target.members);
    {
        let mut meta = txn.open_table(SM_META).map_err(crate::error::StorageError::from)?;
        let put = |meta: &mut redb::Table<&str, &[u8]>, k: &str, v: &[u8]| {
            meta.insert(k, v).map(drop).map_err(crate::error::StorageError::from)
        };
        put(&mut meta, META_APPLIED, &codec::encode(&applied))?;
        put(&mut meta, META_MEMBERSHIP, &codec::encode(&membership))?;
        put(&mut meta, META_CLUSTER_ID, &cluster_id)?;
    }
    txn.commit().map_err(crate::error::StorageError::from)?;
    drop(db);
    // Elections resume above the backup's term; this node has voted for nobody else there.
    let vote = Vote::new(h.applied_term + 1, target.node_id);
    LogStore::open(&staging.join("raft-log.redb"))?.seed_restored(&vote, &applied)?;
    std::fs::write(staging.join("node_id"), target.node_id.to_string())?;
    std::fs::File::open(staging)?.sync_all()?;
    for e in &erased {
        tracing::warn!(namespace = %e.namespace, memories = e.memories, erased_at_index = ?e.erased_at_index, "left out of the restore: erased");
    }
    Ok(Restored { info, erased })
}

fn swap_into_place(staging: &Path, data_dir: &Path) -> Result<(), BackupError> {
    let old = match std::fs::read_dir(data_dir) {
        Ok(_) => {
            let old = sibling(data_dir, "replaced")?;
            std::fs::rename(data_dir, &old)?;
            Some(old)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e.into()),
    };
    std::fs::rename(staging, data_dir)?;
    if let Some(parent) = data_dir.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    if let Some(old) = old {
        std::fs::remove_dir_all(old)?;
    }
    Ok(())
}
