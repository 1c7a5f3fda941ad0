"""The engine's ``seed`` also starts the stream that seeds requests which give none
(vLLM's behaviour, whose default seed is 0): the same requests in the same order
sample the same tokens from run to run; two unseeded requests in one run still
differ; another engine seed, or another replica's stream, samples others."""

from __future__ import annotations

import asyncio

import pytest

import mii
from helpers import PROMPTS

SAMPLED = dict(do_sample=True, temperature=1.5, top_p=1.0, max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model(checkpoints):
    path, _ = checkpoints("llama")
    return str(path)


def sampled(path: str, prompts: list[str], **engine_options) -> list[list[int]]:
    """Two calls' unseeded samples of ``prompts`` from a fresh pipeline."""
    with mii.pipeline(path, **engine_options) as pipe:
        first = [r.token_ids for r in pipe(prompts, **SAMPLED)]
        second = [r.token_ids for r in pipe(prompts, **SAMPLED)]
    return first + second


def test_unseeded_sampling_repeats_from_run_to_run_and_varies_within_one(model):
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1]]
    run = sampled(model, prompts)
    assert run == sampled(model, prompts)  # a second run (same engine seed 0)
    # within a run every request draws its own seed: the same prompt twice in one
    # batch, and the same batch again, sample other tokens
    assert run[0] != run[1]
    assert run[:3] != run[3:]
    assert sampled(model, prompts, seed=1) != run


def test_a_replica_stream_samples_other_tokens_than_the_engine_seed_alone(model):
    async def two_streams() -> tuple[list[int], list[int], list[int]]:
        answers = []
        for salt in (None, "replica 1", "replica 1"):
            async with mii.AsyncEngine(model) as engine:
                if salt is not None:
                    engine.separate_sampling_stream(salt)
                answers.append((await engine.generate([PROMPTS[0]], **SAMPLED))[0].token_ids)
        return tuple(answers)

    plain, replica, again = asyncio.run(two_streams())
    assert replica != plain and replica == again


def test_replica_configs_are_numbered(tmp_path):
    """Each replica process learns its index (its stream's salt: replica.py)."""
    from mii.rpc.deployment import _replica_configs
    from mii.rpc.deployment_config import DeploymentConfig

    config = DeploymentConfig(model=str(tmp_path), replica_num=3)
    assert [c.index for c in _replica_configs(config)] == [0, 1, 2]
