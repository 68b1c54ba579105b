"""The SDK against a real cluster: CRUD, compare-and-set, typed errors, pagination, numpy,
an embedding function, batches, the asyncio client, writes through a follower and idempotent
retries across a leader kill."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import numpy as np
import pytest

import engram
from engram import errors


def ns(prefix: str = "acme") -> str:
    return f"{prefix}/t-{uuid.uuid4().hex[:10]}"


def vec(seed: int, dim: int = 4) -> list[float]:
    return [((seed * 31 + i * 17) % 97) / 97 + 0.01 for i in range(dim)]


def embed(text: str) -> list[float]:
    """A toy embedding: words hashed into 32 buckets, so shared words mean nearby vectors."""
    v = [0.0] * 32
    for w in text.lower().split():
        v[hashlib.blake2b(w.encode(), digest_size=1).digest()[0] % 32] += 1.0
    return [x + 0.01 for x in v]


@pytest.fixture()
def client(cluster, root_key):
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        yield c


def test_crud_and_compare_and_set(client):
    name = ns()
    info = client.create_namespace(name, dimension=4)
    assert (info.name, info.dimension, info.metric) == (name, 4, "cosine")
    r = client.put(name, "likes tea", vec(1), id="tea", tags={"kind": "preference"}, importance=0.7)
    assert (r.id, r.action) == ("tea", "created")
    m = client.get(name, "tea")
    assert (m.text, m.tags, round(m.importance, 3), m.revision) == ("likes tea", {"kind": "preference"}, 0.7, r.revision)

    with pytest.raises(errors.PreconditionFailed) as e:
        client.put(name, "likes coffee", vec(2), id="tea", if_absent=True)
    assert e.value.current_revision == r.revision and not e.value.may_have_applied
    with pytest.raises(errors.PreconditionFailed):
        client.put(name, "likes coffee", vec(2), id="tea", if_revision=r.revision + 1000)
    r2 = client.put(name, "likes coffee", vec(2), id="tea", if_revision=r.revision)
    assert r2.updated and r2.revision > r.revision
    assert client.get(name, "tea").text == "likes coffee"

    hits = client.search(name, vec(2), k=3)
    assert hits[0].id == "tea" and hits[0].memory is not None
    assert client.delete(name, "tea") is True
    assert client.delete(name, "tea") is False
    with pytest.raises(errors.NotFound):
        client.get(name, "tea")
    assert name in [n.name for n in client.list_namespaces(prefix="acme/")]
    assert client.get_namespace(name).memory_count == 0
    client.delete_namespace(name)
    with pytest.raises(errors.NotFound):
        client.get_namespace(name)


def test_typed_errors_say_nothing_was_applied(cluster, client):
    name = ns()
    client.create_namespace(name, dimension=4)
    with pytest.raises(errors.InvalidArgument) as e:
        client.put(name, "x", [0.1, 0.2])
    assert e.value.field == "memory.embedding" and not e.value.may_have_applied
    with pytest.raises(errors.InvalidArgument) as e:
        client.put(name, "x", [0.1, float("nan"), 0.2, 0.3])
    assert e.value.field == "memory.embedding"
    with pytest.raises(errors.InvalidArgument) as e:
        client.create_namespace(ns(), dimension=0)
    assert e.value.field == "dimension"
    # A typo is not a new namespace.
    with pytest.raises(errors.NotFound):
        client.put(name + "-typo", "x", vec(1))
    # No key; another tenant's key.
    with engram.Client(cluster.endpoints, ca_file=cluster.ca) as anon:
        with pytest.raises(errors.Unauthenticated):
            anon.get(name, "x")
    other = cluster.tenant_key("other/*")
    with engram.Client(cluster.endpoints, api_key=other, ca_file=cluster.ca) as o:
        with pytest.raises(errors.PermissionDenied) as e:
            o.put(name, "x", vec(1))
        assert not e.value.may_have_applied
        with pytest.raises(errors.PermissionDenied):
            o.get_namespace(name)
        assert name not in [n.name for n in o.list_namespaces()]
    assert client.get_namespace(name).memory_count == 0
    with pytest.raises(ValueError):
        client.put(name, "no vector and no embedding function")


def test_pagination_is_an_iterator(client):
    name = ns()
    client.create_namespace(name, dimension=4)
    ids = [f"m{i:03}" for i in range(25)]
    client.put_batch(name, [{"id": i, "text": f"memory {i}", "embedding": vec(n)} for n, i in enumerate(ids)])
    assert [m.id for m in client.list(name, page_size=7)] == ids
    names = [ns() for _ in range(5)]
    for n in names:
        client.create_namespace(n, dimension=4)
    listed = [n.name for n in client.list_namespaces(prefix="acme/", page_size=2)]
    assert set(names) <= set(listed) and listed == sorted(listed)


def test_numpy_vectors_and_an_embedding_function(cluster, root_key):
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca, embedding_function=embed) as c:
        name = ns()
        c.create_namespace(name, dimension=32)
        c.put(name, "numpy row", np.asarray(embed("numpy row"), dtype=np.float32), id="np")
        with pytest.raises(ValueError):
            c.put(name, "matrix", np.zeros((2, 4), dtype=np.float32))
        c.add(name, "the deploy happens on tuesday", id="deploy")
        c.add(name, "lunch is at noon", id="lunch")
        hits = c.search(name, text="deploy happens tuesday", k=1)
        assert hits[0].id == "deploy"
        hits = c.search(name, np.asarray(embed("numpy row")), k=1)
        assert hits[0].id == "np"


def test_batches_are_split(client):
    name = ns()
    client.create_namespace(name, dimension=4)
    items = [{"text": f"item {i}", "embedding": vec(i)} for i in range(1200)]
    results = client.put_batch(name, items, batch_size=500)
    assert len(results) == 1200 and len({r.id for r in results}) == 1200
    assert len({r.applied_index for r in results}) == 3, "three log entries of at most 500"
    assert client.get_namespace(name).memory_count == 1200


def test_writes_through_a_follower(cluster, root_key, client):
    leader = client.status().leader_id
    follower = next(n for n in cluster.nodes if n.id != leader)
    name = ns()
    with engram.Client([follower.api], api_key=root_key, ca_file=cluster.ca) as only_follower:
        only_follower.create_namespace(name, dimension=4)
        r = only_follower.put(name, "through a follower", vec(3), id="f")
    assert client.get(name, "f").revision == r.revision


async def test_the_asyncio_client(cluster, root_key):
    async with engram.AsyncClient(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        name = ns()
        await c.create_namespace(name, dimension=4, metric="l2")
        r = await c.put(name, "async memory", vec(4), id="a")
        assert (await c.get(name, "a")).revision == r.revision
        await c.put_batch(name, [{"id": f"b{i}", "text": "b", "embedding": vec(i)} for i in range(5)])
        assert [m.id async for m in c.list(name, page_size=2)] == ["a", "b0", "b1", "b2", "b3", "b4"]
        hits = await c.search(name, vec(4), k=2)
        assert hits[0].id == "a" and hits[0].score == pytest.approx(0.0, abs=1e-5)
        with pytest.raises(errors.PreconditionFailed):
            await c.put(name, "again", vec(4), id="a", if_absent=True)
        assert (await c.get_namespace(name)).metric == "l2"
        assert name in [n.name async for n in c.list_namespaces(prefix="acme/")]


def test_retries_across_a_leader_kill_apply_each_write_once(cluster, root_key, client):
    """Server-assigned ids: a retry that were not idempotent would make a second memory."""
    name = ns()
    client.create_namespace(name, dimension=4)
    retry = engram.RetryPolicy(attempts=40, attempt_timeout=2.0, max_backoff=0.5)
    acked: list[str] = []
    failed: list[str] = []
    stop = threading.Event()

    def writer(w: int) -> None:
        with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca, retry=retry, timeout=30) as c:
            i = 0
            while not stop.is_set():
                text = f"writer {w} write {i}"
                try:
                    c.put(name, text, vec(w * 1000 + i))
                    acked.append(text)
                except errors.EngramError:
                    failed.append(text)
                i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    leader = cluster.node(client.status().leader_id)
    leader.kill()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    leader.start()
    assert len(acked) > 20, f"too few writes went through: {len(acked)} ({len(failed)} failed)"
    texts = [m.text for m in client.list(name, page_size=500)]
    assert len(texts) == len(set(texts)), "a retried write was applied twice"
    missing = set(acked) - set(texts)
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:5]}"
    assert set(texts) <= set(acked) | set(failed)
