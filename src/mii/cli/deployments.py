"""``mii list`` and ``mii terminate``: the running deployments on this machine."""

from __future__ import annotations

import argparse
import json

from mii.cli.errors import CliError


def add_list_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "list",
        help="list the running deployments on this machine",
        description="List running deployments: name, gRPC address, model, replicas, REST URL.",
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
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for its processes to exit (default: 60)",
    )
    parser.set_defaults(func=terminate)


def list_deployments(args: argparse.Namespace) -> int:
    from mii.rpc import registry

    # The records hold the API keys; a listing says only whether there is one.
    deployments = [
        {**{k: v for k, v in d.items() if k != "api_key"}, "api_key": bool(d.get("api_key"))}
        for d in registry.list_deployments()
    ]
    if args.json:
        print(json.dumps(deployments, indent=2))
        return 0
    if not deployments:
        print("no running deployments (start one with: mii serve MODEL)")
        return 0
    rows = [("NAME", "ADDRESS", "MODEL", "REPLICAS", "REST")]
    for d in deployments:
        rest = f"http://{d['host']}:{d['restful_api_port']}" if d.get("restful_api_port") else "-"
        rows.append(
            (
                d["deployment_name"],
                f"{d['host']}:{d['port']}",
                str(d.get("model", "?")),
                str(d.get("replica_num", "?")),
                rest,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def terminate(args: argparse.Namespace) -> int:
    from mii.rpc.client import DeploymentNotFoundError, client

    try:
        target = client(args.name)
    except DeploymentNotFoundError:
        raise CliError(f"no running deployment named {args.name!r} (see: mii list)") from None
    if target.deployment_name is None and not target.is_healthy(timeout=5.0):
        raise CliError(f"no mii deployment answers at {args.name}")
    try:
        target.terminate_server(timeout=args.timeout)
    except TimeoutError as err:
        raise CliError(str(err)) from None
    finally:
        target.close()
    print(f"terminated {target.deployment_name or target.address}")
    return 0
