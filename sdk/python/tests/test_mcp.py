"""The MCP server as an MCP client sees it: a real client session over stdio, spawning
`python -m engram.mcp_server`, calling each tool against the cluster."""

from __future__ import annotations

import json
import os
import sys
import uuid

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

import engram


def payload(result) -> object:
    assert not result.is_error, result
    if result.structured_content is not None:
        s = result.structured_content
        return s.get("result", s) if isinstance(s, dict) and set(s) == {"result"} else s
    return json.loads(result.content[0].text)


async def test_an_mcp_client_remembers_recalls_lists_and_forgets(cluster, root_key):
    key = cluster.tenant_key("agents/*")
    namespace = f"agents/mcp-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, ENGRAM_ENDPOINTS=",".join(cluster.endpoints), ENGRAM_API_KEY=key,
               ENGRAM_CA_FILE=cluster.ca, ENGRAM_MCP_NAMESPACE=namespace)
    params = StdioServerParameters(command=sys.executable, args=["-m", "engram.mcp_server"], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name for t in (await session.list_tools()).tools}
            assert tools == {"remember", "recall", "forget", "list_memories"}

            tea = payload(await session.call_tool("remember", {"text": "The user prefers green tea", "tags": {"kind": "pref"}}))
            payload(await session.call_tool("remember", {"text": "The deploy happens on Tuesday"}))
            assert tea["action"] == "created"
            hits = payload(await session.call_tool("recall", {"query": "what tea does the user prefer", "k": 1}))
            assert hits[0]["id"] == tea["id"] and hits[0]["text"] == "The user prefers green tea"
            listed = payload(await session.call_tool("list_memories", {}))
            assert len(listed) == 2
            assert payload(await session.call_tool("forget", {"id": tea["id"]})) == {"deleted": True}
            assert len(payload(await session.call_tool("list_memories", {}))) == 1

    # The tools wrote where the configuration said, and nowhere else.
    with engram.Client(cluster.endpoints, api_key=root_key, ca_file=cluster.ca) as c:
        assert [m.text for m in c.list(namespace)] == ["The deploy happens on Tuesday"]
