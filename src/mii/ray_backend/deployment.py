"""A deployment on a Ray cluster: this process connects to Ray, runs the Serve
application (engines and HTTP ingress, :mod:`mii.ray_backend.application`), serves
the deployment's gRPC front on its host and port, and records the deployment in
the local registry, so that ``mii.client(name)`` finds it as any other.

``python -m mii.ray_backend.deployment CONFIG_JSON`` runs it (``mii.serve`` starts
that in the background, ``mii serve`` runs it in the foreground). On Terminate or
a signal it drains the gRPC front and (through the board) the HTTP ingress, then
deletes the Serve application (Serve's graceful, rolling shutdown of the replicas),
shuts Serve down when no other application is left on the cluster, and disconnects
(stopping the Ray instance it started, if any).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import traceback
from typing import Any

from mii.errors import DeploymentError
from mii.ray_backend import require_ray
from mii.ray_backend.application import REPLICA_DEPLOYMENT, build_application, gpus_per_rank
from mii.ray_backend.board import NAMESPACE, StatsBoard, board_name
from mii.ray_backend.cluster_watch import gcs_address, gone_with_the_stop, until_cluster_lost
from mii.ray_backend.connect import connect
from mii.ray_backend.fit import warn_if_no_node_fits
from mii.ray_backend.http_drain import drain_http
from mii.ray_backend.pool import RayPool
from mii.ray_backend.serve_errors import prefix_taken, root_holder, serve_refusal, start_failure
from mii.ray_backend.serve_ownership import mark_started_by_mii, started_by_mii
from mii.ray_backend.startup import in_daemon_thread, outcome, threads_settled, unless_stopped
from mii.rpc import auth, mii_pb2, registry
from mii.rpc.balancer import BalancerServicer
from mii.rpc.deployment_config import GRPC_PORT_IN_USE_HINT, DeploymentConfig
from mii.rpc.deployment_tokenizer import tokenizer_source
from mii.rpc.drain import ShutdownRequest, drain
from mii.rpc.health import add_standard_services, set_health
from mii.rpc.listen import host_port, listening_server
from mii.rpc.proto_parse import add_mii_servicer
from mii.rpc.startup_errors import StoppedWhileStarting, run_reporting_errors
from mii.rpc.stats_log import capacity_line, log_stats

SUBMIT_WAIT_S = 60.0  # a stop while starting: Serve's start and serve.run's hand-over
RUN_END_WAIT_S = 5.0  # serve.run's poll sees its application deleted (every 1 s)


def start_serve(config: DeploymentConfig) -> bool:
    """Start Ray Serve (its HTTP proxy on host:restful_api_port) unless it runs
    already; True when this call started it (only then does the deployment's end
    shut it down: a platform's own Serve, or one a killed deployment left, is not
    this deployment's to stop)."""
    from ray import serve

    try:
        status = serve.status()
    except Exception:  # Serve is not running
        status = None
    running = status is not None and _serve_client() is not None
    applications = status.applications if status else {}
    if config.deployment_name in applications:  # serve.run would replace it
        raise DeploymentError(
            f"a Serve application named {config.deployment_name!r} already runs on the Ray "
            "cluster: choose another deployment_name"
        )
    if applications:
        # A second HTTP API is refused before serve.run, naming the application
        # holding the proxy's root (serve.run's refusal printed ~60 lines of the
        # controller's traceback first); one beside a Serve whose proxy is off or on
        # another host:port is refused too: it announced a port where nothing listened.
        if config.enable_restful_api:
            holder = root_holder()
            if holder is not None:
                raise DeploymentError(prefix_taken(app=holder, prefix="/"))
            _left_over_serve(config, status)
        return False
    joined = config.enable_restful_api and _left_over_serve(config, status)
    if config.enable_restful_api and not joined and _head_is_here():
        # Serve's proxy retries a taken port forever: fail now, naming it.
        from mii.rpc.http.server import bind_socket

        bind_socket(config.host, config.restful_api_port).close()
    # Serve's proxy keeps idle connections as long as the local gateway would
    # (http_keep_alive_timeout: longer than clients keep them; its own default, 90 s,
    # equals Go's net/http expiry, the race that option avoids).
    http = {
        "host": config.host,
        "port": config.restful_api_port,
        "keep_alive_timeout_s": config.http_keep_alive_timeout,
    }
    options = dict(
        http_options=http, proxy_location="HeadOnly" if config.enable_restful_api else "Disabled"
    )
    try:
        serve.start(**options)
    except TimeoutError as err:
        # Serve waits a fixed 60 s for its HTTP proxy; a loaded head took longer (2
        # cores beside 3 busy processes). Its controller keeps starting the proxy:
        # connect to it again and wait out the deployment's own startup_timeout.
        if "proxies not available" not in str(err):
            raise
        serve.start(**options)
        _wait_for_proxies(time.monotonic() + config.startup_timeout)
    if not running:
        mark_started_by_mii()
    return not running


def _serve_client() -> Any:
    """Serve's client when its controller runs on the cluster, else None."""
    from ray.serve.context import _get_global_client

    try:  # (a private API of Serve's: if it moves, Serve counts as not running)
        return _get_global_client(raise_if_no_controller_running=False)
    except Exception:
        return None


def _left_over_serve(config: DeploymentConfig, status: Any) -> bool:
    """Whether a Serve with no application runs already, serving HTTP where ``config``
    asks; DeploymentError when off or elsewhere (Serve keeps its first HTTP options)."""
    client = _serve_client()
    try:  # (a private API of Serve's: if it moves, Serve's own warning remains)
        http = None if client is None or not status.proxies else client.http_config
    except Exception:
        return False
    asked = (config.host, config.restful_api_port)
    if client is not None and (http is None or (http.host, http.port) != asked):
        where = f"on {http.host}:{http.port}" if http else "off"
        raise DeploymentError(
            f"Ray Serve already runs on this cluster with its HTTP proxy {where}, not on "
            f"{config.host}:{config.restful_api_port} (Serve keeps what it started with): "
            + (f"serve there (mii serve --host {http.host} --port {http.port}) or " if http else "")
            + (
                "start this one without it (enable_restful_api=False; mii serve "
                "--no-enable-restful-api): applications run on it"
                if status is not None and status.applications
                else "stop Serve first (serve shutdown)"
            )
        )
    return client is not None


def _wait_for_proxies(deadline: float) -> None:
    """Until every Serve HTTP proxy is healthy; DeploymentError past ``deadline``."""
    from ray import serve

    while True:
        states = {str(getattr(s, "value", s)) for s in serve.status().proxies.values()}
        if states and states <= {"HEALTHY"}:
            return
        if time.monotonic() >= deadline:
            raise DeploymentError(
                f"Ray Serve's HTTP proxy was not ready within the startup timeout "
                f"(states: {sorted(states) or 'none'}; is the head node overloaded?)"
            )
        time.sleep(1.0)


def _head_is_here() -> bool:
    """Whether the cluster's head node (where Serve's HTTP proxy runs) is this machine."""
    import ray

    here = ray.util.get_node_ip_address()
    return any(
        node["Alive"]
        and "node:__internal_head__" in node["Resources"]
        and node["NodeManagerAddress"] == here
        for node in ray.nodes()
    )


def stop_serve(app: str, started_serve: bool) -> None:
    """Delete the application (graceful shutdown of its replicas); shut Serve down
    too when mii started it (this deployment or one that ended before) and no other
    application is left."""
    from ray import serve

    try:
        serve.delete(app)
        if not serve.status().applications and (started_serve or started_by_mii()):
            serve.shutdown()
    except Exception as err:  # the cluster is gone: nothing left to stop
        print(f"[mii] stopping the Serve application failed: {err}", file=sys.stderr, flush=True)


async def run_ray_deployment(
    config: DeploymentConfig, shutdown: ShutdownRequest | None = None
) -> None:
    """Run the deployment until ``shutdown`` is requested (by default: SIGTERM,
    SIGINT or a Terminate call), then drain it and remove everything it started.
    Its name is claimed first (registry.claim), as a local deployment's."""
    with registry.holding(config.deployment_name):
        await _run_ray_deployment(config, shutdown)


async def _run_ray_deployment(config: DeploymentConfig, shutdown: ShutdownRequest | None) -> None:
    name, host, port = config.deployment_name, config.host, config.port
    ray = require_ray()
    from ray import serve

    shutdown = shutdown or ShutdownRequest()
    stop = shutdown.stop
    api_key = config.secret_api_key()
    # A busy gRPC port fails here, before anything starts on the cluster.
    server = listening_server(
        host_port(host, port),
        auth.api_key_interceptors(api_key),
        max_receive_bytes=config.max_request_bytes,
        in_use_hint=GRPC_PORT_IN_USE_HINT,
    )
    health = add_standard_services(server)
    await set_health(health, False)
    # Calls are answered UNAVAILABLE "starting" until Serve's replicas are ready.
    balancer = BalancerServicer(name, stop, has_api_key=config.secret_api_key() is not None)
    add_mii_servicer(balancer, server)

    connect(config)
    # After ray.init, which installs a SIGTERM handler of its own (exit at once).
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.request)
    started_serve = False
    serving: asyncio.Future[bool] | None = None  # start_serve, in a thread
    board = None
    pool: RayPool | None = None
    deployed = False
    run: asyncio.Future | None = None  # serve.run, in a thread
    cluster_lost = False  # then no Ray call is made: each would wait for the cluster
    asked = False  # whether the cluster was checked after a stop (_stopped_with_its_cluster)
    tasks: list[asyncio.Task] = []
    try:
        await server.start()  # (in here: stopped by the finally below)
        # Starting: mii list shows it, mii.client(name) says so, mii terminate stops it.
        registry.record(name, {**_record(config, api_key), "starting": True})
        # In a thread (it may wait for Serve's proxies): the gRPC port answers meanwhile.
        serving = in_daemon_thread(start_serve, config)
        started_serve = await unless_stopped(asyncio.shield(serving), stop, None)
        board = (
            ray.remote(StatsBoard)
            .options(name=board_name(name), namespace=NAMESPACE, num_cpus=0)
            .remote()
        )
        cluster_gpus = ray.cluster_resources().get("GPU", 0.0)
        warn_if_no_node_fits(config, gpus_per_rank(config, cluster_gpus))
        app = build_application(config, board_name(name), api_key, cluster_gpus)
        deployed = True
        run = in_daemon_thread(
            serve.run, app, name=name, route_prefix="/" if config.enable_restful_api else None
        )
        try:  # (shielded: the finally waits for the thread's progress)
            await unless_stopped(asyncio.shield(run), stop, config.startup_timeout)
        except asyncio.TimeoutError:
            raise DeploymentError(
                f"the Ray deployment {name!r} was not ready within {config.startup_timeout:.0f} s "
                "(are there enough free CPUs/GPUs on the cluster? see `ray status`)"
            ) from None
        except StoppedWhileStarting:
            raise
        except RuntimeError as err:  # Serve's "Deploying application ... failed"
            raise DeploymentError(start_failure(name) or str(err)) from None
        except Exception as err:  # Serve's controller refused it (RayServeException)
            traceback.print_exc()  # the whole of it, into the deployment's log
            raise DeploymentError(serve_refusal(err)) from None
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=name)
        pool = RayPool(handle, board_name(name))
        pool.guard.progress_timeout_s = config.replica_timeout_s
        await unless_stopped(_wait_for_board(pool, config.startup_timeout), stop, None)
        max_length = (await handle.model_info.remote())["max_length"]
        info = mii_pb2.ModelInfoReply(
            deployment_name=name,
            model=config.model,
            max_length=max_length,
            replicas=len(pool.replicas),
        )
        balancer.ready(pool, info)
        tasks.append(asyncio.create_task(pool.watch()))
        await set_health(health, True)
        registry.record(name, _record(config, api_key))
        print(
            f"[mii] deployment {name!r} serving on {host_port(host, port)} (Ray Serve)",
            file=sys.stderr,
            flush=True,
        )
        # The same load lines as a local deployment's (the board's figures; replicas
        # Serve adds later count from their first post).
        print(capacity_line(pool.stats(), len(pool.replicas)), file=sys.stderr, flush=True)
        if config.stats_log_interval_s > 0:
            tasks.append(asyncio.create_task(log_stats(pool, config.stats_log_interval_s)))
        ports = [port, config.restful_api_port] if config.enable_restful_api else [port]
        auth.warn_if_open_to_network(host, ports, api_key)
        lost = await _until_stopped_or_cluster_lost(stop)
        if lost is not None:
            cluster_lost = True
            raise DeploymentError(
                f"the Ray cluster of deployment {name!r} is gone ({lost}): the deployment "
                "stops; start it again once the cluster runs"
            )
        asked = True
        cluster_lost = await _stopped_with_its_cluster(name)
        if cluster_lost:
            return
        registry.mark_stopping(name, os.getpid())
        await set_health(health, False)
        await _drain_both_fronts(pool, board, config, shutdown.hurry)
    finally:
        for task in tasks:
            task.cancel()
        await set_health(health, False)
        registry.mark_stopping(name, os.getpid())
        await server.stop(grace=1.0)
        if pool is not None:
            await pool.close()
        if not (cluster_lost or asked):  # stopped (or failed) while starting
            cluster_lost = await _stopped_with_its_cluster(name)
        if not cluster_lost:
            started_serve = await threads_settled(name, serving, run, SUBMIT_WAIT_S)
            await _remove_from_cluster(name, deployed, started_serve, board, run)
        registry.remove(name, pid=os.getpid())  # all of it is gone; its claim goes next


