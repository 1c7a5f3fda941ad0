"""Host time per step of the scheduler and block manager, prefix caching on vs off.

    python benchmarks/scheduler_host.py [--json out.json]

No model and no device: W1's requests (256, input U[128, 1024], 128 out) and the
shared-prefix workload (256 x 2,000-token prefix + unique 100) run through
``Scheduler.schedule`` / ``commit`` with fake sampled tokens, at the CUDA engine
defaults (4,096 tokens, 256 sequences per pass, 16-token blocks, a pool that holds
every sequence). What caching adds to a step is hashing the blocks a pass fills,
looking prefixes up at admission and the in-flight-prefix check; this measures
exactly that part of the host's work per step (the engine's other host work per
step, building the pass and processing outputs, is not in it).
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.common import environment, write_json
from benchmarks.prefix_cache import shared_prompts
from benchmarks.throughput import workload
from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager, blocks_for
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence

OUT = 128
BLOCK = 16


def run(prompts: list[list[int]], caching: bool) -> dict:
    params = GenerateParams.parse(max_new_tokens=OUT, ignore_eos=True, do_sample=False)
    pool = sum(blocks_for(len(p) + OUT, BLOCK) for p in prompts)
    sched = Scheduler(BlockManager(pool, BLOCK, prefix_caching=caching), 4096, 256)
    for i, prompt in enumerate(prompts):
        sched.add(Sequence(f"r{i}", list(prompt), params, OUT, 0))
    rng = random.Random(0)
    steps, host = 0, 0.0
    while sched.has_work():
        start = time.perf_counter()
        out = sched.schedule()
        sampled = sched.commit(out)
        host += time.perf_counter() - start
        for seq in sampled:  # the engine's output processing, not timed
            seq.token_ids.append(rng.randrange(100, 31000))
            if seq.num_generated >= seq.max_new_tokens:
                sched.finish(seq, "length")
        steps += 1
    return {
        "steps": steps,
        "host_us_per_step": round(1e6 * host / steps, 1),
        "hit_tokens": sched.blocks.hit_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per setting")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"benchmark": "scheduler_host", **environment()}
    for name, prompts in (("w1", workload(256, 128, 1024)), ("shared", shared_prompts())):
        for caching in (False, True):
            runs = [run(prompts, caching) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["host_us_per_step"])
            result[f"{name}_{'on' if caching else 'off'}"] = best
            print(name, "caching" if caching else "no caching", best, flush=True)
        on, off = result[f"{name}_on"], result[f"{name}_off"]
        result[f"{name}_host_ratio"] = round(on["host_us_per_step"] / off["host_us_per_step"], 3)
        print(name, "host time per step, on / off:", result[f"{name}_host_ratio"], flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
