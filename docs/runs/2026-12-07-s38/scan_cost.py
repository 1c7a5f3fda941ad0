"""Host cost of Scheduler._short_prompts_waiting with a deep queue of long prompts
(thirty-eighth session): 400 waiting 2,600-token prompts, none short.

PYTHONPATH=src python docs/runs/2026-12-07-s38/scan_cost.py
"""

import random
import time

from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager
from mii.engine.prefix_hash import chain_hashes
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence

blocks = BlockManager(20000, 16, prefix_caching=True)
sched = Scheduler(blocks, 4096, 256, short_prompt_reserve=1024)
rng = random.Random(0)
for i in range(400):
    prompt = [rng.randrange(3, 32000) for _ in range(2600)]
    params = GenerateParams.parse(max_new_tokens=60)
    seq = Sequence(f"r{i}", prompt, params, 60, 0)
    seq.block_hashes = chain_hashes(blocks.cache_salt, prompt, 16)
    sched.waiting.append(seq)
for n in (1000,):
    t = time.perf_counter()
    for _ in range(n):
        sched._short_prompts_waiting(1024)
    print(f"{(time.perf_counter() - t) / n * 1e6:.1f} us per call, 400 waiting long prompts")
