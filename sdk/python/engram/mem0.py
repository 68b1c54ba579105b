"""A mem0-style facade: ``Memory().add / search / get_all / get / update / delete /
delete_all / history`` over one Engram namespace.

How mem0's semantics map, and where they differ:

* ``user_id`` / ``agent_id`` / ``run_id`` become tags; every call is scoped by the ones given,
  and ``get`` / ``update`` / ``delete`` by id refuse a memory outside the given scope.
* ``add(messages)`` stores each message's content (or the string) as one memory. mem0 asks an
  LLM to extract facts first; here that is the caller's choice (``infer`` is not supported).
  A namespace with exact dedup (see docs/memory-model.md) answers a repeated fact with the
  existing memory: the event is then ``NONE``, as in mem0.
* ``history(id)`` lists ADD / UPDATE / DELETE events, kept in the sibling namespace
  ``<namespace>-history``. They are written after the change itself, so a crash in between
  can lose an event (never the memory).
* Results are dicts shaped like mem0's (``{"results": [...]}``) with ``id``, ``memory``,
  ``hash``, ``metadata``, ``score``, ``created_at``, ``updated_at``, and the scope ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import uuid
from typing import Any, Callable, Optional, Union

import grpc

from . import errors
from .client import Client

_SCOPES = ("user_id", "agent_id", "run_id")
_META = "meta"


def _iso(ms: int) -> str:
    return _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.timezone.utc).isoformat()


class Memory:
    """mem0's ``Memory`` on Engram.

    >>> m = Memory(engram.Client(...), namespace="mem0", embedding_function=embed, dimension=384)
    >>> m.add("I like tea", user_id="alice")
    >>> m.search("what does alice drink?", user_id="alice")
    """

    def __init__(self, client: Client, *, namespace: str = "mem0", embedding_function: Optional[Callable[[str], Any]] = None,
                 dimension: Optional[int] = None) -> None:
        self.client = client
        self.namespace = namespace
        self.history_namespace = f"{namespace}-history"
        if embedding_function is not None:
            client.embedding_function = embedding_function
        if client.embedding_function is None:
            raise ValueError("the facade needs an embedding function (on the client or here)")
        dim = dimension or len(list(client.embedding_function("dimension probe")))
        for ns, d in ((self.namespace, dim), (self.history_namespace, 1)):
            try:
                client.get_namespace(ns)
            except errors.NotFound:
                client.create_namespace(ns, d)

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _scope(**ids: Optional[str]) -> dict[str, str]:
        return {k: v for k, v in ids.items() if k in _SCOPES and v}

    def _shape(self, m: Any, score: Optional[float] = None) -> dict[str, Any]:
        tags = dict(m.tags)
        meta = json.loads(tags.pop(_META, "{}"))
        out: dict[str, Any] = {"id": m.id, "memory": m.text, "hash": "", "metadata": meta,
                               "created_at": _iso(m.created_at_ms), "updated_at": _iso(m.updated_at_ms)}
        out.update({k: tags[k] for k in _SCOPES if k in tags})
        if score is not None:
            out["score"] = score
        return out

    def _event(self, memory_id: str, event: str, old: Optional[str], new: Optional[str]) -> None:
        record = {"memory_id": memory_id, "event": event, "old_memory": old, "new_memory": new}
        self.client.put(self.history_namespace, json.dumps(record), [1.0], id=f"{memory_id}.{uuid.uuid4().hex}",
                        tags={"memory_id": memory_id})

    def _owned(self, memory_id: str, scope: dict[str, str]) -> Any:
        m = self.client.get(self.namespace, memory_id)
        if any(m.tags.get(k) != v for k, v in scope.items()):
            raise errors.NotFound(grpc.StatusCode.NOT_FOUND, f"memory {memory_id!r} not found in this scope")
        return m

    # -- mem0's API -----------------------------------------------------------------------

    def add(self, messages: Union[str, dict[str, Any], list[dict[str, Any]]], *, user_id: Optional[str] = None,
            agent_id: Optional[str] = None, run_id: Optional[str] = None,
            metadata: Optional[dict[str, Any]] = None) -> dict[str, list[dict[str, Any]]]:
        scope = self._scope(user_id=user_id, agent_id=agent_id, run_id=run_id)
        if not scope:
            raise ValueError("give at least one of user_id, agent_id, run_id")
        if isinstance(messages, str):
            texts = [messages]
        else:
            msgs = [messages] if isinstance(messages, dict) else messages
            texts = [m["content"] for m in msgs if m.get("role", "user") != "system" and m.get("content")]
        tags = dict(scope)
        if metadata:
            tags[_META] = json.dumps(metadata, sort_keys=True)
        results = []
        for text in texts:
            r = self.client.add(self.namespace, text, tags=tags)
            event = {"created": "ADD", "linked": "ADD", "updated": "UPDATE", "merged": "UPDATE"}.get(r.action, "NONE")
            if event != "NONE":
                self._event(r.id, event, None, text)
            results.append({"id": r.id, "memory": text, "event": event})
        return {"results": results}

    def search(self, query: str, *, user_id: Optional[str] = None, agent_id: Optional[str] = None,
               run_id: Optional[str] = None, limit: int = 100) -> dict[str, list[dict[str, Any]]]:
        scope = self._scope(user_id=user_id, agent_id=agent_id, run_id=run_id)
        hits = self.client.search(self.namespace, text=query, k=limit, tags=scope)
        return {"results": [self._shape(h.memory, h.score) for h in hits if h.memory is not None]}

    def get_all(self, *, user_id: Optional[str] = None, agent_id: Optional[str] = None, run_id: Optional[str] = None,
                limit: int = 100) -> dict[str, list[dict[str, Any]]]:
        scope = self._scope(user_id=user_id, agent_id=agent_id, run_id=run_id)
        out = []
        for m in self.client.list(self.namespace):
            if all(m.tags.get(k) == v for k, v in scope.items()):
                out.append(self._shape(m))
                if len(out) >= limit:
                    break
        return {"results": out}

    def get(self, memory_id: str, **scope_ids: Optional[str]) -> Optional[dict[str, Any]]:
        try:
            return self._shape(self._owned(memory_id, self._scope(**scope_ids)))
        except errors.NotFound:
            return None

    def update(self, memory_id: str, data: str, **scope_ids: Optional[str]) -> dict[str, str]:
        m = self._owned(memory_id, self._scope(**scope_ids))
        self.client.put(self.namespace, data, id=memory_id, tags=m.tags, importance=m.importance,
                        expires_at_ms=m.expires_at_ms or None, if_revision=m.revision)
        self._event(memory_id, "UPDATE", m.text, data)
        return {"message": "Memory updated successfully!"}

    def delete(self, memory_id: str, **scope_ids: Optional[str]) -> dict[str, str]:
        m = self._owned(memory_id, self._scope(**scope_ids))
        self.client.delete(self.namespace, memory_id, if_revision=m.revision)
        self._event(memory_id, "DELETE", m.text, None)
        return {"message": "Memory deleted successfully!"}

    def delete_all(self, *, user_id: Optional[str] = None, agent_id: Optional[str] = None,
                   run_id: Optional[str] = None) -> dict[str, str]:
        scope = self._scope(user_id=user_id, agent_id=agent_id, run_id=run_id)
        if not scope:
            raise ValueError("give at least one of user_id, agent_id, run_id (delete_namespace erases everything)")
        for m in list(self.client.list(self.namespace)):
            if all(m.tags.get(k) == v for k, v in scope.items()):
                self.client.delete(self.namespace, m.id)
                self._event(m.id, "DELETE", m.text, None)
        return {"message": "Memories deleted successfully!"}

    def history(self, memory_id: str) -> list[dict[str, Any]]:
        events = [m for m in self.client.list(self.history_namespace) if m.tags.get("memory_id") == memory_id]
        events.sort(key=lambda m: (m.created_at_ms, m.revision))
        return [dict(json.loads(m.text), id=m.id, created_at=_iso(m.created_at_ms)) for m in events]
