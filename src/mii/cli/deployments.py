"""``mii list`` and ``mii terminate``: the running deployments on this machine."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mii.cli.errors import CliError, no_deployment_at


def add_list_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "list",
        help="list the running deployments on this machine",
        description="List running deployments: name, gRPC address, model, replicas, "
        "health (as the deployment reports it: ok, unavailable, draining, or unreachable; "
        "starting while its replicas load the model; stopping once it was told to stop; "
        "with the replicas serving), load (requests running and waiting, KV cache usage), "
        "HTTP URL, and each replica's state (starting, serving, unresponsive, restarting, "
        "failed), pid and restarts.",
    )
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.set_defaults(func=list_deployments)


def add_terminate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "terminate",
        help="stop a running deployment",
        description="Stop every process of a running deployment and wait until they are gone.",
    )
    parser.add_argument("name", help="deployment name (see mii list), model name, or host:port")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for its processes to exit (default: 60)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="kill its processes (SIGKILL, from its record on this machine) without asking it "
        "to drain; without --force a deployment that does not answer gets SIGTERM",
    )
    parser.add_argument(
        "--ignore-not-found",
        action="store_true",
        help="succeed (exit 0) when no deployment has that name, e.g. one already stopped "
        "(for stop hooks that may run twice, as kubectl's flag of the name)",
    )
    add_api_key_option(parser)
    parser.set_defaults(func=terminate)


def add_api_key_option(parser: argparse.ArgumentParser) -> None:
    """``--api-key`` of the commands that talk to a running deployment."""
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="the deployment's API key (default: the one in its record on this machine, "
        "else MII_API_KEY)",
    )


HEALTH_TIMEOUT_S = 3.0  # per deployment: a frozen replica costs its probe's 1 s


def deployment_health(record: dict[str, Any]) -> dict[str, Any]:
    """What the deployment itself says of its health (its Stats reply): ``status``
    (ok, unavailable, draining; unreachable when it does not answer; starting while
    its replicas load, stopping once it was told to stop, from its record) and each
    replica's state, restarts and pid."""
    import grpc

    from mii.rpc import auth, mii_pb2, mii_pb2_grpc
    from mii.rpc.listen import host_port
    from mii.rpc.replica_health import health_from_stats

    if record.get("stopping"):  # draining, or its processes exiting (the record says so)
        return {"status": "stopping"}
    if record.get("starting"):  # its replicas load the model; nothing answers yet
        return {"status": "starting"}
    try:
        with auth.channel(
            host_port(record["host"], record["port"]), record.get("api_key")
        ) as channel:
            reply = mii_pb2_grpc.MiiStub(channel).Stats(
                mii_pb2.StatsRequest(), timeout=HEALTH_TIMEOUT_S
            )
    except grpc.RpcError as err:
        return {"status": "unreachable", "error": f"{err.code().name}: {err.details()}"}
    return health_from_stats(reply)


def _status_cell(health: dict[str, Any]) -> str:
    """``ok 1/2`` (replicas serving / replicas), or the status alone."""
    replicas = health.get("replicas") or []
    if not replicas:
        return health["status"]
    serving = sum(r["state"] == "serving" for r in replicas)
    return f"{health['status']} {serving}/{len(replicas)}"


def _load_cell(health: dict[str, Any]) -> str:
    """``2 running, 0 waiting, KV 12%``, or ``-`` when the deployment did not answer."""
    if "running" not in health:
        return "-"
    return (
        f"{health['running']} running, {health['waiting']} waiting, "
        f"KV {100 * health['kv_cache_usage']:.0f}%"
    )


def _replicas_cell(deployment: dict[str, Any]) -> str:
    """The replicas it reports (a Ray deployment autoscaled past ``replica_num``),
    else the number it was started with."""
    reported = deployment["health"].get("replicas")
    return str(len(reported) if reported else deployment.get("replica_num", "?"))


def _replica_line(replica: dict[str, Any]) -> str:
    restarts = replica["restarts"]
    return (
        f"  replica {replica['index']}: {replica['state']} (pid {replica['pid'] or '-'}, "
        f"{restarts} restart{'' if restarts == 1 else 's'}, {replica['address']})"
    )


