"""The LangGraph store on a real cluster: the BaseStore operations, namespaces as tuples
(including labels Engram's names cannot hold), vector search through the index config, and a
graph whose node remembers through the store."""

from __future__ import annotations

import hashlib
import uuid
from typing import TypedDict

import pytest
from langgraph.config import get_store
from langgraph.graph import END, START, StateGraph

import engram
from engram.langgraph_store import EngramStore


def embed_texts(texts: list[str]) -> list[list[float]]:
    out = []
    for t in texts:
        v = [0.01] * 32
        for w in t.lower().split():
            v[hashlib.blake2b(w.strip("?.!,").encode(), digest_size=1).digest()[0] % 32] += 1.0
        out.append(v)
    return out


@pytest.fixture()
def store(cluster, root_key):
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        yield EngramStore(c, root=f"lg-{uuid.uuid4().hex[:8]}", index={"dims": 32, "embed": embed_texts, "fields": ["text"]})


def test_put_get_search_delete_and_list_namespaces(store):
    alice, bob = ("users", "Alice@example"), ("users", "bob")
    store.put(alice, "drink", {"text": "Alice drinks green tea", "kind": "preference"})
    store.put(alice, "job/title", {"text": "Alice is a nurse", "kind": "fact"})
    store.put(bob, "drink", {"text": "Bob drinks black coffee", "kind": "preference"})
    store.put(("docs",), "readme", {"text": "unrelated"}, index=False)

    got = store.get(alice, "drink")
    assert got is not None and got.value["text"] == "Alice drinks green tea" and got.namespace == alice
    assert store.get(alice, "job/title").key == "job/title"
    assert store.get(alice, "missing") is None

    hits = store.search(("users",), query="who drinks tea", limit=2)
    assert [h.key for h in hits][0] == "drink" and hits[0].namespace == alice
    assert hits[0].score is not None and hits[0].score >= hits[-1].score
    facts = store.search(("users",), filter={"kind": "fact"})
    assert [(h.namespace, h.key) for h in facts] == [(alice, "job/title")]
    assert [h.key for h in store.search(("users", "bob"))] == ["drink"]

    assert set(store.list_namespaces()) == {alice, bob, ("docs",)}
    assert set(store.list_namespaces(prefix=("users",))) == {alice, bob}
    assert store.list_namespaces(max_depth=1) == [("docs",), ("users",)]

    store.put(alice, "drink", {"text": "Alice now drinks coffee", "kind": "preference"})
    assert store.get(alice, "drink").value["text"] == "Alice now drinks coffee"
    store.delete(alice, "drink")
    assert store.get(alice, "drink") is None


async def test_async_operations(store):
    ns = ("agents", "planner")
    await store.aput(ns, "goal", {"text": "ship the release"})
    assert (await store.aget(ns, "goal")).value == {"text": "ship the release"}
    assert [h.key for h in await store.asearch(ns, query="release")] == ["goal"]


def test_a_graph_remembers_through_the_store(store):
    class State(TypedDict):
        user: str
        message: str
        recalled: str

    def remember(state: State) -> dict:
        get_store().put(("users", state["user"]), "said", {"text": state["message"]})
        return {}

    def recall(state: State) -> dict:
        hits = get_store().search(("users", state["user"]), query=state["message"], limit=1)
        return {"recalled": hits[0].value["text"] if hits else ""}

    g = StateGraph(State)
    g.add_node("remember", remember)
    g.add_node("recall", recall)
    g.add_edge(START, "remember")
    g.add_edge("remember", "recall")
    g.add_edge("recall", END)
    out = g.compile(store=store).invoke({"user": "carol", "message": "I prefer window seats", "recalled": ""})
    assert out["recalled"] == "I prefer window seats"
    assert store.get(("users", "carol"), "said") is not None
