"""``mii.serve``: start a persistent deployment in the background and return a client."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import mii.envs as envs
from mii.errors import DeploymentError
from mii.rpc import quiet_grpc_logs, registry
from mii.rpc.client import MiiClient
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.listen import host_port
from mii.rpc.startup_errors import read_startup_error


def serve(model_name_or_path: str, **options: Any) -> MiiClient:
    """Start a deployment (background processes that outlive this one) and return
    a client once every replica is healthy.

    ``options`` are the fields of :class:`~mii.rpc.deployment_config.DeploymentConfig`
    (``deployment_name=None, tensor_parallel=1, replica_num=1,
    enable_restful_api=False, restful_api_port=28080, port=50050,
    host="127.0.0.1", startup_timeout=600.0, device_map=None, api_key=None,
    allowed_hosts=None, allowed_origins=None, max_request_bytes=8 MiB,
    http_header_timeout=10.0, http_keep_alive_timeout=100.0,
    http_max_connections=4096``; the OpenAI API: ``served_model_name=None`` (a name or a
    list), ``chat_template=None`` (a file path or the template),
    ``tool_call_parser=None`` ("hermes" or "llama3_json": tool_choice "auto"); the log's throughput
    line: ``stats_log_interval_s=10``; supervision and shutdown: ``replica_timeout_s=30,
    replica_max_restarts=5, replica_restart_window_s=600, replica_restart_backoff_s=1,
    replica_unresponsive_restart_s=120, shutdown_grace_s=30``; on a Ray cluster
    (docs/multi_node.md): ``backend=None`` ("local" or "ray"), ``ray_address=None``,
    ``min_replicas=None, max_replicas=None, target_ongoing_requests=2,
    upscale_delay_s=30, downscale_delay_s=600, ray_num_cpus=1, ray_num_gpus=None``,
    ...) and engine
    options (``max_length=None``, ...). Bad options fail here, before anything
    starts. A start-up failure (bad model, port in use, crash while loading)
    raises ``DeploymentError`` here with the server's error, and leaves no
    process behind.
    """
    config = DeploymentConfig.parse(model_name_or_path, **options)
    warn_unused_options(config)
    module = "mii.rpc.deployment"
    if config.on_ray:  # replicas on a Ray cluster (docs/multi_node.md)
        from mii.ray_backend import caller_cluster, require_ray
        from mii.ray_backend.application import check_scaling

        require_ray()  # without Ray: an error that says how to install it, here
        check_scaling(config)
        module = "mii.ray_backend.deployment"
        if config.ray_address is None and caller_cluster() is not None:
            # A caller connected to Ray (ray.init) deploys on that cluster.
            config = config.model_copy(update={"ray_address": caller_cluster()})
    name = config.deployment_name
    log_file = registry.log_path(name)
    # The API key goes in the environment: the JSON on the command line (which every
    # local user can read with ps) leaves it out.
    env = dict(os.environ)
    quiet_grpc_logs(env)
    api_key = config.secret_api_key()
    if api_key is None:
        env.pop(envs.API_KEY.name, None)
    else:
        env[envs.API_KEY.name] = api_key
    client, process = None, None
    try:
        # Ctrl-C is held while the process starts: one landing between its fork and
        # the assignment would leave it running with nobody to stop it. Delivered
        # after, it is handled below like any other.
        with _sigint_held(), open(log_file, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module, config.model_dump_json()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # the deployment outlives this process
            )
        # Reap the deployment process when it ends, so that it leaves no zombie.
        threading.Thread(target=process.wait, name=f"mii-reap-{name}", daemon=True).start()
        client = MiiClient(host_port(config.host, config.port), name, api_key=api_key)
        return _wait_until_serving(process, client, config, log_file)
    except BaseException:
        # Whatever ends the wait (a failure, Ctrl-C, a notebook's interrupt) leaves
        # nothing running: a deployment nobody got a client for holds its ports,
        # its name and, loading, its GPUs.
        if client is not None:
            client.close()
        if process is not None:
            _stop_group(process)
        raise


def warn_unused_options(config: DeploymentConfig) -> None:
    """Warn of options given that change nothing: ``restful_api_port`` without
    ``enable_restful_api=True`` starts no HTTP server (DeepSpeed-MII's habit too)."""
    if "restful_api_port" in config.model_fields_set and not config.enable_restful_api:
        warnings.warn(
            f"restful_api_port={config.restful_api_port} starts no HTTP server without "
            "enable_restful_api=True",
            UserWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold Ctrl-C back for the block and deliver it after (main thread only: elsewhere
    it is not ours). A handler that notes it, not a blocked signal mask: a process
    started meanwhile inherits the mask across exec, and a deployment that mii.serve
    started ignored SIGINT (kill -INT, a process manager's stop signal)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if noted:
            signal.raise_signal(signal.SIGINT)  # to the handler it had (KeyboardInterrupt)


def _wait_until_serving(
    process: subprocess.Popen, client: MiiClient, config: DeploymentConfig, log_file
) -> MiiClient:
    name = config.deployment_name
    # Past its own startup_timeout the deployment stops what it started and exits with
    # its reason; on Ray that takes Serve's graceful shutdown too (shutdown_grace_s, even
    # for replicas that never ran): the caller waited less, and said only "did not start".
    teardown = 30 + (config.shutdown_grace_s if config.on_ray else 0)
    deadline = time.monotonic() + config.startup_timeout + teardown
    while True:
        if process.poll() is not None:
            raise DeploymentError(
                read_startup_error(log_file, "the deployment", process.returncode)
            )
        if registry.lookup(name) is not None and client.is_healthy(timeout=1.0):
            return client
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"deployment {name!r} did not start within {config.startup_timeout} s"
            )
        time.sleep(0.1)


# Seconds a deployment that did not start gets to stop on SIGTERM (its replicas, a
# Ray application's removal) before its process group is killed.
STOP_GRACE_S = 10.0


def _stop_group(process: subprocess.Popen) -> None:
    """Stop the deployment process and its replicas (its process group): SIGTERM,
    then SIGKILL after STOP_GRACE_S (or at once on a second interrupt); reap it."""
    try:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_GRACE_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # what is left of the group
        process.wait()
