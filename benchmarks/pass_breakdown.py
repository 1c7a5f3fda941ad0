"""Where W1's time goes, pass by pass: a diagnostic, not a benchmark.

Runs the W1 workload (or a smaller one) through the engine and times every
forward pass on the device with CUDA events, then groups the passes by kind
(decode-only, mixed) and size, and compares the device time with the wall time
(the difference is time the GPU waited for the host). A torch.profiler window
over a few mixed and a few decode passes lists the top kernels of each.

    python benchmarks/pass_breakdown.py [--num-requests 256] [--input-range 128 1024]
        [--output-len 128] [--token-budget B] [--max-num-seqs S]   # default: the engine's
        [--records passes.json]   # every pass: kind, tokens, sequences, device ms
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a file (python benchmarks/NAME.py) as the docs show: the repository root
# on the path for the benchmarks package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import asyncio
import gc
import json
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import mii
from benchmarks.common import SHAPES, add_engine_arguments, engine_options, model_dir
from benchmarks.throughput import workload


class PassRecorder:
    """Wraps ``EngineCore._launch``: a pair of CUDA events and the plan's shape per pass."""

    def __init__(self, core, profile_at: dict[str, int], profile_len: int) -> None:
        self.core = core
        self.records: list[tuple[str, int, int, torch.cuda.Event, torch.cuda.Event]] = []
        self.profile_at = profile_at  # kind -> the index (within that kind) to start at
        self.profile_len = profile_len
        self.seen: dict[str, int] = defaultdict(int)
        self.tables: dict[str, str] = {}
        self._active: tuple[str, profile, int] | None = None
        self._launch = core._launch
        core._launch = self.launch
        # Triton compiles during the run, with the pass they happened before: each
        # one stalls the engine for ~0.5 s.
        self.compiles: list[tuple[int, str]] = []
        import triton

        triton.knobs.runtime.jit_post_compile_hook = lambda **kw: self.compiles.append(
            (len(self.records), kw["repr"][:200])
        )
        # Python garbage collections longer than 5 ms (a full one walks every object).
        self.collections: list[tuple[int, int, float]] = []
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = 1e3 * (time.perf_counter() - self._gc_started)
        if ms > 5:
            self.collections.append((len(self.records), info["generation"], round(ms, 1)))

    def launch(self, plan, prev, failed):
        decode = all(c.num_tokens == 1 and c.samples for c in plan.chunks)
        kind = "decode" if decode else "mixed"
        self._maybe_profile(kind)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launched = self._launch(plan, prev, failed)
        end.record()
        self.records.append((kind, plan.num_tokens, len(plan.chunks), start, end))
        self.seen[kind] += 1
        return launched

    def _maybe_profile(self, kind: str) -> None:
        if self.profile_len == 0:
            return
        if self._active is not None:
            active_kind, prof, started = self._active
            if self.seen[active_kind] >= started + self.profile_len:
                torch.cuda.synchronize()
                prof.stop()
                self.tables[active_kind] = prof.key_averages().table(
                    sort_by="self_device_time_total", row_limit=20, max_name_column_width=70
                )
                self._active = None
        starts_here = self.seen[kind] == self.profile_at.get(kind, -1)
        if self._active is None and kind not in self.tables and starts_here:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.start()
            self._active = (kind, prof, self.seen[kind])

    def summary(self, wall_s: float) -> dict:
        torch.cuda.synchronize()
        groups: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])
        total_ms = 0.0
        for kind, tokens, _seqs, start, end in self.records:
            ms = start.elapsed_time(end)
            total_ms += ms
            bucket = f"{kind} {_bucket(tokens)}"
            groups[bucket][0] += 1
            groups[bucket][1] += tokens
            groups[bucket][2] += ms
        rows = {
            name: {
                "passes": n,
                "tokens": tok,
                "device_ms": round(ms, 1),
                "ms_per_pass": round(ms / n, 2),
                "us_per_token": round(1e3 * ms / tok, 2),
            }
            for name, (n, tok, ms) in sorted(groups.items())
        }
        # gap_ms: device time between the previous pass's end and this one's start
        # (the GPU waiting for the host, or for the previous pass's sampling).
        self.timeline = [
            {
                "kind": kind,
                "tokens": tokens,
                "seqs": seqs,
                "ms": round(start.elapsed_time(end), 3),
                "gap_ms": round(self.records[i - 1][4].elapsed_time(start), 3) if i else 0.0,
            }
            for i, (kind, tokens, seqs, start, end) in enumerate(self.records)
        ]
        return {
            "wall_s": round(wall_s, 2),
            "device_s_in_passes": round(total_ms / 1e3, 2),
            "device_busy": round(total_ms / 1e3 / wall_s, 3),
            "passes": len(self.records),
            "triton_compiles": self.compiles,
            "slow_gc": self.collections,
            "groups": rows,
        }


