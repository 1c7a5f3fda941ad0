"""Regenerate the gRPC stubs from ``mii.proto``: ``python -m mii.rpc.codegen``.

The stubs are committed (so that users need no protoc); a test regenerates them
into a temporary folder and fails when the committed ones are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2]  # the folder that holds the `mii` package
PROTO = "mii/rpc/mii.proto"


def generate(out_dir: Path) -> list[Path]:
    """Write mii_pb2.py, mii_pb2.pyi and mii_pb2_grpc.py under ``out_dir/mii/rpc``."""
    from grpc_tools import protoc

    (out_dir / "mii" / "rpc").mkdir(parents=True, exist_ok=True)
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{SRC}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            PROTO,
        ]
    )
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return sorted((out_dir / "mii" / "rpc").glob("mii_pb2*"))


if __name__ == "__main__":
    for path in generate(SRC):
        print(path)
    sys.exit(0)
