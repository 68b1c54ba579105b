"""Typed errors. Every error says whether a failed write may still have been applied
(docs/errors.md): resend such a write only with the same idempotency key, which the client
does by itself."""

from __future__ import annotations

from typing import Mapping, Optional

import grpc

__all__ = [
    "EngramError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "PreconditionFailed",
    "PermissionDenied",
    "Unauthenticated",
    "ResourceExhausted",
    "Unavailable",
    "NotLeader",
    "DeadlineExceeded",
    "DataLoss",
    "Internal",
]

# The codes whose failed writes may have been applied when the node says nothing more.
_MAYBE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
          grpc.StatusCode.UNKNOWN, grpc.StatusCode.CANCELLED}


class EngramError(Exception):
    """A failed call.

    Attributes:
        code: the gRPC status code.
        message: the node's message.
        field: the request field at fault, when the node named one.
        may_have_applied: True when a failed write may still have been applied.
        retry_after: seconds the node asked the client to wait, if any.
        leader_addr: the leader's API address, for a write refused by a follower.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: Optional[str] = None,
        may_have_applied: bool = False,
        retry_after: Optional[float] = None,
        leader_addr: Optional[str] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.may_have_applied = may_have_applied
        self.retry_after = retry_after
        self.leader_addr = leader_addr
        self.metadata = dict(metadata or {})


class InvalidArgument(EngramError):
    """Bad input; nothing was applied."""


class NotFound(EngramError):
    """No such namespace or memory; nothing was applied."""


class AlreadyExists(EngramError):
    """Exists with other settings, or a near-duplicate refused; nothing was applied."""


class PreconditionFailed(EngramError):
    """A compare-and-set guard did not hold (or an idempotency key was reused); nothing was
    applied. `current_revision` is the memory's revision (0: absent)."""

    @property
    def current_revision(self) -> int:
        return int(self.metadata.get("engram-current-revision", "0") or 0)


class PermissionDenied(EngramError):
    """The key's grants do not allow this; nothing was applied."""


class Unauthenticated(EngramError):
    """No valid credential; nothing was applied."""


class ResourceExhausted(EngramError):
    """A rate limit or quota; nothing was applied. Wait `retry_after` seconds."""


class Unavailable(EngramError):
    """The cluster could not take the call; `may_have_applied` says about a write."""


class NotLeader(Unavailable):
    """The node would not forward the write; nothing was applied. `leader_addr` hints."""


class DeadlineExceeded(EngramError):
    """The deadline passed; a write may have been applied."""


class DataLoss(EngramError):
    """A backup failed its checksum or authentication; nothing was written."""


class Internal(EngramError):
    """The node failed unexpectedly; a write may have been applied."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionFailed,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.INTERNAL: Internal,
}

_NEVER_SENT = ("failed to connect", "connection refused", "name resolution", "dns resolution")


def _details(trailing: Mapping[str, object]) -> dict[str, str]:
    """ErrorInfo metadata (and reason) from `grpc-status-details-bin`, if the node sent it."""
    raw = trailing.get("grpc-status-details-bin")
    if not isinstance(raw, (bytes, bytearray)):
        return {}
    try:
        from google.rpc import error_details_pb2, status_pb2

        st = status_pb2.Status.FromString(bytes(raw))
        out: dict[str, str] = {}
        for any_ in st.details:
            if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_.Unpack(info)
                out.update(info.metadata)
                out["reason"] = info.reason
            elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                any_.Unpack(ri)
                out["retry_delay"] = str(ri.retry_delay.seconds + ri.retry_delay.nanos / 1e9)
        return out
    except Exception:  # undecodable details are as good as none
        return {}


def from_rpc_error(code: grpc.StatusCode, message: str, trailing: Mapping[str, object]) -> EngramError:
    """The typed error for a failed call."""
    md = {k: v for k, v in trailing.items() if isinstance(v, str)}
    info = _details(trailing)
    outcome = info.get("outcome")
    if outcome is not None:
        maybe = outcome == "maybe-applied"
    elif code == grpc.StatusCode.UNAVAILABLE and any(s in message.lower() for s in _NEVER_SENT):
        maybe = False  # the request never left this process
    else:
        maybe = code in _MAYBE and md.get("engram-not-leader") != "1"
    retry_after: Optional[float] = None
    if "engram-retry-after-ms" in md:
        retry_after = int(md["engram-retry-after-ms"]) / 1000
    elif "retry-after" in md:
        retry_after = float(md["retry-after"])
    not_leader = md.get("engram-not-leader") == "1" or info.get("reason") == "NOT_LEADER"
    cls = NotLeader if not_leader else _BY_CODE.get(code, EngramError)
    return cls(
        code,
        message,
        field=md.get("engram-field") or info.get("field"),
        may_have_applied=maybe,
        retry_after=retry_after,
        leader_addr=md.get("engram-leader-addr") or info.get("leader_addr"),
        metadata=md,
    )
