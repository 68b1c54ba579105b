"""The asyncio client: the same calls as :class:`engram.Client`, awaited; listings are async
iterators."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterable, Mapping, Optional, Sequence, Union

import grpc

from . import _core, errors
from ._core import EmbeddingFunction, Memory, NamespaceInfo, PutResult, RetryPolicy, SearchHit, Vector
from .v1 import admin_pb2, admin_pb2_grpc, memory_pb2, memory_pb2_grpc, types_pb2


class AsyncClient:
    """An asyncio client for an Engram cluster (see :class:`engram.Client`).

    Give it any nodes' API addresses (``"10.0.0.1:7001,10.0.0.2:7001"`` or a list): a write
    sent to a follower is forwarded by it to the leader, a failed attempt is retried at the
    next node with the same idempotency key, so a write applies at most once. Secured
    clusters need ``ca_file`` (the cluster CA) and ``api_key`` (or ``api_key_file``).

    ``embedding_function`` (any callable text → vector) lets :meth:`add` and :meth:`search`
    take text alone. ``create_namespaces=True`` lets puts create a namespace on first write;
    otherwise a put to an unknown namespace raises :class:`engram.errors.NotFound`.

    >>> async with AsyncClient("127.0.0.1:7001", api_key_file="app.key", ca_file="ca.pem") as c:
    ...     await c.put("acme/user-42", "likes tea", [0.1, 0.2, 0.3, 0.4])
    """

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]],
        *,
        api_key: Optional[str] = None,
        api_key_file: Optional[str] = None,
        ca_file: Optional[str] = None,
        ca_pem: Optional[bytes] = None,
        server_name: Optional[str] = None,
        timeout: float = 30.0,
        retry: RetryPolicy = RetryPolicy(),
        embedding_function: Optional[EmbeddingFunction] = None,
        create_namespaces: bool = False,
    ) -> None:
        self._endpoints = _core.endpoints_of(endpoints)
        self._creds = _core.credentials(ca_file, ca_pem)
        self._server_name = server_name
        key = _core.read_key(api_key, api_key_file)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),) if key else ()
        self._timeout = timeout
        self._retry = retry
        self.embedding_function = embedding_function
        self._create_namespaces = create_namespaces
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._preferred = self._endpoints[0]

    # -- plumbing -------------------------------------------------------------------------

    def _channel(self, addr: str) -> grpc.aio.Channel:
        ch = self._channels.get(addr)
        if ch is None:
            opts: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 << 20)]
            if self._server_name:
                opts.append(("grpc.ssl_target_name_override", self._server_name))
            ch = (grpc.aio.secure_channel(addr, self._creds, opts) if self._creds is not None
                  else grpc.aio.insecure_channel(addr, opts))
            self._channels[addr] = ch
        return ch

    def _next(self, addr: str) -> str:
        eps = self._endpoints
        return eps[(eps.index(addr) + 1) % len(eps)] if addr in eps else eps[0]

    async def _call(self, service: str, method: str, req: Any, *, write: bool, timeout: Optional[float] = None) -> Any:
        deadline = time.monotonic() + (timeout if timeout is not None else self._timeout)
        addr = self._preferred
        last: Optional[errors.EngramError] = None
        maybe = False
        for attempt in range(self._retry.attempts):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ch = self._channel(addr)
            stub = memory_pb2_grpc.MemoryServiceStub(ch) if service == "memory" else admin_pb2_grpc.AdminServiceStub(ch)
            try:
                resp = await getattr(stub, method)(req, timeout=min(remaining, self._retry.attempt_timeout),
                                             metadata=self._metadata)
                self._preferred = addr
                return resp
            except grpc.RpcError as e:
                err = _core.error_of(e)
            maybe = maybe or err.may_have_applied
            err.may_have_applied = maybe
            last = err
            decision = _core.decide(err, write=write, policy=self._retry)
            if decision == _core.FAIL:
                raise err
            if decision == _core.REDIRECT and err.leader_addr and err.leader_addr != addr:
                addr = err.leader_addr
                continue
            wait = err.retry_after if isinstance(err, errors.ResourceExhausted) else self._retry.backoff(attempt)
            await asyncio.sleep(max(0.0, min(wait or 0.0, deadline - time.monotonic())))
            addr = self._next(addr)
        if last is None:
            last = errors.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed", may_have_applied=maybe)
        raise last

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- namespaces -----------------------------------------------------------------------

    async def create_namespace(self, namespace: str, dimension: int, metric: str = "cosine", *,
                         idempotency_key: Optional[str] = None) -> NamespaceInfo:
        """Creates a namespace (returns the existing one if it has this dimension and metric)."""
        req = memory_pb2.CreateNamespaceRequest(namespace=namespace, dimension=dimension,
                                                metric=_core.metric_of(metric),
                                                options=_core.write_options(idempotency_key))
        return NamespaceInfo.from_pb((await self._call("memory", "CreateNamespace", req, write=True)).namespace)

    async def get_namespace(self, namespace: str, *, consistency: str = "linearizable") -> NamespaceInfo:
        req = memory_pb2.GetNamespaceRequest(namespace=namespace, consistency=_core.consistency_of(consistency))
        return NamespaceInfo.from_pb((await self._call("memory", "GetNamespace", req, write=False)).namespace)

    async def list_namespaces(self, prefix: str = "", *, page_size: int = 100) -> AsyncIterator[NamespaceInfo]:
        """Every namespace the key may read, in name order, fetched a page at a time."""
        token = ""
        while True:
            req = memory_pb2.ListNamespacesRequest(prefix=prefix, page_size=page_size, page_token=token)
            page = await self._call("memory", "ListNamespaces", req, write=False)
            for n in page.namespaces:
                yield NamespaceInfo.from_pb(n)
            token = page.next_page_token
            if not token:
                return

    async def delete_namespace(self, namespace: str, *, idempotency_key: Optional[str] = None) -> int:
        """Erases the namespace and every memory in it; returns how many memories went."""
        req = memory_pb2.DeleteNamespaceRequest(namespace=namespace, options=_core.write_options(idempotency_key))
        return (await self._call("memory", "DeleteNamespace", req, write=True)).deleted_memories

    # -- memories -------------------------------------------------------------------------

    async def put(
        self,
        namespace: str,
        text: str,
        embedding: Optional[Vector] = None,
        *,
        id: Optional[str] = None,
        tags: Optional[Mapping[str, str]] = None,
        importance: Optional[float] = None,
        expires_at_ms: Optional[int] = None,
        if_absent: bool = False,
        if_revision: Optional[int] = None,
        idempotency_key: Optional[str] = None,
    ) -> PutResult:
        """Writes one memory. Without `embedding`, the client's embedding function makes one.
        `if_absent` / `if_revision` are compare-and-set guards
        (:class:`engram.errors.PreconditionFailed` when they do not hold)."""
        m = _core.memory_input(text, embedding, self.embedding_function, id=id, tags=tags, importance=importance,
                               expires_at_ms=expires_at_ms)
        req = memory_pb2.PutRequest(namespace=namespace, memory=m, precondition=_core.precondition(if_absent, if_revision),
                                    options=_core.write_options(idempotency_key),
                                    create_namespace=self._create_namespaces)
        return PutResult.from_pb(await self._call("memory", "Put", req, write=True))

    async def add(self, namespace: str, text: str, **kwargs: Any) -> PutResult:
        """:meth:`put` with the embedding made from `text` (needs an embedding function)."""
        return await self.put(namespace, text, None, **kwargs)

    async def put_batch(self, namespace: str, items: Iterable[Union[Mapping[str, Any], types_pb2.MemoryInput]], *,
                  batch_size: int = _core.DEFAULT_BATCH_SIZE) -> list[PutResult]:
        """Writes many memories, `batch_size` per log entry: each batch applies whole or not at
        all, and a failure stops before the next batch (earlier batches stay written)."""
        out: list[PutResult] = []
        for chunk in _core.chunks(items, batch_size):
            req = memory_pb2.PutBatchRequest(namespace=namespace,
                                             items=[_core.item(x, self.embedding_function) for x in chunk],
                                             options=_core.write_options(None),
                                             create_namespace=self._create_namespaces)
            resp = await self._call("memory", "PutBatch", req, write=True)
            out.extend(PutResult.from_pb(r) for r in resp.results)
        return out

    async def get(self, namespace: str, id: str, *, consistency: str = "linearizable", reinforce: bool = False) -> Memory:
        req = memory_pb2.GetRequest(namespace=namespace, id=id, consistency=_core.consistency_of(consistency),
                                    reinforce=reinforce)
        return Memory.from_pb((await self._call("memory", "Get", req, write=False)).memory)

    async def delete(self, namespace: str, id: str, *, if_revision: Optional[int] = None,
               idempotency_key: Optional[str] = None) -> bool:
        """Deletes a memory; False when it did not exist."""
        req = memory_pb2.DeleteRequest(namespace=namespace, id=id, precondition=_core.precondition(False, if_revision),
                                       options=_core.write_options(idempotency_key))
        return (await self._call("memory", "Delete", req, write=True)).deleted

    async def list(self, namespace: str, *, page_size: int = 100, consistency: str = "linearizable") -> AsyncIterator[Memory]:
        """Every memory of the namespace the key may read, in id order, a page at a time."""
        token = ""
        while True:
            req = memory_pb2.ListRequest(namespace=namespace, page_size=page_size, page_token=token,
                                         consistency=_core.consistency_of(consistency))
            page = await self._call("memory", "List", req, write=False)
            for m in page.memories:
                yield Memory.from_pb(m)
            token = page.next_page_token
            if not token:
                return

    async def search(
        self,
        namespace: str,
        vector: Optional[Vector] = None,
        *,
        text: Optional[str] = None,
        k: int = 10,
        tags: Optional[Mapping[str, str]] = None,
        min_importance: Optional[float] = None,
        score_threshold: Optional[float] = None,
        include_memory: bool = True,
        consistency: str = "linearizable",
        reinforce: bool = False,
    ) -> list[SearchHit]:
        """The `k` nearest memories to `vector` (or to the embedding of `text`)."""
        req = _core.search_request(namespace, vector, text, self.embedding_function, k=k, tags=tags,
                                   min_importance=min_importance, score_threshold=score_threshold,
                                   include_memory=include_memory, consistency=consistency, reinforce=reinforce)
        return _core.hits(await self._call("memory", "Search", req, write=False))

    # -- cluster --------------------------------------------------------------------------

    async def status(self) -> admin_pb2.StatusResponse:
        """The answering node's view of the cluster (needs an admin key on a secured cluster)."""
        return await self._call("admin", "Status", admin_pb2.StatusRequest(), write=False)
