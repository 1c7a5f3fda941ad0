"""Run under torchrun by test_tensor_parallel.py: every rank runs the jobs of a JSON
spec through ``mii.pipeline`` and writes what its calls returned.

    torchrun --nproc-per-node N tests/tp_script.py SPEC_JSON OUT_PREFIX
"""

from __future__ import annotations

import json
import os
import sys

import mii


def main() -> None:
    spec_path, out_prefix = sys.argv[1:3]
    with open(spec_path) as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        pipe = mii.pipeline(job["model"], **job.get("options", {}))
        bad_call = None
        if job.get("bad_call_first"):  # rank 0 refuses it: the ranks must stay in step
            try:
                bad_call = len(pipe(job["prompts"], top_p=3.0))
            except mii.InvalidRequestError:
                bad_call = "refused"
        responses = pipe(job["prompts"], do_sample=False, max_new_tokens=job["new_tokens"])
        results.append(
            {
                "type": type(pipe).__name__,
                "is_rank_0": pipe.is_rank_0,  # DeepSpeed-MII's name
                "token_ids": [r.token_ids for r in responses],
                "texts": [r.generated_text for r in responses],
                "bad_call": bad_call,
            }
        )
        pipe.destroy()
    with open(f"{out_prefix}.rank{os.environ['RANK']}.json", "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
