"""Host time per engine step, prefix caching on vs off (issue 17: "host time per
step grows by less than 5 %").

    python -m benchmarks.engine_host [--num-requests 256] [--repeat 3] [--json out.json]

``benchmarks/scheduler_host.py`` times the scheduler and block manager alone; this
times everything the host does in a step of the engine (``EngineCore.step``):
scheduling, describing the pass and building its input tensors, committing,
reading tokens back, output processing, incremental detokenization and stop
checks, ending requests. Only the model's arithmetic is taken out: the forward,
the LM head and the sampler are timed separately and subtracted, so the figure
does not depend on how fast a device would run them.

The engine runs on the CPU with a model of W1's vocabulary and tokenizer (32,000
tokens, so detokenizing costs what it does with the real one) but two tiny
layers, random weights, W1's requests (256, input U[128, 1024], 128 out, greedy,
``ignore_eos``) and the CUDA scheduling defaults (4,096 tokens, 256 sequences per
pass), torch on one thread, Python's garbage collector paused while stepping
(see ``run``). Settings alternate, in an order that flips every repeat; reported:
the best of each and the median of the on/off ratios of the repeats' pairs.
Times are the thread's CPU time (``time.thread_time``:
a busy neighbour on a shared machine does not count).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

import mii.engine.core as core_module
from benchmarks.common import LLAMA2_7B, environment, model_dir, write_json
from benchmarks.throughput import workload
from mii.config import EngineConfig, GenerateParams
from mii.engine.core import EngineCore

clock = time.thread_time
TINY_LAYERS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def tiny_w1_model() -> str:
    """W1's tokenizer and vocabulary around two tiny layers (weights: dummy)."""
    tokenizer_dir = Path(model_dir("llama2-7b", full_vocab=True))
    path = tokenizer_dir.with_name(tokenizer_dir.name + "-tiny-layers")
    if not (path / "config.json").is_file():
        path.mkdir(parents=True, exist_ok=True)
        for file in tokenizer_dir.iterdir():
            if file.name != "config.json":
                (path / file.name).write_bytes(file.read_bytes())
        config = LLAMA2_7B | TINY_LAYERS | {"torch_dtype": "float32"}
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


class ArithmeticTimer:
    """Thread CPU time spent in the model's forward, its LM head and the sampler."""

    def __init__(self, core: EngineCore) -> None:
        self.seconds = 0.0
        runner = core.runner
        runner.forward = self.timed(runner.forward)
        runner.model.compute_logits = self.timed(runner.model.compute_logits)
        self._sampler = core_module.sample_next_tokens
        core_module.sample_next_tokens = self.timed(self._sampler)

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += clock() - start

        return wrapper

    def restore(self) -> None:
        core_module.sample_next_tokens = self._sampler


def run(path: str, prompts: list[list[int]], caching: bool) -> dict:
    config = EngineConfig.parse(
        path,
        load_format="dummy",
        dtype="float32",
        device="cpu",
        token_budget=4096,
        max_num_seqs=256,
        enable_prefix_caching=caching,
    )
    core = EngineCore(config)
    timer = ArithmeticTimer(core)
    try:
        params = GenerateParams.parse(max_new_tokens=128, ignore_eos=True, do_sample=False)
        for i, prompt in enumerate(prompts):
            core.add(core.make_sequence(f"r{i}", prompt, params))
        steps, total = 0, 0.0
        # Python's cyclic garbage collector is off while stepping: its full collections
        # start when allocation counts cross thresholds, and whether one falls inside
        # a run depends on how many long-lived objects exist (the prefix cache's table
        # adds some, which postponed the 0.2-0.5 s collection the runs without caching
        # took: 1-3 ms per step of noise either way).
        gc.collect()
        gc.disable()
        while core.has_work():
            start = clock()
            core.step()
            total += clock() - start
            steps += 1
    finally:
        gc.enable()
        timer.restore()
        core.release()
    host = total - timer.seconds
    return {
        "steps": steps,
        "host_us_per_step": round(host / steps * 1e6, 1),
        "arithmetic_us_per_step": round(timer.seconds / steps * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=6, help="runs per setting (best of)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    # One thread: torch's worker threads would spin between ops, and what a spinning
    # pool costs this thread depends on the machine's load, not on the engine.
    torch.set_num_threads(1)
    path = tiny_w1_model()
    prompts = workload(args.num_requests, 128, 1024)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for repeat in range(args.repeat):
        # The order flips every repeat: a process's later runs drift slower (its heap
        # grows), which would otherwise always count against the second setting.
        for caching in (False, True) if repeat % 2 == 0 else (True, False):
            runs[caching].append(run(path, prompts, caching))
            print(caching, runs[caching][-1], flush=True)
    best = {c: min(r, key=lambda x: x["host_us_per_step"]) for c, r in runs.items()}
    ratios = [
        on["host_us_per_step"] / off["host_us_per_step"] for off, on in zip(runs[False], runs[True])
    ]
    result = {
        "benchmark": "engine_host",
        **environment(),
        "workload": {"requests": args.num_requests, "input": [128, 1024], "output": 128},
        "caching_off": best[False],
        "caching_on": best[True],
        "on_over_off": round(best[True]["host_us_per_step"] / best[False]["host_us_per_step"], 3),
        "median_ratio": round(statistics.median(ratios), 3),
    }
    write_json(args.json, result)


if __name__ == "__main__":
    main()
