"""Host time per step of the scheduler and block manager, prefix caching on vs off.

    python -m benchmarks.scheduler_host [--repeat 10] [--json out.json]

No model and no device: W1's requests (256, input U[128, 1024], 128 out) and the
shared-prefix workload (256 x 2,000-token prefix + unique 100) run through
``Scheduler.schedule`` / ``commit`` / ``finish`` with fake sampled tokens, at the
CUDA engine defaults (4,096 tokens, 256 sequences per pass, 16-token blocks, a
pool that holds every sequence). What caching adds to a step is registering the
blocks a pass fills, looking prefixes up at admission, the in-flight-prefix check,
and (in ``finish``) hashing and registering a finished sequence's generated blocks
and keeping its blocks cached; this measures exactly that part of the host's work
per step (the engine's other host work per step, building the pass and processing
outputs, is not in it).

Times are the thread's CPU time (``time.thread_time``: a busy neighbour on a shared
machine does not count), runs alternate off/on, and each figure is the best of
``--repeat`` runs; ``*_median_ratio`` is the median of the runs' on/off ratios.
Reported per setting:

- ``step_us``: µs per step of ``schedule`` + ``commit`` + ``finish`` (the issue 17
  target: with caching on, < 5 % above off);
- ``schedule_commit_us``: the same without ``finish`` (what this benchmark timed
  before ``finish`` took on the hashing of generated blocks);
- ``intake_us_per_request``: hashing one prompt's blocks at intake
  (``BlockManager.hash_prompt``, run by ``RequestIntake`` in the caller, off the
  engine's step but CPU time all the same; 0 with caching off);
- ``all_us_per_step``: ``step_us`` plus the intake hashing spread over the steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import random
import statistics
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
clock = time.thread_time


def run(prompts: list[list[int]], caching: bool) -> dict:
    params = GenerateParams.parse(max_new_tokens=OUT, ignore_eos=True, do_sample=False)
    pool = sum(blocks_for(len(p) + OUT, BLOCK) for p in prompts)
    blocks = BlockManager(pool, BLOCK, prefix_caching=caching, cache_salt=b"benchmark")
    sched = Scheduler(blocks, 4096, 256)
    # what RequestIntake.make_sequence does (absent before intake hashing: 0 then)
    hash_prompt = getattr(blocks, "hash_prompt", None) if caching else None
    intake = 0.0
    for i, prompt in enumerate(prompts):
        seq = Sequence(f"r{i}", list(prompt), params, OUT, 0)
        if hash_prompt is not None:
            start = clock()
            hash_prompt(seq)
            intake += clock() - start
        sched.add(seq)
    rng = random.Random(0)
    steps, planned, finished = 0, 0.0, 0.0
    while sched.has_work():
        start = clock()
        out = sched.schedule()
        sampled = sched.commit(out)
        planned += clock() - start
        done = []
        for seq in sampled:  # the engine's output processing, not timed
            seq.token_ids.append(rng.randrange(100, 31000))
            if seq.num_generated >= seq.max_new_tokens:
                done.append(seq)
        start = clock()
        for seq in done:
            sched.finish(seq, "length")
        finished += clock() - start
        steps += 1
    return {
        "steps": steps,
        "step_us": round(1e6 * (planned + finished) / steps, 1),
        "schedule_commit_us": round(1e6 * planned / steps, 1),
        "intake_us_per_request": round(1e6 * intake / len(prompts), 1),
        "all_us_per_step": round(1e6 * (planned + finished + intake) / steps, 1),
        "hit_tokens": sched.blocks.hit_tokens,
    }


TIMES = ("step_us", "schedule_commit_us", "intake_us_per_request", "all_us_per_step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=10, help="runs per setting (best of)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"benchmark": "scheduler_host", **environment()}
    for name, prompts in (("w1", workload(256, 128, 1024)), ("shared", shared_prompts())):
        runs: dict[bool, list[dict]] = {False: [], True: []}
        for _ in range(args.repeat):  # alternating: a noisy neighbour hits both settings
            for caching in (False, True):
                runs[caching].append(run(prompts, caching))
        for caching in (False, True):
            best = {**runs[caching][0], **{k: min(r[k] for r in runs[caching]) for k in TIMES}}
            result[f"{name}_{'on' if caching else 'off'}"] = best
            print(name, "caching" if caching else "no caching", best, flush=True)
        for key in ("step_us", "schedule_commit_us", "all_us_per_step"):
            on, off = result[f"{name}_on"][key], result[f"{name}_off"][key]
            median = statistics.median(
                a[key] / b[key] for a, b in zip(runs[True], runs[False], strict=True)
            )
            result[f"{name}_{key}_ratio"] = round(on / off, 3)
            result[f"{name}_{key}_median_ratio"] = round(median, 3)
            print(f"{name} {key} on / off: best {on / off:.3f}, median {median:.3f}", flush=True)
    write_json(args.json, result)


if __name__ == "__main__":
    main()
