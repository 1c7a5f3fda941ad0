"""A persistent deployment: the load balancer (and REST gateway) in this process,
and one replica process per engine copy.

``python -m mii.rpc.deployment CONFIG_JSON`` (a ``DeploymentConfig``) runs it;
``mii.serve`` starts that in the background, ``mii serve`` in the foreground.
Start-up order: bind the front port (fails fast when it is taken), start the
replicas, wait until every one is healthy, start the REST gateway, then report
SERVING and record the deployment in the local registry. Any failure on the way stops everything
started so far and exits with the cause on stderr. Once serving, a supervisor restarts
replicas that exit (:mod:`mii.rpc.supervisor`), and a signal or Terminate drains the
deployment before it stops (:mod:`mii.rpc.drain`).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mii.envs as envs
from mii.errors import DeploymentError
from mii.rpc import auth, mii_pb2, quiet_grpc_logs, registry
from mii.rpc.balancer import BalancerServicer
from mii.rpc.deployment_config import (
    GRPC_PORT_IN_USE_HINT,
    DeploymentConfig,
    GpuLayout,
    ReplicaConfig,
)
from mii.rpc.deployment_tokenizer import tokenizer_source
from mii.rpc.drain import ShutdownRequest, drain, stop_signals
from mii.rpc.fd_limit import raise_open_files_limit
from mii.rpc.free_port import free_port
from mii.rpc.health import add_standard_services, set_health
from mii.rpc.lasting_output import outlast_readers
from mii.rpc.listen import host_port, listening_server
from mii.rpc.pool import HEALTH_INTERVAL_S, ReplicaPool
from mii.rpc.proto_parse import add_mii_servicer
from mii.rpc.startup_errors import (
    StoppedWhileStarting,
    read_startup_error,
    run_reporting_errors,
)
from mii.rpc.stats_log import capacity_line, log_stats
from mii.rpc.supervisor import RestartPolicy, Supervisor


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def _device_map(layout: GpuLayout | Mapping[str, Any], gpus: int) -> list[int] | None:
    """The GPUs of the deployment, replica after replica (None without GPUs).
    ``layout``: the deployment's configuration, or just its layout fields."""
    layout = GpuLayout.model_validate(layout)
    need = layout.gpus_needed
    if not gpus and layout.device_map is not None:
        # named GPUs that are not there: a broken CUDA setup must not quietly serve
        # on the CPU
        raise DeploymentError(
            f"device_map names GPUs {list(layout.device_map)}, but no GPU is "
            "present (torch.cuda.device_count() is 0); leave device_map out to serve "
            "on the CPU"
        )
    if not gpus:
        return None  # CPU: every rank of every replica runs on the CPU
    if layout.device_map is None:
        if need > gpus:
            raise DeploymentError(
                f"tensor_parallel={layout.tensor_parallel} x replica_num="
                f"{layout.replica_num} needs {need} GPUs; {gpus} found"
            )
        return list(range(need))
    missing = [d for d in layout.device_map[:need] if d >= gpus]
    if missing:
        raise DeploymentError(f"device_map names GPUs {missing}, but only {gpus} are present")
    return list(layout.device_map[:need])


class ReplicaProcess:
    """One replica: ``python -m mii.rpc.replica REPLICA_CONFIG_JSON``, logging to
    ``log_file``; its port accepts only calls that present ``token``."""

    def __init__(
        self, index: int, config: ReplicaConfig, log_file: Path, token: str, append: bool = False
    ) -> None:
        self.token = token
        self.index = index
        self.config = config
        self.address = config.address
        self.log_file = log_file
        env = dict(os.environ)
        quiet_grpc_logs(env)
        # Secrets in the environment, never on the command line (see mii.envs).
        env[envs.REPLICA_TOKEN.name] = token
        env.pop(envs.API_KEY.name, None)  # a replica never needs the clients' key
        if config.gpus:  # the replica's GPUs; its ranks use them in order
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, config.gpus))
        # A restart appends to the log: what the previous process wrote shows why it ended.
        with open(log_file, "ab" if append else "wb") as log:
            self.log_offset = log.tell()  # where this process's part begins
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mii.rpc.replica", config.model_dump_json()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        """None while it runs (an exited process is reaped here)."""
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def restarted(self) -> ReplicaProcess:
        """A new process of this replica: same GPUs, same log (appended), on a fresh
        port. Not its old one: another local process may have bound that while this
        one was down, and every restart would then fail on it and use up the
        replica's restart budget (the pool follows the move: Replica.move_to)."""
        update = {**_fresh_ports(self.config.deployment), "start": self.config.start + 1}
        fresh = self.config.model_copy(update=update)
        return ReplicaProcess(self.index, fresh, self.log_file, self.token, append=True)

    def failure(self) -> str | None:
        """The replica's start-up error, if it has exited."""
        if self.process.poll() is None:
            return None
        return read_startup_error(
            self.log_file, f"replica {self.index}", self.process.returncode, self.log_offset
        )

    def stop(self, timeout: float = 10.0) -> None:
        stop_all([self], timeout)


