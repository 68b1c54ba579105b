"""An MCP server that gives an MCP client (Claude Desktop, an IDE agent, …) Engram as its
memory: tools `remember`, `recall`, `forget` and `list_memories` on one namespace.

Run: ``python -m engram.mcp_server [--transport stdio|streamable-http] [--port 8000]``.
Configuration (environment):

* ``ENGRAM_ENDPOINTS`` — node API addresses, comma-separated (required);
* ``ENGRAM_API_KEY_FILE`` / ``ENGRAM_API_KEY``, ``ENGRAM_CA_FILE`` — as for engramctl;
* ``ENGRAM_MCP_NAMESPACE`` — the namespace the tools use (required); created on first use;
* ``ENGRAM_MCP_EMBEDDING`` — ``module:function`` of a text → vector callable; default: the
  lexical hashing embedding (:mod:`engram.hashing`, 256 dimensions);
* ``ENGRAM_MCP_DIMENSION`` — the dimension of that embedding (default 256).

The namespace is fixed by configuration, never chosen by the model: a prompt cannot reach
another namespace, and the key's grants bound what the server itself may do.
"""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any, Callable, Optional

from mcp.server.mcpserver import MCPServer

from . import errors
from .client import Client
from .hashing import hashing_embedding


def _embedding() -> tuple[Callable[[str], Any], int]:
    spec = os.environ.get("ENGRAM_MCP_EMBEDDING")
    dim = int(os.environ.get("ENGRAM_MCP_DIMENSION", "256"))
    if not spec:
        return (lambda t: hashing_embedding(t, dim)), dim
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name), dim


def build(client: Optional[Client] = None, namespace: Optional[str] = None) -> MCPServer:
    """The server, over `client` and `namespace` (from the environment when not given)."""
    embed, dim = _embedding()
    if client is None:
        endpoints = os.environ.get("ENGRAM_ENDPOINTS")
        if not endpoints:
            raise SystemExit("ENGRAM_ENDPOINTS is not set")
        client = Client(endpoints, api_key=os.environ.get("ENGRAM_API_KEY"),
                        api_key_file=os.environ.get("ENGRAM_API_KEY_FILE"), ca_file=os.environ.get("ENGRAM_CA_FILE"),
                        embedding_function=embed)
    client.embedding_function = client.embedding_function or embed
    ns = namespace or os.environ.get("ENGRAM_MCP_NAMESPACE")
    if not ns:
        raise SystemExit("ENGRAM_MCP_NAMESPACE is not set")
    created = False

    def ensure() -> None:
        nonlocal created
        if not created:
            try:
                client.get_namespace(ns)
            except errors.NotFound:
                client.create_namespace(ns, dim)
            created = True

    server = MCPServer("engram", instructions=f"Long-term memory in Engram namespace {ns}.")

    @server.tool()
    def remember(text: str, tags: Optional[dict[str, str]] = None, importance: Optional[float] = None) -> dict:
        """Store a memory (a fact, preference or event worth keeping). Returns its id."""
        ensure()
        r = client.add(ns, text, tags=tags, importance=importance)
        return {"id": r.id, "action": r.action}

    @server.tool()
    def recall(query: str, k: int = 5) -> list[dict]:
        """The memories most related to `query`, best first."""
        ensure()
        return [{"id": h.id, "text": h.memory.text if h.memory else "", "score": h.score,
                 "tags": h.memory.tags if h.memory else {}} for h in client.search(ns, text=query, k=k)]

    @server.tool()
    def forget(id: str) -> dict:
        """Delete the memory with this id."""
        ensure()
        return {"deleted": client.delete(ns, id)}

    @server.tool()
    def list_memories(limit: int = 50) -> list[dict]:
        """Up to `limit` stored memories, in id order."""
        ensure()
        out = []
        for m in client.list(ns):
            if len(out) >= limit:
                break
            out.append({"id": m.id, "text": m.text, "tags": m.tags})
        return out

    return server


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="engram-mcp", description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["stdio", "streamable-http"], default="stdio")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-remote", action="store_true",
                   help="serve HTTP beyond loopback (it has no auth of its own: put it behind one)")
    a = p.parse_args(argv)
    if a.transport == "streamable-http" and a.host not in ("127.0.0.1", "::1", "localhost") and not a.allow_remote:
        p.error("the HTTP transport acts with this server's Engram key and has no auth of its own; "
                "bind it to loopback, or pass --allow-remote behind an authenticating proxy")
    server = build()
    if a.transport == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host=a.host, port=a.port)


if __name__ == "__main__":
    main()
