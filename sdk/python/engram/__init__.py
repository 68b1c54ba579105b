"""Engram's Python client: sync (:class:`Client`) and asyncio (:class:`AsyncClient`).

Generated gRPC stubs live in :mod:`engram.v1` (built from the repository's ``proto/`` when the
package is built).
"""

from . import errors
from ._core import Memory, NamespaceInfo, PutResult, RetryPolicy, SearchHit
from .aio import AsyncClient
from .client import Client
from .errors import EngramError

__all__ = [
    "AsyncClient",
    "Client",
    "EngramError",
    "Memory",
    "NamespaceInfo",
    "PutResult",
    "RetryPolicy",
    "SearchHit",
    "errors",
]