def stop_all(replicas: list[ReplicaProcess], timeout: float = 10.0) -> None:
    """SIGTERM to every replica at once, then SIGKILL to those still running
    ``timeout`` s later (one after another, each waited for in turn, took up to
    ``timeout`` per replica)."""
    running = [r.process for r in replicas if r.process.poll() is None]
    for process in running:
        process.terminate()
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def run_deployment(config: DeploymentConfig, shutdown: ShutdownRequest | None = None) -> None:
    """Run the deployment until ``shutdown`` is requested (by default: SIGTERM,
    SIGINT or a Terminate call), then drain it and stop every process. Its name is
    claimed first (registry.claim): a second deployment of the name fails here."""
    with registry.holding(config.deployment_name):
        await _run_deployment(config, shutdown)


async def _run_deployment(config: DeploymentConfig, shutdown: ShutdownRequest | None) -> None:
    name, host, port = config.deployment_name, config.host, config.port
    raise_open_files_limit()  # idle HTTP clients must not take every descriptor of 1,024
    shutdown = shutdown or ShutdownRequest()
    stop = shutdown.stop
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        loop.add_signal_handler(sig, shutdown.request)

    # A busy port fails here, naming it. With an api_key, every call needs it.
    # Requests are at most max_request_bytes.
    server = listening_server(
        host_port(host, port),
        auth.api_key_interceptors(config.secret_api_key()),
        max_receive_bytes=config.max_request_bytes,
        in_use_hint=GRPC_PORT_IN_USE_HINT,
    )
    token = auth.new_token()  # what the replicas' ports require, new at every start
    rest_socket = starting_answers = None
    if config.enable_restful_api:  # a busy REST port too, before any model loads
        from mii.rpc.http.server import bind_socket
        from mii.rpc.http.starting import answer_while_starting

        rest_socket = bind_socket(host, config.restful_api_port)
        starting_answers = await answer_while_starting(rest_socket)  # 503 "starting"
    health = add_standard_services(server)
    await set_health(health, False)  # (SERVING once the replicas have loaded the model)
    # Calls are answered from now on (UNAVAILABLE "starting" until the replicas are
    # ready; Terminate stops the start): a bound port that never answered made a
    # client wait for its whole deadline.
    balancer = BalancerServicer(name, stop, has_api_key=config.secret_api_key() is not None)
    add_mii_servicer(balancer, server)

    replicas: list[ReplicaProcess] = []
    pool: ReplicaPool | None = None
    rest = None
    tasks: list[asyncio.Task] = []

    # what loads its tokenizer and chat template (mii generate --chat)
    source = tokenizer_source(config.model, config.engine_options, config.chat_template)

    def record(starting: bool = False) -> None:  # again after each restart: new replica pids
        registry.record(
            name,
            {
                "host": host,
                "port": port,
                "pid": os.getpid(),
                "model": config.model,
                "served_model_name": config.served_model_name,
                "replica_num": config.replica_num,
                "restful_api_port": config.restful_api_port if rest_socket else None,
                "tokenizer_source": source,
                "replica_pids": [r.process.pid for r in replicas],
                # the record is readable only by this user (mode 0600 in a 0700 folder)
                "api_key": config.secret_api_key(),
                # loading: mii list shows it, and mii terminate stops it (with SIGTERM)
                **({"starting": True} if starting else {}),
            },
        )

    try:
        await server.start()  # (in here: stopped by the finally below)
        record(starting=True)  # (again below, with its replicas' pids)
        for i, replica_config in enumerate(_replica_configs(config)):
            log = registry.log_path(name).with_suffix(f".replica{i}.log")
            replicas.append(ReplicaProcess(i, replica_config, log, token))
        record(starting=True)
        pool = ReplicaPool([r.address for r in replicas], token=token)
        pool.guard.progress_timeout_s = config.replica_timeout_s
        await _wait_for_replicas(pool, replicas, config.startup_timeout, stop)

        info = mii_pb2.ModelInfoReply(
            deployment_name=name,
            model=config.model,
            max_length=(
                await pool.replicas[0].stub.ModelInfo(mii_pb2.ModelInfoRequest())
            ).max_length,
            replicas=config.replica_num,
        )
        balancer.ready(pool, info)
        tasks.append(asyncio.create_task(pool.watch()))

        if config.enable_restful_api:
            from mii.rpc.http.server import start_gateway
            from mii.rpc.http.starting import stop_answering

            await stop_answering(starting_answers)
            rest = await start_gateway(pool, info, config, sock=rest_socket)

        await set_health(health, True)
        health_watcher = asyncio.create_task(_follow_replica_health(pool, health))
        tasks.append(health_watcher)

        supervisor = Supervisor(
            pool, replicas, lambda i: replicas[i].restarted(), _restart_policy(config), record
        )
        record()
        print(
            f"[mii] deployment {name!r} serving on {host_port(host, port)}",
            file=sys.stderr,
            flush=True,
        )
        print(capacity_line(pool.stats(), config.replica_num), file=sys.stderr, flush=True)
        ports = [port, config.restful_api_port] if rest else [port]
        auth.warn_if_open_to_network(host, ports, config.secret_api_key())
        if config.stats_log_interval_s > 0:
            tasks.append(asyncio.create_task(log_stats(pool, config.stats_log_interval_s)))
        try:
            await supervisor.run_until(stop)
        except DeploymentError as err:  # nothing left to serve: stop, and exit 1
            raise DeploymentError(
                f"deployment {name!r} stopped: {err}; see the replica logs in "
                f"{registry.registry_dir()}"
            ) from err
        registry.mark_stopping(name, os.getpid())
        # Draining: no restarts, NOT_SERVING, new requests refused, then in-flight ones end.
        health_watcher.cancel()
        await set_health(health, False)
        await drain(pool, config.shutdown_grace_s, shutdown.hurry)
    finally:
        for task in tasks:
            task.cancel()
        await set_health(health, False)
        registry.mark_stopping(name, os.getpid())
        if starting_answers is not None:  # (closed already once the gateway took over)
            from mii.rpc.http.starting import stop_answering

            await stop_answering(starting_answers)
        if rest is not None:
            await rest.stop()
        elif rest_socket is not None:  # bound, but the gateway never started
            rest_socket.close()
        await server.stop(grace=1.0)
        if pool is not None:
            await pool.terminate_all()
            await pool.close()
        stop_all(replicas)
        registry.remove(name, pid=os.getpid())  # its processes are gone; its claim goes next