def matmul_rates(config: dict, tokens: list[int]) -> dict:
    """TFLOP/s of the model's projections (cuBLAS, bf16) at pass sizes of ``tokens``
    rows: what a pass of that size can reach at best (a dense MLP: a mixture of
    experts' experts see fewer rows each). Timed 20 launches queued back to back (as
    a graph replays them; one launch per timing counted cuBLAS's host time too, which
    made the 1-256-row rates look 2-5x worse than the GPU's), each on the next of
    enough weight copies that none is still in the L2 cache from its last use."""
    import itertools

    from benchmarks.common import _time_cuda, projection_shapes

    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    rates = {}
    for m in tokens:
        row = {}
        for name, (n, k) in projection_shapes(config).items():
            a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            copies = max(1, -(-2 * l2_bytes // (n * k * 2)) + 1)
            weights = itertools.cycle(
                [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            )
            seconds = _time_cuda(
                lambda a=a, w=weights: torch.nn.functional.linear(a, next(w)), calls=20
            )
            row[name] = round(2 * m * k * n / seconds / 1e12, 1)
        rates[m] = row
    return rates


def _bucket(tokens: int) -> str:
    for limit in (64, 256, 512, 1024, 1536, 2048, 4096):
        if tokens <= limit:
            return f"<={limit}"
    return ">4096"


async def run(args) -> dict:
    options = engine_options(args, {}, {})
    if args.token_budget is not None:
        options["token_budget"] = args.token_budget
    if args.max_num_seqs is not None:
        options["max_num_seqs"] = args.max_num_seqs
    engine = mii.AsyncEngine(
        model_dir(args.model), load_format="dummy", dtype="bfloat16", **options
    )
    prompts = workload(args.num_requests, *args.input_range)
    params = dict(max_new_tokens=args.output_len, ignore_eos=True, do_sample=False)
    await engine.generate(prompts[:8], **params)  # warm-up
    # W1 has ~127 decode-only passes (the tail after the last prompt): start the
    # decode window well inside it (150 was never reached, so no decode profile).
    recorder = PassRecorder(engine.core, {"mixed": 20, "decode": 40}, args.profile_passes)
    start = time.perf_counter()
    await engine.generate(prompts, **params)
    wall = time.perf_counter() - start
    result = recorder.summary(wall) | {"preemptions": engine.stats()["preemptions"]}
    await engine.aclose()
    if args.records:
        with open(args.records, "w") as f:
            json.dump(recorder.timeline, f)
    for kind, table in recorder.tables.items():
        print(f"\n=== profile of {args.profile_passes} {kind} passes\n{table}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--model", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--input-range", type=int, nargs=2, default=(128, 1024))
    parser.add_argument("--token-budget", type=int, default=None, help="default: the engine's")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="default: the engine's")
    parser.add_argument("--profile-passes", type=int, default=5)
    parser.add_argument("--records", help="write every pass's kind, size and device ms here")
    add_engine_arguments(parser)
    args = parser.parse_args()
    rows = [1, 128, 256, 1024, 2048]
    print(json.dumps({"matmul_tflops": matmul_rates(SHAPES[args.model], rows)}, indent=2))
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
