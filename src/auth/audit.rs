//! The audit trail: every denied request and every admin action, with its principal, as a
//! structured log event (target `engram::audit`) and a metric
//! (`engram_audit_events_total{kind, outcome}`). Events never carry credentials.

/// What kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request refused for its credentials or grants.
    Denied,
    /// A call that changes the cluster, its keys, roles or quotas.
    Admin,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Denied => "denied",
            Kind::Admin => "admin",
        }
    }
}

/// Records one event. `outcome` is the gRPC code name (`ok`, `permission_denied`, …).
pub fn record(kind: Kind, principal: &str, method: &str, outcome: &str, remote: Option<std::net::SocketAddr>) {
    let remote = remote.map(|r| r.to_string()).unwrap_or_default();
    tracing::info!(target: "engram::audit", kind = kind.name(), principal, method, outcome, remote, "audit");
    metrics::counter!("engram_audit_events_total", "kind" => kind.name(), "outcome" => outcome.to_string())
        .increment(1);
}
