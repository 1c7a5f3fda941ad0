"""A rank > 0 of a deployment's tensor-parallel replica.

Started by the replica (rank 0) as ``python -m mii.engine.tp_worker CONFIG_JSON``
(the replica's ``EngineConfig``) with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
and MASTER_PORT set. It loads its shard and runs the passes rank 0 sends until
rank 0 stops the engine; it exits when rank 0 goes away, and after recording
its error if it fails. It ignores SIGINT and SIGTERM (its replica drains first).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from mii.config import EngineConfig
from mii.engine.core import EngineCore


def exit_with_parent(interval: float = 1.0) -> None:
    """Exit when the replica (rank 0) that started this rank is gone, even if this
    rank is stuck in a collective that will never finish."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="mii-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    config = EngineConfig.model_validate_json((argv or sys.argv[1:])[0])
    # Ctrl-C or a stop that signals every process of the deployment reaches the ranks
    # too: rank 0 stops them once its replica has drained (or they follow it out).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (a closed terminal's, likewise)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(message)s")
    core = EngineCore(config)
    try:
        core.serve_until_stopped()
    except Exception:
        return 1  # recorded for rank 0 by serve_worker; the group is left
    return 0


if __name__ == "__main__":
    sys.exit(main())
