"""What the sync and asyncio clients share: options, result types, request building, the
retry decision."""

from __future__ import annotations

import dataclasses
import random
import uuid
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import grpc

from . import errors
from .v1 import memory_pb2, types_pb2

Vector = Union[Sequence[float], Any]  # any sequence of floats, or a 1-d numpy array
EmbeddingFunction = Callable[[str], Vector]

METRICS = {
    "cosine": types_pb2.METRIC_COSINE,
    "l2": types_pb2.METRIC_L2,
    "inner_product": types_pb2.METRIC_INNER_PRODUCT,
    "ip": types_pb2.METRIC_INNER_PRODUCT,
}
_METRIC_NAMES = {types_pb2.METRIC_COSINE: "cosine", types_pb2.METRIC_L2: "l2", types_pb2.METRIC_INNER_PRODUCT: "inner_product"}
CONSISTENCY = {
    "linearizable": types_pb2.CONSISTENCY_LINEARIZABLE,
    "lease": types_pb2.CONSISTENCY_LEASE,
    "stale": types_pb2.CONSISTENCY_STALE,
}
# Largest batch one PutBatch carries (the node's default max_batch_items is 1000).
DEFAULT_BATCH_SIZE = 500


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How transient failures are retried: `attempts` tries in all, exponential backoff with
    jitter between `initial_backoff` and `max_backoff` seconds, each attempt bounded by
    `attempt_timeout` seconds and the call's deadline. A rate-limited call waits the node's
    retry-after when that is at most `max_rate_limit_wait` seconds."""

    attempts: int = 8
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    attempt_timeout: float = 10.0
    max_rate_limit_wait: float = 5.0

    def backoff(self, attempt: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * (2 ** attempt))
        return base * (0.5 + random.random() / 2)


@dataclasses.dataclass(frozen=True)
class Memory:
    namespace: str
    id: str
    text: str
    embedding: list[float]
    tags: dict[str, str]
    importance: float
    created_at_ms: int
    updated_at_ms: int
    last_accessed_at_ms: int
    expires_at_ms: int
    revision: int
    access_count: int
    merge_count: int
    merged_from: list[str]
    linked_to: str

    @staticmethod
    def from_pb(m: types_pb2.Memory) -> "Memory":
        return Memory(
            namespace=m.namespace, id=m.id, text=m.text, embedding=list(m.embedding), tags=dict(m.tags),
            importance=m.importance, created_at_ms=m.created_at_ms, updated_at_ms=m.updated_at_ms,
            last_accessed_at_ms=m.last_accessed_at_ms, expires_at_ms=m.expires_at_ms, revision=m.revision,
            access_count=m.access_count, merge_count=m.merge_count, merged_from=list(m.merged_from),
            linked_to=m.linked_to,
        )


@dataclasses.dataclass(frozen=True)
class PutResult:
    id: str
    revision: int
    applied_index: int
    updated: bool
    deduplicated: bool
    action: str  # created | updated | deduplicated | merged | linked
    linked_to: str

    @staticmethod
    def from_pb(r: memory_pb2.PutResponse) -> "PutResult":
        action = memory_pb2.PutAction.Name(r.action).removeprefix("PUT_ACTION_").lower()
        return PutResult(r.id, r.revision, r.applied_index, r.updated, r.deduplicated, action, r.linked_to)


@dataclasses.dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    rank_score: float
    memory: Optional[Memory]


@dataclasses.dataclass(frozen=True)
class NamespaceInfo:
    name: str
    dimension: int
    metric: str
    memory_count: int
    created_at_ms: int

    @staticmethod
    def from_pb(n: types_pb2.NamespaceInfo) -> "NamespaceInfo":
        return NamespaceInfo(n.namespace, n.dimension, _METRIC_NAMES.get(n.metric, "unspecified"), n.memory_count,
                             n.created_at_ms)


def vector(v: Vector, what: str = "embedding") -> list[float]:
    """A list of floats from a sequence or a 1-d numpy array (any float dtype)."""
    shape = getattr(v, "shape", None)
    if shape is not None and len(shape) != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {tuple(shape)}")
    tolist = getattr(v, "tolist", None)
    out = tolist() if callable(tolist) else list(v)
    return [float(x) for x in out]


def write_options(key: Optional[str]) -> memory_pb2.WriteOptions:
    return memory_pb2.WriteOptions(idempotency_key=key or str(uuid.uuid4()))


def memory_input(
    text: str,
    embedding: Optional[Vector],
    embed: Optional[EmbeddingFunction],
    *,
    id: Optional[str] = None,
    tags: Optional[Mapping[str, str]] = None,
    importance: Optional[float] = None,
    expires_at_ms: Optional[int] = None,
) -> types_pb2.MemoryInput:
    if embedding is None:
        if embed is None:
            raise ValueError("give an embedding, or an embedding_function to the client")
        embedding = embed(text)
    m = types_pb2.MemoryInput(id=id or "", text=text, embedding=vector(embedding), tags=dict(tags or {}),
                              expires_at_ms=expires_at_ms or 0)
    if importance is not None:
        m.importance = importance
    return m


def precondition(if_absent: bool, if_revision: Optional[int]) -> Optional[types_pb2.Precondition]:
    if if_absent and if_revision is not None:
        raise ValueError("if_absent and if_revision exclude each other")
    if if_absent:
        return types_pb2.Precondition(if_absent=True)
    if if_revision is not None:
        return types_pb2.Precondition(if_revision=if_revision)
    return None


def item(x: Union[Mapping[str, Any], types_pb2.MemoryInput], embed: Optional[EmbeddingFunction]) -> memory_pb2.PutBatchItem:
    """A batch item from a dict (text, embedding, id, tags, importance, expires_at_ms,
    if_absent, if_revision) or a MemoryInput."""
    if isinstance(x, types_pb2.MemoryInput):
        return memory_pb2.PutBatchItem(memory=x)
    d = dict(x)
    pre = precondition(bool(d.pop("if_absent", False)), d.pop("if_revision", None))
    text = d.pop("text")
    emb = d.pop("embedding", None)
    m = memory_input(text, emb, embed, **d)
    return memory_pb2.PutBatchItem(memory=m, precondition=pre)


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    buf: list[Any] = []
    for x in items:
        buf.append(x)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def search_request(
    namespace: str,
    query: Optional[Vector],
    text: Optional[str],
    embed: Optional[EmbeddingFunction],
    *,
    k: int,
    tags: Optional[Mapping[str, str]],
    min_importance: Optional[float],
    score_threshold: Optional[float],
    include_memory: bool,
    consistency: str,
    reinforce: bool,
) -> memory_pb2.SearchRequest:
    if query is None:
        if text is None:
            raise ValueError("give a vector or text")
        if embed is None:
            raise ValueError("searching by text needs an embedding_function on the client")
        query = embed(text)
    f = memory_pb2.SearchFilter(tags=dict(tags or {}))
    if min_importance is not None:
        f.min_importance = min_importance
    req = memory_pb2.SearchRequest(namespace=namespace, vector=vector(query, "vector"), k=k, filter=f,
                                   include_memory=include_memory, consistency=consistency_of(consistency),
                                   reinforce=reinforce)
    if score_threshold is not None:
        req.score_threshold = score_threshold
    return req


def hits(resp: memory_pb2.SearchResponse) -> list[SearchHit]:
    return [SearchHit(h.id, h.score, h.rank_score, Memory.from_pb(h.memory) if h.HasField("memory") else None)
            for h in resp.hits]


def consistency_of(name: str) -> int:
    try:
        return CONSISTENCY[name]
    except KeyError:
        raise ValueError(f"consistency must be one of {sorted(CONSISTENCY)}") from None


def metric_of(name: str) -> int:
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(f"metric must be one of {sorted(METRICS)}") from None


# What the client does after a failed attempt.
RETRY, REDIRECT, FAIL = "retry", "redirect", "fail"


def decide(err: errors.EngramError, *, write: bool, policy: RetryPolicy) -> str:
    """Retry a transient failure (a write keeps its idempotency key, so a retry applies at most
    once); follow a leader hint; wait out a short rate limit; fail on everything else."""
    if isinstance(err, errors.NotLeader):
        return REDIRECT if err.leader_addr else RETRY
    if isinstance(err, errors.ResourceExhausted):
        return RETRY if err.retry_after is not None and err.retry_after <= policy.max_rate_limit_wait else FAIL
    if isinstance(err, (errors.Unavailable, errors.DeadlineExceeded)):
        return RETRY
    if isinstance(err, errors.Internal) and not write:
        return RETRY
    return FAIL


def error_of(e: grpc.RpcError) -> errors.EngramError:
    code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
    details = e.details() if callable(getattr(e, "details", None)) else str(e)
    trailing = e.trailing_metadata() if callable(getattr(e, "trailing_metadata", None)) else None
    md = {k: v for k, v in (trailing or ())}
    return errors.from_rpc_error(code, details or "", md)


def credentials(ca_file: Optional[str], ca_pem: Optional[bytes]) -> Optional[grpc.ChannelCredentials]:
    if ca_file is None and ca_pem is None:
        return None
    if ca_pem is None:
        with open(ca_file, "rb") as f:  # type: ignore[arg-type]
            ca_pem = f.read()
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)


def read_key(api_key: Optional[str], api_key_file: Optional[str]) -> Optional[str]:
    if api_key is not None and api_key_file is not None:
        raise ValueError("give api_key or api_key_file, not both")
    if api_key_file is not None:
        with open(api_key_file, encoding="utf-8") as f:
            api_key = f.read()
    return api_key.strip() if api_key else None


def endpoints_of(endpoints: Union[str, Sequence[str]]) -> list[str]:
    eps = [e.strip() for e in (endpoints.split(",") if isinstance(endpoints, str) else endpoints) if e.strip()]
    if not eps:
        raise ValueError("no endpoints given")
    return eps
