"""The mem0-style facade on a real cluster: add / search / get_all / get / update / delete /
history, scoped by user."""

from __future__ import annotations

import uuid

import engram
from engram.hashing import hashing_embedding
from engram.mem0 import Memory


def test_the_mem0_calls(cluster, root_key):
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        m = Memory(c, namespace=f"mem0-{uuid.uuid4().hex[:8]}", embedding_function=hashing_embedding)
        added = m.add([{"role": "user", "content": "I love green tea"},
                       {"role": "assistant", "content": "Noted: green tea"}], user_id="alice", metadata={"src": "chat"})
        assert [r["event"] for r in added["results"]] == ["ADD", "ADD"]
        m.add("I work night shifts as a nurse", user_id="alice")
        m.add("I love black coffee", user_id="bob")

        found = m.search("what tea does she love", user_id="alice", limit=1)["results"]
        assert found[0]["memory"] == "I love green tea" and found[0]["user_id"] == "alice"
        assert found[0]["metadata"] == {"src": "chat"} and "score" in found[0]
        assert {r["memory"] for r in m.search("love", user_id="bob")["results"]} == {"I love black coffee"}
        assert len(m.get_all(user_id="alice")["results"]) == 3

        tea = added["results"][0]["id"]
        assert m.get(tea)["memory"] == "I love green tea"
        assert m.get(tea, user_id="bob") is None, "another user's id reads as absent"
        m.update(tea, "I love oolong tea")
        assert m.get(tea)["memory"] == "I love oolong tea"
        m.delete(tea)
        assert m.get(tea) is None
        assert [(e["event"], e["old_memory"], e["new_memory"]) for e in m.history(tea)] == [
            ("ADD", None, "I love green tea"),
            ("UPDATE", "I love green tea", "I love oolong tea"),
            ("DELETE", "I love oolong tea", None),
        ]
        m.delete_all(user_id="alice")
        assert m.get_all(user_id="alice")["results"] == []
        assert len(m.get_all(user_id="bob")["results"]) == 1
