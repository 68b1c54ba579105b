"""A real secured 3-node Engram cluster for the tests, started from the built binaries
(``$ENGRAM_BIN_DIR``, default ``target/debug`` of the repository): mTLS between nodes, TLS and
API keys for clients, on loopback ports of its own."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import time
import urllib.request
from typing import Iterator, Optional

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]
BIN = pathlib.Path(os.environ.get("ENGRAM_BIN_DIR", REPO / "target" / "debug"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Node:
    def __init__(self, cluster: "Cluster", id: int) -> None:
        self.id = id
        self.api = f"127.0.0.1:{free_port()}"
        self.raft = f"127.0.0.1:{free_port()}"
        self.http = f"127.0.0.1:{free_port()}"
        self.dir = cluster.dir / f"n{id}"
        self.cluster = cluster
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> None:
        certs = self.cluster.certs
        log = open(self.cluster.dir / f"n{self.id}.log", "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "engram"), "--node-id", str(self.id), "--data-dir", str(self.dir),
             "--tls-ca-file", str(certs / "ca.pem"), "--tls-cert-file", str(certs / f"node-{self.id}.pem"),
             "--tls-key-file", str(certs / f"node-{self.id}-key.pem"),
             "--listen-api", self.api, "--listen-raft", self.raft, "--listen-http", self.http,
             "--heartbeat-interval-ms", "50", "--election-timeout-min-ms", "300", "--election-timeout-max-ms", "600"],
            stdout=log, stderr=subprocess.STDOUT)
        wait_http(f"http://{self.http}/healthz")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} never answered")
        time.sleep(0.1)


class Cluster:
    def __init__(self, dir: pathlib.Path, n: int = 3) -> None:
        self.dir = dir
        self.certs = dir / "certs"
        self.ctl("certs", "init", "--dir", str(self.certs), "--cluster", "pytest", key=None)
        for i in range(1, n + 1):
            self.ctl("certs", "node", "--dir", str(self.certs), "--id", str(i), "--host", "127.0.0.1", key=None)
        self.nodes = [Node(self, i) for i in range(1, n + 1)]
        for node in self.nodes:
            node.start()
        self.root_key = dir / "root.key"
        members = [a for node in self.nodes for a in ("--member", f"{node.id}={node.raft},{node.api}")]
        self.ctl("--endpoints", self.nodes[0].api, "cluster", "init", "--root-key-file", str(self.root_key), *members,
                 key=None)
        wait_http(f"http://{self.nodes[0].http}/readyz")
        self._keys = 0

    @property
    def ca(self) -> str:
        return str(self.certs / "ca.pem")

    @property
    def endpoints(self) -> list[str]:
        return [n.api for n in self.nodes]

    def ctl(self, *args: str, key: Optional[pathlib.Path] = None) -> str:
        env = dict(os.environ, ENGRAM_ENDPOINTS=",".join(n.api for n in getattr(self, "nodes", [])))
        if hasattr(self, "nodes"):
            env["ENGRAM_CA_FILE"] = self.ca
        if key is not None:
            env["ENGRAM_API_KEY_FILE"] = str(key)
        out = subprocess.run([str(BIN / "engramctl"), *args], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"engramctl {' '.join(args)}: {out.stderr}")
        return out.stdout

    def tenant_key(self, pattern: str, perms: str = "read,write,delete") -> str:
        """A new key whose role may `perms` on namespaces matching `pattern`."""
        self._keys += 1
        role, path = f"role-{self._keys}", self.dir / f"tenant-{self._keys}.key"
        self.ctl("auth", "role", "create", role, key=self.root_key)
        self.ctl("auth", "role", "grant", role, "--namespace", pattern, "--perm", perms, key=self.root_key)
        self.ctl("auth", "key", "create", "--name", f"tenant-{self._keys}", "--role", role, "--out", str(path),
                 key=self.root_key)
        return path.read_text().strip()

    def node(self, id: int) -> Node:
        return next(n for n in self.nodes if n.id == id)

    def stop(self) -> None:
        for n in self.nodes:
            n.kill()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not (BIN / "engram").exists():
        pytest.fail(f"no engram binary in {BIN}: build it (cargo build --bins) or set ENGRAM_BIN_DIR")
    c = Cluster(tmp_path_factory.mktemp("engram"))
    yield c
    c.stop()


@pytest.fixture(scope="session")
def root_key(cluster: Cluster) -> str:
    return cluster.root_key.read_text().strip()
