"""Streaming from AsyncEngine inside your own asyncio program.

python examples/async_stream.py [MODEL]
"""

import asyncio
import sys

import mii
from mii.demo import demo_model_path


async def main(model: str) -> None:
    # The constructor loads the model and blocks: off the event loop, so that the
    # rest of a program (a server, other tasks) keeps running meanwhile.
    async with await asyncio.to_thread(mii.AsyncEngine, model) as engine:
        async for piece in engine.stream("DeepSpeed is", max_new_tokens=48, seed=0):
            print(piece.generated_text, end="", flush=True)
        print()
        # Many requests at once are batched continuously by the engine.
        answers = await engine.generate(["Seattle is", "The quick brown fox"], max_new_tokens=16)
        print([a.generated_text for a in answers])


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else str(demo_model_path())))
