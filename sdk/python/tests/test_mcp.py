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


async def test_the_streamable_http_transport(cluster):
    """The same server over streamable HTTP (on loopback), through a real MCP client."""
    import asyncio
    import socket
    import subprocess

    from mcp.client.streamable_http import streamable_http_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = cluster.tenant_key("agents/*")
    env = dict(os.environ, ENGRAM_ENDPOINTS=",".join(cluster.endpoints), ENGRAM_API_KEY=key,
               ENGRAM_CA_FILE=cluster.ca, ENGRAM_MCP_NAMESPACE=f"agents/http-{uuid.uuid4().hex[:8]}")
    proc = subprocess.Popen([sys.executable, "-m", "engram.mcp_server", "--transport", "streamable-http",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        async with streamable_http_client(f"http://127.0.0.1:{port}/mcp") as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                saved = payload(await session.call_tool("remember", {"text": "HTTP works too"}))
                hits = payload(await session.call_tool("recall", {"query": "does http work", "k": 1}))
                assert hits[0]["id"] == saved["id"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    # Refused beyond loopback unless asked.
    out = subprocess.run([sys.executable, "-m", "engram.mcp_server", "--transport", "streamable-http",
                          "--host", "0.0.0.0"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "loopback" in out.stderr
