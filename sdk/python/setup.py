"""Builds the gRPC stubs from the repository's proto/ into engram/v1 (never committed).

The protos are found at $ENGRAM_PROTO_DIR, else ../../proto next to this file (pip builds a
local directory in place, so `pip install ./sdk/python` from the repository finds them).
"""

import os
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent


def proto_dir() -> pathlib.Path:
    d = pathlib.Path(os.environ.get("ENGRAM_PROTO_DIR", HERE / ".." / ".." / "proto")).resolve()
    if not (d / "engram" / "v1" / "memory.proto").is_file():
        raise SystemExit(f"engram protos not found in {d}: set ENGRAM_PROTO_DIR")
    return d


def generate(out: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    src = proto_dir()
    protos = sorted(str(p.relative_to(src)) for p in (src / "engram" / "v1").glob("*.proto"))
    # raft.proto is the peer-only service: clients never speak it.
    protos = [p for p in protos if not p.endswith("raft.proto")]
    wkt = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    (out / "engram" / "v1").mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{src}",
        f"-I{wkt}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / "engram" / "v1" / "__init__.py").write_text('"""Generated from proto/engram/v1."""\n')


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate(pathlib.Path(self.build_lib))
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