async def _stopped_with_its_cluster(name: str) -> bool:
    """Whether the cluster stopped with the deployment (``gone_with_the_stop``: its
    Ray processes got the same signal); then says so, and no Ray call is made."""
    gone = await gone_with_the_stop(gcs_address())
    if gone is not None:
        print(
            f"[mii] the Ray cluster of deployment {name!r} stopped with it ({gone}): "
            "nothing is left to drain or delete there",
            file=sys.stderr,
            flush=True,
        )
    return gone is not None


async def _remove_from_cluster(
    name: str, deployed: bool, started_serve: bool, board: Any, run: asyncio.Future | None
) -> None:
    """Delete the Serve application (and Serve, when this deployment started it) and
    the stats board, then disconnect from the cluster (once a serve.run still waiting
    has seen its application gone: it used Ray's worker after ray.shutdown)."""
    ray = require_ray()
    from ray import serve

    if deployed:
        await asyncio.to_thread(stop_serve, name, started_serve)
    elif started_serve:
        await asyncio.to_thread(serve.shutdown)
    if board is not None:
        ray.kill(board)
    await outcome(run, RUN_END_WAIT_S)
    ray.shutdown()  # stops the Ray instance too when this process started it


async def _until_stopped_or_cluster_lost(stop: asyncio.Event) -> str | None:
    """Wait for ``stop``; or return why the cluster is taken for gone, first."""
    address = gcs_address()
    if address is None:  # (a Ray that does not say: only stop ends the wait)
        await stop.wait()
        return None
    stopping = asyncio.create_task(stop.wait())
    watching = asyncio.create_task(until_cluster_lost(address))
    try:
        await asyncio.wait({stopping, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        watching.cancel()
    return None if stop.is_set() else watching.result()


async def _drain_both_fronts(
    pool: RayPool, board: Any, config: DeploymentConfig, hurry: asyncio.Event
) -> None:
    """The gRPC front here and the HTTP ingress on the cluster drain side by side,
    within the one grace period; the application is deleted once both are done."""
    grpc = drain(pool, config.shutdown_grace_s, hurry)
    if not config.enable_restful_api:  # the ingress has no route: nothing to drain
        await grpc
        return
    http = drain_http(board, config.shutdown_grace_s, hurry)
    outcomes = await asyncio.gather(grpc, http, return_exceptions=True)
    for front, ended in zip(("gRPC front", "HTTP ingress"), outcomes):
        if isinstance(ended, BaseException):
            why = f"its drain failed: {type(ended).__name__}: {ended}"
        elif front == "HTTP ingress" and ended is not True:
            why = "it did not report its drain within the grace period (gone?)"
        else:
            continue
        print(
            f"[mii] the {front}: {why}; deleting the application anyway",
            file=sys.stderr,
            flush=True,
        )


def _record(config: DeploymentConfig, api_key: str | None) -> dict[str, Any]:
    return {
        "host": config.host,
        "port": config.port,
        "pid": os.getpid(),
        "model": config.model,
        "served_model_name": config.served_model_name,
        "replica_num": config.replica_num,
        "restful_api_port": config.restful_api_port if config.enable_restful_api else None,
        "backend": "ray",
        # mii generate NAME --chat
        "tokenizer_source": tokenizer_source(
            config.model, config.engine_options, config.chat_template
        ),
        # the record is readable only by this user (mode 0600 in a 0700 folder)
        "api_key": api_key,
    }


async def _wait_for_board(pool: RayPool, timeout: float) -> None:
    """Until a replica has posted its figures (Serve reports RUNNING a moment earlier)."""
    deadline = time.monotonic() + timeout
    while await pool.check_all() == 0:
        if time.monotonic() > deadline:
            raise DeploymentError("no replica reported within startup_timeout")
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    # The API key is not in this JSON (ps shows it): it is read from MII_API_KEY.
    config_json = (argv or sys.argv[1:])[0]
    return run_reporting_errors(
        run_ray_deployment(DeploymentConfig.model_validate_json(config_json))
    )


if __name__ == "__main__":
    sys.exit(main())