def list_deployments(args: argparse.Namespace) -> int:
    from mii.rpc import registry
    from mii.rpc.listen import host_port

    # The records hold the API keys (the health query presents it); a listing says
    # only whether there is one.
    deployments = [
        {
            **{k: v for k, v in d.items() if k != "api_key"},
            "api_key": bool(d.get("api_key")),
            "health": deployment_health(d),
        }
        for d in registry.list_deployments(include_starting=True)
    ]
    if args.json:
        print(json.dumps(deployments, indent=2))
        return 0
    if not deployments:
        print("no running deployments (start one with: mii serve MODEL)")
        return 0
    rows = [("NAME", "ADDRESS", "MODEL", "REPLICAS", "HEALTH", "LOAD", "HTTP")]
    for d in deployments:
        rest = (
            f"http://{host_port(d['host'], d['restful_api_port'])}"
            if d.get("restful_api_port")
            else "-"
        )
        rows.append(
            (
                d["deployment_name"],
                host_port(d["host"], d["port"]),
                str(d.get("model", "?")),
                _replicas_cell(d),
                _status_cell(d["health"]),
                _load_cell(d["health"]),
                rest,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        if i:  # each replica of the deployment, under its row
            for replica in deployments[i - 1]["health"].get("replicas", []):
                print(_replica_line(replica))
    return 0


def terminate(args: argparse.Namespace) -> int:
    from mii.cli import stop_processes
    from mii.errors import AmbiguousDeploymentError, DeploymentUnresponsiveError
    from mii.rpc import registry
    from mii.rpc.client import DeploymentNotFoundError, client

    starting = _starting_record(args.name)
    if starting is not None:  # SIGTERM stops it at once (works even while a load holds the GIL)
        if args.force:
            return stop_processes.kill(starting["deployment_name"], starting)
        return stop_processes.stop_starting(starting, args.timeout)
    try:
        target = client(args.name, api_key=args.api_key)
    except AmbiguousDeploymentError as err:  # --ignore-not-found does not help
        raise CliError(f"{err} (see: mii list)") from None
    except DeploymentNotFoundError as err:
        if args.ignore_not_found:
            print(f"no running deployment named {args.name!r}: nothing to stop")
            return 0
        raise CliError(f"{err} (see: mii list; --ignore-not-found: exit 0 then)") from None
    name = target.deployment_name or target.address
    info = registry.lookup(target.deployment_name) if target.deployment_name else None
    try:
        if args.force:
            return stop_processes.kill(name, info)
        # (with --ignore-not-found, Terminate itself tells whether anything answers: a
        # deployment that answers NOT_SERVING, its replicas restarting, is not healthy
        # but is there to stop)
        unanswered = target.deployment_name is None and not args.ignore_not_found
        if unanswered and not target.is_healthy(timeout=5.0):
            raise no_deployment_at(target, args.name)
        try:
            target.terminate_server(timeout=args.timeout)
        except DeploymentNotFoundError:  # nothing answers at the address
            if not args.ignore_not_found:
                raise
            print(f"no mii deployment answers at {args.name}: nothing to stop")
            return 0
        except DeploymentUnresponsiveError as err:
            return stop_processes.signal_unresponsive(name, info, err, args.timeout)
        except TimeoutError as err:
            raise CliError(
                f"{err}: it may still be finishing the requests in flight (for up to its "
                "shutdown_grace_s, 30 s by default); wait, give a larger --timeout, or "
                "--force to kill its processes now"
            ) from None
    finally:
        target.close()
    print(f"terminated {name}")
    return 0


def _starting_record(name: str) -> dict[str, Any] | None:
    """The record of the deployment ``name`` names if it is still starting."""
    from mii.errors import AmbiguousDeploymentError
    from mii.rpc import registry

    try:
        info = registry.find(name, include_starting=True)
    except AmbiguousDeploymentError:  # client() says so
        return None
    return info if info is not None and info.get("starting") else None


def _seconds(text: str) -> float:
    """A --timeout value: refused (argparse's usage error) unless a positive number,
    before the deployment is asked to stop."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