def _restart_policy(config: DeploymentConfig) -> RestartPolicy:
    return RestartPolicy(
        max_restarts=config.replica_max_restarts,
        window_s=config.replica_restart_window_s,
        backoff_s=config.replica_restart_backoff_s,
        unresponsive_restart_s=config.replica_unresponsive_restart_s,
    )


def _replica_configs(config: DeploymentConfig) -> list[ReplicaConfig]:
    """Each replica's part: a free port, its GPUs, and its ranks' rendezvous port."""
    tp = config.tensor_parallel
    device_map = _device_map(config, _gpu_count())
    return [
        ReplicaConfig(
            deployment=config,
            gpus=device_map[i * tp : (i + 1) * tp] if device_map else None,
            index=i,
            parent_pid=os.getpid(),
            **_fresh_ports(config),
        )
        for i in range(config.replica_num)
    ]


def _fresh_ports(config: DeploymentConfig) -> dict[str, int | None]:
    """A replica's ports, free now: its gRPC port and its ranks' rendezvous port."""
    tp = config.tensor_parallel
    return {"port": free_port(), "tp_master_port": free_port() if tp > 1 else None}


async def _follow_replica_health(pool: ReplicaPool, health) -> None:
    """SERVING while at least one replica is; NOT_SERVING when none is (e.g. a
    tensor-parallel rank of the only replica failed)."""
    serving = True
    while True:
        await asyncio.sleep(HEALTH_INTERVAL_S)
        now = any(r.healthy for r in pool.replicas)
        if now != serving:
            serving = now
            await set_health(health, now)


async def _wait_for_replicas(
    pool: ReplicaPool, replicas: list[ReplicaProcess], timeout: float, stop: asyncio.Event
) -> None:
    """Return once every replica is healthy; DeploymentError when one fails to start,
    when they take longer than ``timeout``, or when the deployment is told to stop
    meanwhile (a signal, mii terminate: it waited for every model to load first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop.is_set():
            raise StoppedWhileStarting(
                "stopped while starting (a signal or mii terminate); its replicas were "
                "still loading the model"
            )
        for replica in replicas:
            failure = replica.failure()
            if failure:
                raise DeploymentError(failure)
        if await pool.check_all() == len(replicas):
            return
        await asyncio.sleep(0.2)
    raise DeploymentError(
        f"replicas were not ready within {timeout:g} s: a large model may need longer "
        "(startup_timeout=; mii serve: --startup-timeout SECONDS)"
    )


def main(argv: list[str] | None = None) -> int:
    outlast_readers()  # (its log file, or whatever mii.serve's caller gave it)
    # The API key is not in this JSON (it would be visible in ps): DeploymentConfig
    # reads it from MII_API_KEY, which mii.serve sets in this process's environment.
    config_json = (argv or sys.argv[1:])[0]
    return run_reporting_errors(run_deployment(DeploymentConfig.model_validate_json(config_json)))


if __name__ == "__main__":
    sys.exit(main())
