"""``mii.serve``: start a persistent deployment in the background and return a client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from mii.config import EngineConfig
from mii.rpc import registry
from mii.rpc.client import MiiClient
from mii.rpc.deployment import DeploymentError
from mii.rpc.replica import STARTUP_ERROR


def deployment_config(
    model_name_or_path: str,
    deployment_name: str | None = None,
    tensor_parallel: int = 1,
    replica_num: int = 1,
    enable_restful_api: bool = False,
    restful_api_port: int = 28080,
    port: int = 50050,
    host: str = "127.0.0.1",
    max_length: int | None = None,
    startup_timeout: float = 600.0,
    device_map: list[int] | None = None,
    tp_master_addr: str = "127.0.0.1",
    **engine_options: Any,
) -> dict[str, Any]:
    """The validated configuration of a deployment, as ``mii.rpc.deployment`` runs it.

    Shared by ``mii.serve`` (background) and ``mii serve`` (foreground). Bad
    options, and a name that a running deployment already has, fail here, before
    anything starts.
    """
    if tensor_parallel < 1:
        raise ValueError("tensor_parallel must be at least 1")
    if replica_num < 1:
        raise ValueError("replica_num must be at least 1")
    if device_map is not None:
        if len(device_map) < tensor_parallel * replica_num:
            raise ValueError(
                f"device_map lists {len(device_map)} GPUs; tensor_parallel={tensor_parallel} x "
                f"replica_num={replica_num} needs {tensor_parallel * replica_num}"
            )
        if len(set(device_map)) != len(device_map) or min(device_map) < 0:
            raise ValueError("device_map must list distinct GPU indices (0, 1, ...)")
    if max_length is not None:
        engine_options["max_length"] = max_length
    EngineConfig.parse(model_name_or_path, **engine_options)  # bad options fail here, at once
    name = deployment_name or f"{model_name_or_path}-mii-deployment"
    if registry.lookup(name) is not None:
        raise DeploymentError(f"a deployment named {name!r} is already running")
    return {
        "deployment_name": name,
        "model": model_name_or_path,
        "engine_options": engine_options,
        "host": host,
        "port": port,
        "replica_num": replica_num,
        "tensor_parallel": tensor_parallel,
        "device_map": device_map,
        "tp_master_addr": tp_master_addr,
        "enable_restful_api": enable_restful_api,
        "restful_api_port": restful_api_port,
        "startup_timeout": startup_timeout,
    }


def serve(
    model_name_or_path: str,
    deployment_name: str | None = None,
    tensor_parallel: int = 1,
    replica_num: int = 1,
    enable_restful_api: bool = False,
    restful_api_port: int = 28080,
    port: int = 50050,
    host: str = "127.0.0.1",
    max_length: int | None = None,
    startup_timeout: float = 600.0,
    device_map: list[int] | None = None,
    tp_master_addr: str = "127.0.0.1",
    **engine_options: Any,
) -> MiiClient:
    """Start a deployment (background processes that outlive this one) and return
    a client once every replica is healthy.

    A start-up failure (bad model, port in use, crash while loading) raises
    ``DeploymentError`` here with the server's error, and leaves no process behind.
    """
    config = deployment_config(
        model_name_or_path,
        deployment_name=deployment_name,
        tensor_parallel=tensor_parallel,
        replica_num=replica_num,
        enable_restful_api=enable_restful_api,
        restful_api_port=restful_api_port,
        port=port,
        host=host,
        max_length=max_length,
        startup_timeout=startup_timeout,
        device_map=device_map,
        tp_master_addr=tp_master_addr,
        **engine_options,
    )
    name = config["deployment_name"]
    log_file = registry.log_path(name)
    with open(log_file, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mii.rpc.deployment", json.dumps(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # the deployment outlives this process
        )
    # Reap the deployment process when it ends, so that it leaves no zombie.
    threading.Thread(target=process.wait, name=f"mii-reap-{name}", daemon=True).start()
    client = MiiClient(f"{host}:{port}", name)
    deadline = time.monotonic() + startup_timeout + 30
    while True:
        if process.poll() is not None:
            raise DeploymentError(_failure_message(log_file, process.returncode))
        if registry.lookup(name) is not None and client.is_healthy(timeout=1.0):
            return client
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise DeploymentError(f"deployment {name!r} did not start within {startup_timeout} s")
        time.sleep(0.1)


def _failure_message(log_file, code: int) -> str:
    text = log_file.read_text(errors="replace")
    for line in reversed(text.splitlines()):
        if line.startswith(STARTUP_ERROR):
            return line[len(STARTUP_ERROR) :].strip()
    return f"the deployment exited with code {code}:\n" + "\n".join(text.splitlines()[-20:])
