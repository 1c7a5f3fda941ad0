"""The CUDA token budget chosen from the device and the model (engine/pass_budget.py),
checked on the CPU with the device's properties stood in for."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mii.config import EngineConfig
from mii.engine import bring_up, pass_budget
from mii.engine.pass_budget import (
    MAX_PASS_SECONDS,
    default_token_budget,
    matmul_flops_per_token,
    sustained_tflops,
    token_budget_for,
)
from test_family_mixtral import random_moe

H200 = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
A100 = SimpleNamespace(major=8, minor=0, multi_processor_count=108)


@pytest.fixture
def gpu(monkeypatch):
    """Stand in for torch.cuda.get_device_properties: set ``gpu.props``."""
    state = SimpleNamespace(props=H200)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: state.props)
    return state


@pytest.mark.parametrize(
    ("params", "fp8", "expected"),
    [
        (6.74e9, False, 4096),  # Llama-2-7B: ~71 ms at 4,096
        (8.03e9, False, 4096),  # Llama-3-8B: ~84 ms
        (12.9e9, False, 4096),  # Mixtral-8x7B's active weights: ~136 ms
        (70.6e9, True, 2048),  # Llama-3-70B in FP8 on one H200: ~370 ms at 4,096
        (70.6e9, False, 1024),  # the same in bf16 (it would need two H200s)
        (400e9, False, 512),  # never below the smallest budget
    ],
)
def test_budget_on_an_h200(gpu, params, fp8, expected):
    tflops = sustained_tflops(torch.device("cuda"), fp8_weights=fp8)
    budget = token_budget_for(2 * params, tflops)
    assert budget == expected
    if budget > pass_budget.SMALLEST_BUDGET:  # the pass it allows fits; twice that does not
        assert budget * 2 * params <= MAX_PASS_SECONDS * tflops * 1e12
    if budget < pass_budget.LARGEST_BUDGET:
        assert 2 * budget * 2 * params > MAX_PASS_SECONDS * tflops * 1e12


def test_slower_gpus_get_shorter_passes(gpu):
    h200 = sustained_tflops(torch.device("cuda"))
    gpu.props = A100
    a100 = sustained_tflops(torch.device("cuda"))
    assert a100 < h200 / 2
    assert token_budget_for(2 * 6.74e9, a100) == 2048  # ~225 ms at 4,096 on an A100
    gpu.props = SimpleNamespace(major=7, minor=5, multi_processor_count=40)  # unknown: slowest
    assert sustained_tflops(torch.device("cuda")) == 40 * pass_budget.FALLBACK_TFLOPS_PER_SM
    gpu.props = SimpleNamespace(major=8, minor=6, multi_processor_count=72)  # A10: no fp8
    assert sustained_tflops(torch.device("cuda"), fp8_weights=True) == sustained_tflops(
        torch.device("cuda")
    )


def test_flops_count_each_matrix_once_and_only_the_active_experts():
    dense = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 6, bias=True), nn.LayerNorm(6))
    dense[1].weight = nn.Parameter(torch.zeros(6, 8))
    assert matmul_flops_per_token(dense) == 2 * (10 * 8 + 6 * 8)  # no biases, no norms
    tied = nn.ModuleDict({"embed": nn.Embedding(10, 8), "head": nn.Linear(8, 10, bias=False)})
    tied["head"].weight = tied["embed"].weight
    assert matmul_flops_per_token(tied) == 2 * 10 * 8  # one table, multiplied once
    moe = random_moe(True, num_experts=4, top_k=1)  # hidden 16, intermediate 24
    experts = 4 * (2 * 24 * 16 + 16 * 24)
    router = 4 * 16
    assert matmul_flops_per_token(moe) == 2 * (router + experts / 4)


def test_engine_defaults_take_the_model_budget(gpu, monkeypatch):
    """The CUDA budget replaces 4,096 only where the user set none; the sequence cap
    left unset follows it; the CPU keeps its own defaults."""
    model = nn.Linear(16384, 16384, bias=False, device="meta")  # 268M weights, no memory
    loaded = SimpleNamespace(model=model)
    cuda = torch.device("cuda")
    gpu.props = SimpleNamespace(major=9, minor=0, multi_processor_count=1)  # 5.9 TFLOP/s
    assert default_token_budget(model, cuda) == 2048  # ~186 ms a pass; 4,096: ~373 ms
    config = bring_up.scheduling_defaults(EngineConfig.parse("m"), loaded, cuda)
    assert (config.token_budget, config.max_num_seqs) == (2048, 256)
    many = bring_up.scheduling_defaults(EngineConfig.parse("m", max_num_seqs=3000), loaded, cuda)
    assert (many.token_budget, many.max_num_seqs) == (3000, 3000)  # every decode fits a pass
    chosen = EngineConfig.parse("m", token_budget=8192)
    assert bring_up.scheduling_defaults(chosen, loaded, cuda).token_budget == 8192
    cpu = bring_up.scheduling_defaults(EngineConfig.parse("m"), loaded, torch.device("cpu"))
    assert (cpu.token_budget, cpu.max_num_seqs) == (1024, 128)
    monkeypatch.setattr(pass_budget, "MAX_PASS_SECONDS", 10.0)  # a fast enough GPU
    fast = bring_up.scheduling_defaults(EngineConfig.parse("m"), loaded, cuda)
    assert (fast.token_budget, fast.max_num_seqs) == (4096, 256)


def test_the_startup_log_names_what_the_engine_chose(checkpoints, caplog):
    """Defaults left open are chosen by the engine, so its log says what it runs with
    (a benchmark's or a deployment's log then records it); set values show as set."""
    import mii

    path, _ = checkpoints("llama")
    with caplog.at_level("INFO", logger="mii.engine.core"):
        with mii.pipeline(str(path)):
            pass
        with mii.pipeline(
            str(path),
            token_budget=64,
            max_num_seqs=4,
            quantization="fp8",
            enable_prefix_caching=False,
        ):
            pass
    lines = [r.getMessage() for r in caplog.records if "engine settings" in r.getMessage()]
    assert lines[0] == (
        "engine settings: token_budget=1024, max_num_seqs=128, short_prompt_reserve=256, "
        "cuda_graphs=off, "
        "async_scheduling=False, quantization=none, kv_cache_dtype=auto, prefix_caching=on"
    )
    assert (
        "token_budget=64, max_num_seqs=4, short_prompt_reserve=16," in lines[1]
        and "quantization=fp8" in lines[1]
    )
    assert lines[1].endswith("prefix_caching=off")
