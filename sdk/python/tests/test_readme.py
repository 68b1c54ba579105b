"""The README's lines for agent developers, run as written against the test cluster."""

from __future__ import annotations

import os
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[3] / "README.md"


def test_the_readme_python_lines_run(cluster, capsys, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- readme-test: python -->\s*```python\n(.*?)```", text, re.S)
    assert block, "the README lost its tested Python block"
    key = cluster.tenant_key("acme/*")
    key_file = cluster.dir / "readme.key"
    key_file.write_text(key)
    monkeypatch.setenv("ENGRAM_ENDPOINTS", ",".join(cluster.endpoints))
    monkeypatch.setenv("ENGRAM_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("ENGRAM_CA_FILE", cluster.ca)
    exec(compile(block.group(1), str(README), "exec"), {})
    out = capsys.readouterr().out
    assert "The user prefers green tea" in out, out
    assert os.environ["ENGRAM_ENDPOINTS"]
