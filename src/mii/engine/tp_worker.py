"""A rank > 0 of a deployment's tensor-parallel replica.

Started by the replica (rank 0) as ``python -m mii.engine.tp_worker CONFIG_JSON``
with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. It loads
its shard and runs the passes rank 0 sends until rank 0 stops the engine; it
exits when rank 0 goes away, and after recording its error if it fails.
"""

from __future__ import annotations

import json
import logging
import sys

from mii.config import EngineConfig
from mii.engine import distributed
from mii.engine.core import EngineCore


def main(argv: list[str] | None = None) -> int:
    config = json.loads((argv or sys.argv[1:])[0])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    options = {**config["engine_options"], "tensor_parallel": config["tensor_parallel"]}
    core = EngineCore(EngineConfig.parse(config["model"], **options))
    try:
        while core.serve_worker() is not None:
            pass  # the end of a pipeline call: deployments send none, keep serving
    except Exception:
        return 1  # recorded for rank 0 by serve_worker; the group is left
    core.release()
    distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
