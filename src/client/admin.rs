//! The SDK side of `AdminService`: bootstrap, membership, leadership, status, snapshots and
//! streamed backups.

use std::time::Duration;

use super::connect::Svc;
use super::{timed, Client, ClientError};
use crate::proto as pb;
use crate::proto::admin_service_client::AdminServiceClient;

/// Operator calls.
pub struct Admin<'a> {
    pub(super) client: &'a Client,
}

impl Admin<'_> {
    fn admin(ch: Svc) -> AdminServiceClient<Svc> {
        AdminServiceClient::new(ch)
    }

    /// A client of the preferred node only: for calls whose answer is about that node (its
    /// snapshot, backup, ledger, digest), never retried elsewhere.
    fn preferred(&self) -> Result<AdminServiceClient<Svc>, ClientError> {
        let addr = self.client.inner.preferred.lock().unwrap().clone();
        Ok(Self::admin(self.client.channel(&addr)?))
    }

    /// Bootstraps an `--insecure` cluster on the first endpoint (empty `members`: one node).
    pub async fn init_cluster(&self, members: Vec<pb::NodeInfo>) -> Result<(), ClientError> {
        self.init(pb::InitClusterRequest { members, ..Default::default() }).await.map(drop)
    }

    /// Bootstraps a secured cluster whose root key is `root` (only its id and hash leave this
    /// process: keep the key safe, see `engramctl cluster init`). Sent to the first endpoint;
    /// a retry with the same key installs it if an earlier attempt did not get that far.
    pub async fn init_secure_cluster(
        &self,
        members: Vec<pb::NodeInfo>,
        root: &crate::auth::token::ApiKey,
    ) -> Result<(), ClientError> {
        let req =
            pb::InitClusterRequest { members, root_key_id: root.id.to_string(), root_key_hash: root.hash().to_vec() };
        self.init(req).await.map(drop)
    }

    /// Sends the init to the first endpoint. If leadership moved before the root key was
    /// installed, the node answers "not the leader" with a hint: the same request then goes
    /// to the leader, which installs the key (the cluster has none yet, so it may).
    async fn init(&self, req: pb::InitClusterRequest) -> Result<pb::InitClusterResponse, ClientError> {
        let mut addr = self.client.inner.endpoints[0].clone();
        let mut last = None;
        for _ in 0..5 {
            let mut c = Self::admin(self.client.channel(&addr)?);
            match c.init_cluster(timed(req.clone(), Duration::from_secs(30))).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) => {
                    let hint = s.metadata().get(crate::api::status::LEADER_ADDR_HEADER).and_then(|v| v.to_str().ok());
                    let not_leader = s.metadata().get(crate::api::status::NOT_LEADER_HEADER).is_some();
                    let err = ClientError::from_status(&s);
                    if !not_leader {
                        return Err(err);
                    }
                    if let Some(h) = hint {
                        addr = h.to_string();
                    }
                    last = Some(err);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        Err(last.unwrap_or_else(|| ClientError::config("no attempts made")))
    }

    pub async fn status(&self) -> Result<pb::StatusResponse, ClientError> {
        self.client.call(|ch, t| async move { Self::admin(ch).status(timed(pb::StatusRequest {}, t)).await }).await
    }

    pub async fn add_learner(&self, node: pb::NodeInfo, blocking: bool) -> Result<pb::MembershipResponse, ClientError> {
        let req = pb::AddLearnerRequest { node: Some(node), blocking };
        self.client
            .call(|ch, t| {
                let r = req.clone();
                async move { Self::admin(ch).add_learner(timed(r, t)).await }
            })
            .await
    }

    pub async fn promote_voters(&self, node_ids: Vec<u64>) -> Result<pb::MembershipResponse, ClientError> {
        let req = pb::PromoteVotersRequest { node_ids };
        self.client
            .call(|ch, t| {
                let r = req.clone();
                async move { Self::admin(ch).promote_voters(timed(r, t)).await }
            })
            .await
    }

    pub async fn remove_nodes(&self, node_ids: Vec<u64>) -> Result<pb::MembershipResponse, ClientError> {
        let req = pb::RemoveNodesRequest { node_ids };
        self.client
            .call(|ch, t| {
                let r = req.clone();
                async move { Self::admin(ch).remove_nodes(timed(r, t)).await }
            })
            .await
    }

    pub async fn transfer_leader(&self, to_node_id: u64) -> Result<pb::TransferLeaderResponse, ClientError> {
        let req = pb::TransferLeaderRequest { to_node_id };
        self.client.call(|ch, t| async move { Self::admin(ch).transfer_leader(timed(req, t)).await }).await
    }

    /// Builds a Raft snapshot on the preferred node; returns the index it covers.
    pub async fn trigger_snapshot(&self) -> Result<u64, ClientError> {
        let mut c = self.preferred()?;
        let r = c.trigger_snapshot(pb::TriggerSnapshotRequest {}).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(r.into_inner().snapshot_index)
    }

    /// Checks the preferred node's ledger (never another node's: the answer is about that
    /// node's files).
    pub async fn verify_ledger(&self) -> Result<pb::VerifyLedgerResponse, ClientError> {
        let mut c = self.preferred()?;
        let r = c.verify_ledger(pb::VerifyLedgerRequest {}).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(r.into_inner())
    }

    /// One page of the preferred node's ledger rows in `from..=to` (`to` 0: through the end).
    pub async fn export_ledger(&self, from: u64, to: u64, limit: u32) -> Result<pb::ExportLedgerResponse, ClientError> {
        let mut c = self.preferred()?;
        let req = pb::ExportLedgerRequest { from_index: from, to_index: to, limit };
        let r = c.export_ledger(req).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(r.into_inner())
    }

    /// Partial restore: namespace `rows.info.name` becomes exactly `rows` (read from a backup
    /// with `backup::namespace_of`), in one replicated entry. Sent with one idempotency key,
    /// so a retry after an unclear outcome does not restore twice.
    pub async fn restore_namespace(
        &self,
        rows: &crate::storage::dump::NamespaceRows,
    ) -> Result<pb::RestoreNamespaceResponse, ClientError> {
        self.restore(rows, false).await
    }

    /// Partial restore of the memories in `rows` only: each becomes its backup row; the
    /// namespace keeps its other memories.
    pub async fn restore_memories(
        &self,
        rows: &crate::storage::dump::NamespaceRows,
    ) -> Result<pb::RestoreNamespaceResponse, ClientError> {
        self.restore(rows, true).await
    }

    async fn restore(
        &self,
        rows: &crate::storage::dump::NamespaceRows,
        only_these: bool,
    ) -> Result<pb::RestoreNamespaceResponse, ClientError> {
        let req = pb::RestoreNamespaceRequest {
            only_these,
            namespace: rows.info.name.clone(),
            dimension: rows.info.dimension,
            metric: crate::api::convert::metric_to_pb(rows.info.metric) as i32,
            policy_json: rows.policy_json.clone().unwrap_or_default(),
            memories: crate::storage::codec::encode(&rows.memories),
            options: Some(pb::WriteOptions { idempotency_key: uuid::Uuid::now_v7().to_string() }),
            sealed_rows: match rows.sealed.is_empty() {
                true => Vec::new(),
                false => crate::storage::codec::encode(&rows.sealed),
            },
        };
        self.client
            .call(|ch, t| {
                let r = req.clone();
                async move { Self::admin(ch).restore_namespace(timed(r, t)).await }
            })
            .await
    }

    /// The cluster's data keys (wrapped) and erasures, from the preferred node after a read
    /// barrier: what a restore of a backup sealed at rest needs.
    pub async fn export_data_keys(&self) -> Result<pb::ExportDataKeysResponse, ClientError> {
        let mut c = self.preferred()?;
        let r = c.export_data_keys(pb::ExportDataKeysRequest {}).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(r.into_inner())
    }

    /// Rewraps every data key under the leader's active at-rest master key.
    pub async fn rotate_at_rest_key(&self) -> Result<pb::RotateAtRestKeyResponse, ClientError> {
        self.client
            .call(|ch, t| async move {
                Self::admin(ch).rotate_at_rest_key(timed(pb::RotateAtRestKeyRequest {}, t)).await
            })
            .await
    }

    /// Erases `namespace` (deletes it and destroys its data key); the erasure receipt.
    pub async fn erase_namespace(&self, namespace: &str) -> Result<pb::EraseNamespaceResponse, ClientError> {
        let req = pb::EraseNamespaceRequest {
            namespace: namespace.into(),
            options: Some(pb::WriteOptions { idempotency_key: uuid::Uuid::now_v7().to_string() }),
        };
        self.client
            .call(|ch, t| {
                let r = req.clone();
                async move { Self::admin(ch).erase_namespace(timed(r, t)).await }
            })
            .await
    }

    /// Has the leader propose a mark (see `cluster verify`); its id and log index.
    pub async fn propose_mark(&self) -> Result<pb::ProposeMarkResponse, ClientError> {
        self.client
            .call(|ch, t| async move { Self::admin(ch).propose_mark(timed(pb::ProposeMarkRequest {}, t)).await })
            .await
    }

    /// The preferred node's state digest at mark `mark_id`, waiting up to `wait_ms` for it.
    pub async fn mark_digest(&self, mark_id: &str, wait_ms: u32) -> Result<pb::MarkDigestResponse, ClientError> {
        let mut c = self.preferred()?;
        let req = pb::MarkDigestRequest { mark_id: mark_id.into(), wait_ms };
        let r = c.mark_digest(req).await.map_err(|s| ClientError::from_status(&s))?;
        Ok(r.into_inner())
    }

    /// Streams a backup from the preferred node into `target`: a file path, or an existing
    /// directory (the file is then named after the backup's time and index). The bytes land
    /// in a `.partial` file that is fsynced and renamed only when the stream completed; a
    /// failed stream leaves nothing. Returns the path and the archive's header.
    pub async fn create_backup(
        &self,
        target: &std::path::Path,
    ) -> Result<(std::path::PathBuf, crate::backup::archive::Header), ClientError> {
        self.create_backup_with_progress(target, |_, _| {}).await
    }

    /// [`create_backup`](Self::create_backup), calling `progress(bytes received so far, the
    /// node's estimate of the total)` after each chunk (engramctl draws a bar from it).
    pub async fn create_backup_with_progress(
        &self,
        target: &std::path::Path,
        mut progress: impl FnMut(u64, Option<u64>),
    ) -> Result<(std::path::PathBuf, crate::backup::archive::Header), ClientError> {
        use tokio::io::AsyncWriteExt;
        let io = |e: std::io::Error| ClientError::config(format!("writing the backup: {e}"));
        let mut c = self.preferred()?.max_decoding_message_size(64 << 20);
        let resp = c.create_backup(pb::CreateBackupRequest {}).await.map_err(|s| ClientError::from_status(&s))?;
        let estimate = resp
            .metadata()
            .get(crate::api::admin_service::BACKUP_ESTIMATE_HEADER)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let mut stream = resp.into_inner();
        let mut received = 0u64;
        let dir = if target.is_dir() {
            target.to_path_buf()
        } else {
            target.parent().map(|p| p.to_path_buf()).unwrap_or_default()
        };
        let partial = dir.join(format!(".{}.partial", uuid::Uuid::now_v7()));
        let result = async {
            let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
            let mut head = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(|s| ClientError::from_status(&s))? {
                let need = crate::backup::archive::HEADER_BYTES.saturating_sub(head.len());
                head.extend_from_slice(&chunk.data[..chunk.data.len().min(need)]);
                file.write_all(&chunk.data).await.map_err(io)?;
                received += chunk.data.len() as u64;
                progress(received, estimate);
            }
            // A write that failed in flight (a full disk) must not leave a short backup that is
            // then renamed as complete.
            crate::storage::flush_and_sync(&mut file).await.map_err(io)?;
            let (header, _) = crate::backup::archive::read_header(&mut head.as_slice())
                .map_err(|e| ClientError::config(format!("the node sent a bad backup: {e}")))?;
            let path = if target.is_dir() {
                dir.join(crate::backup::schedule::file_name(&header))
            } else {
                target.to_path_buf()
            };
            tokio::fs::rename(&partial, &path).await.map_err(io)?;
            Ok((path, header))
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&partial).await;
        }
        result
    }
}
