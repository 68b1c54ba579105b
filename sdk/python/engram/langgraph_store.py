"""A LangGraph `BaseStore` on Engram (``pip install "engram-client[langgraph]"``).

Mapping:

* A namespace tuple ``("users", "alice")`` is the Engram namespace ``<root>/users/alice``.
  Segments made only of ``[a-z0-9-]`` are kept as they are; any other segment is stored as
  ``_`` + the hex of its UTF-8, so every tuple maps to a valid name and back.
* A key is the memory id (kept when it is ``[A-Za-z0-9.:-]``, else ``_`` + hex).
* The value is the memory's text, as JSON. With an ``index`` config (``{"dims": N, "embed":
  …, "fields": [...]}``) the embedding is made from the indexed fields, joined; without one,
  or for ``index=False``, a constant unit vector is stored (Engram keeps one per memory).
* ``search(prefix, query=…)`` ranks by vector similarity over every namespace under the
  prefix; ``filter`` (field equality) is applied to what comes back. Without a query, items
  come in namespace then key order.

Differences from LangGraph's in-memory store: no TTL (``supports_ttl`` is False); a namespace
is created on its first put with the index's dimension, so one store's index config must not
change; a value is at most 64 KiB of JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any, Iterable, Optional

from langgraph.store.base import (
    BaseStore,
    GetOp,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)
from langgraph.store.base.embed import ensure_embeddings, get_text_at_path

from . import errors
from .client import Client

_PLAIN_SEGMENT = re.compile(r"^[a-z0-9-]+$")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9.:-]+$")


def _enc(s: str, plain: re.Pattern[str]) -> str:
    return s if plain.match(s) else "_" + s.encode().hex()


def _dec(s: str) -> str:
    if s.startswith("_"):
        try:
            return bytes.fromhex(s[1:]).decode()
        except ValueError:  # not one of ours: an id written by another client
            return s
    return s


def _time(ms: int) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc)


class EngramStore(BaseStore):
    """LangGraph long-term memory in an Engram cluster.

    >>> store = EngramStore(engram.Client(...), root="agents", index={"dims": 384, "embed": embed})
    >>> store.put(("users", "alice"), "prefs", {"text": "likes tea"})
    >>> store.search(("users",), query="what does alice drink?")
    """

    supports_ttl = False

    def __init__(self, client: Client, *, root: str = "langgraph", index: Optional[dict[str, Any]] = None) -> None:
        if not _PLAIN_SEGMENT.match(root):
            raise ValueError("root must be one namespace segment of [a-z0-9-]")
        self.client = client
        self.root = root
        self.index = dict(index) if index else None
        self._embeddings = ensure_embeddings(self.index["embed"]) if self.index else None
        self._fields: list[str] = list(self.index.get("fields") or ["$"]) if self.index else []
        self._dims = int(self.index["dims"]) if self.index else 1
        self._known: set[str] = set()

    # -- names ----------------------------------------------------------------------------

    def _ns(self, namespace: tuple[str, ...]) -> str:
        if not namespace:
            raise ValueError("a namespace needs at least one label")
        return "/".join([self.root, *(_enc(s, _PLAIN_SEGMENT) for s in namespace)])

    def _tuple(self, name: str) -> tuple[str, ...]:
        return tuple(_dec(s) for s in name.split("/")[1:])

    # -- operations -----------------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        out: list[Result] = []
        for op in ops:
            if isinstance(op, GetOp):
                out.append(self._get(op))
            elif isinstance(op, PutOp):
                self._put(op)
                out.append(None)
            elif isinstance(op, SearchOp):
                out.append(self._search(op))
            elif isinstance(op, ListNamespacesOp):
                out.append(self._list_namespaces(op))
            else:
                raise TypeError(f"unknown op {op!r}")
        return out

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(None, self.batch, list(ops))

    def _item(self, m: Any, score: Optional[float] = None) -> Any:
        ns, key, value = self._tuple(m.namespace), _dec(m.id), json.loads(m.text)
        if score is None:
            return Item(value=value, key=key, namespace=ns, created_at=_time(m.created_at_ms),
                        updated_at=_time(m.updated_at_ms))
        return SearchItem(namespace=ns, key=key, value=value, created_at=_time(m.created_at_ms),
                          updated_at=_time(m.updated_at_ms), score=score)

    def _get(self, op: GetOp) -> Optional[Item]:
        try:
            return self._item(self.client.get(self._ns(op.namespace), _enc(op.key, _PLAIN_KEY)))
        except errors.NotFound:
            return None

    def _vector(self, value: dict[str, Any], index: Any) -> list[float]:
        if self._embeddings is None or index is False:
            return [1.0] + [0.0] * (self._dims - 1)
        fields = index if isinstance(index, list) else self._fields
        texts = [t for f in fields for t in get_text_at_path(value, f)]
        return list(self._embeddings.embed_query(" ".join(texts) if texts else json.dumps(value)))

    def _put(self, op: PutOp) -> None:
        name, key = self._ns(op.namespace), _enc(op.key, _PLAIN_KEY)
        if op.value is None:
            try:
                self.client.delete(name, key)
            except errors.NotFound:
                pass
            return
        value = dict(op.value)
        if name not in self._known:
            self.client.create_namespace(name, self._dims, "cosine")
            self._known.add(name)
        self.client.put(name, json.dumps(value, separators=(",", ":")), self._vector(value, op.index), id=key)

    def _namespaces_under(self, prefix: tuple[str, ...]) -> list[str]:
        base = "/".join([self.root, *(_enc(s, _PLAIN_SEGMENT) for s in prefix)])
        return [n.name for n in self.client.list_namespaces(prefix=base) if n.name == base or n.name.startswith(base + "/")]

    @staticmethod
    def _matches(value: dict[str, Any], flt: Optional[dict[str, Any]]) -> bool:
        return all(value.get(k) == v for k, v in (flt or {}).items())

    def _search(self, op: SearchOp) -> list[SearchItem]:
        names = self._namespaces_under(op.namespace_prefix)
        want = op.offset + op.limit
        found: list[SearchItem] = []
        if op.query and self._embeddings is not None:
            q = list(self._embeddings.embed_query(op.query))
            k = min(1000, want * (4 if op.filter else 1))
            for name in names:
                for h in self.client.search(name, q, k=k, include_memory=True):
                    item = self._item(h.memory, score=h.score)
                    if self._matches(item.value, op.filter):
                        found.append(item)
            found.sort(key=lambda i: -(i.score or 0.0))
        else:
            for name in names:
                for m in self.client.list(name):
                    item = self._item(m, score=None)
                    if self._matches(item.value, op.filter):
                        found.append(SearchItem(item.namespace, item.key, item.value, item.created_at, item.updated_at))
                    if len(found) >= want:
                        break
                if len(found) >= want:
                    break
        return found[op.offset:want]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        seen: list[tuple[str, ...]] = []
        for n in self.client.list_namespaces(prefix=self.root + "/"):
            ns = self._tuple(n.name)
            ok = True
            for cond in op.match_conditions or ():
                path = tuple(cond.path)
                part = ns[: len(path)] if cond.match_type == "prefix" else ns[-len(path):] if path else ()
                if len(ns) < len(path) or any(p != "*" and p != x for p, x in zip(path, part)):
                    ok = False
            if not ok:
                continue
            if op.max_depth is not None:
                ns = ns[: op.max_depth]
            if ns not in seen:
                seen.append(ns)
        return seen[op.offset: op.offset + op.limit]
