"""Host time per step of the scheduler and block manager, prefix caching on vs off.

    python -m benchmarks.scheduler_host [--repeat 5] [--json out.json]

No model and no device: W1's requests (256, input U[128, 1024], 128 out) and the
shared-prefix workload (256 x 2,000-token prefix + unique 100) run through
``Scheduler.schedule`` / ``commit`` / ``finish`` with fake sampled tokens, at the
CUDA engine defaults (4,096 tokens, 256 sequences per pass, 16-token blocks, a
pool that holds every sequence). What caching adds to a step is registering the
blocks a pass fills (hashing generated ones), looking prefixes up at admission,
the in-flight-prefix check and keeping released blocks cached; this measures
exactly that part of the host's work per step (the engine's other host work per
step, building the pass and processing outputs, is not in it).

Reported per setting (best of ``--repeat`` runs):

- ``step_us``: host µs per step of ``schedule`` + ``commit`` + ``finish`` (the
  issue 17 target: with caching on, < 5 % above off);
- ``intake_us_per_request``: µs per request of hashing its prompt's blocks at
  intake (``BlockManager.hash_prompt``, run by ``RequestIntake`` in the caller,
  off the engine's step, but CPU time all the same; 0 with caching off);
- ``all_us_per_step``: both together, the intake hashing spread over the steps.
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
    blocks = BlockManager(pool, BLOCK, prefix_caching=caching, cache_salt=b"benchmark")
    sched = Scheduler(blocks, 4096, 256)
    intake = 0.0
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"r{i}", list(prompt), params, OUT, 0)
        start = time.perf_counter()
        blocks.hash_prompt(seq)  # what RequestIntake.make_sequence does
        intake += time.perf_counter() - start
        sched.add(seq)
    rng = random.Random(0)
    steps, host = 0, 0.0
    while sched.has_work():
        start = time.perf_counter()
        out = sched.schedule()
        sampled = sched.commit(out)
        host += time.perf_counter() - start
        done = []
        for seq in sampled:  # the engine's output processing, not timed
            seq.token_ids.append(rng.randrange(100, 31000))
            if seq.num_generated >= seq.max_new_tokens:
                done.append(seq)
        start = time.perf_counter()
        for seq in done:
            sched.finish(seq, "length")
        host += time.perf_counter() - start
        steps += 1
    return {
        "steps": steps,
        "step_us": round(1e6 * host / steps, 1),
        "intake_us_per_request": round(1e6 * intake / len(prompts), 1),
        "all_us_per_step": round(1e6 * (host + intake) / steps, 1),
        "hit_tokens": sched.blocks.hit_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5, help="best of N runs per setting")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"benchmark": "scheduler_host", **environment()}
    for name, prompts in (("w1", workload(256, 128, 1024)), ("shared", shared_prompts())):
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeat):  # interleaved: a noisy neighbour hits both settings
            for caching in (False, True):
                runs[caching].append(run(prompts, caching))
        for caching in (False, True):
            best = {
                key: min(r[key] for r in runs[caching]) if key.endswith("_us") else value
                for key, value in runs[caching][0].items()
            }
            best["intake_us_per_request"] = min(r["intake_us_per_request"] for r in runs[caching])
            best["all_us_per_step"] = min(r["all_us_per_step"] for r in runs[caching])
            result[f"{name}_{'on' if caching else 'off'}"] = best
            print(name, "caching" if caching else "no caching", best, flush=True)
        on, off = result[f"{name}_on"], result[f"{name}_off"]
        for key in ("step_us", "all_us_per_step"):
            ratio = round(on[key] / off[key], 3)
            result[f"{name}_{key}_ratio"] = ratio
            print(name, key, "on / off:", ratio, flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
