"""Tensor parallelism on CPU with gloo: torchrun pipelines give the tokens of one
rank and of transformers; shards load the right slices; errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, checkpoint_cache, descendants, hf_greedy
from mii.models import loader
from mii.models.parallel import kv_head_layout, parallel_state, vocab_range
from test_family_falcon import falcon_config
from test_family_mixtral import hf_model_from_config, mixtral_config

NEW_TOKENS = 16
SCRIPT = Path(__file__).with_name("tp_script.py")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer, checkpoints):
    """name -> (path, HF model): the layouts the issue names."""
    falcon = checkpoint_cache(
        tmp_path_factory,
        tokenizer,
        "tp-falcon",
        lambda name: falcon_config(tokenizer, multi_query=True, parallel_attn=True),
        seed=2,
        vector_noise=torch.default_generator,
    )
    mixtral_path = tmp_path_factory.mktemp("tp-mixtral")
    mixtral = hf_model_from_config(mixtral_config(tokenizer))
    mixtral.save_pretrained(mixtral_path)
    tokenizer.save_pretrained(mixtral_path)
    return {
        "llama-gqa": checkpoints("llama"),  # 4 query heads, 2 KV heads
        "qwen2-one-kv-head": checkpoints("qwen2", num_key_value_heads=1),
        "falcon-7b-mqa": falcon("7b-mqa"),
        "mixtral": (mixtral_path, mixtral),
    }


def run_torchrun(tmp_path: Path, ranks: int, jobs: list[dict]) -> list[list[dict]]:
    """Every rank's results of the jobs, run by `torchrun --nproc-per-node ranks`."""
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        str(SCRIPT),
        str(spec),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert result.returncode == 0, "\n".join(errors[-20:]) or result.stderr[-4000:]
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]


def job(path, options=None, prompts=PROMPTS) -> dict:
    return {
        "model": str(path),
        "prompts": prompts,
        "new_tokens": NEW_TOKENS,
        "options": {"all_rank_output": True, **(options or {})},
    }


def test_two_ranks_match_one_rank_and_transformers(models, tokenizer, tmp_path):
    names = list(models)
    jobs = [job(models[name][0], TIGHT_OPTIONS) for name in names]
    # Async scheduling sends rank 0's sampled tokens to the other ranks on the device.
    jobs.append(job(models["llama-gqa"][0], {"async_scheduling": True}))
    jobs.append(job(models["llama-gqa"][0], {"all_rank_output": False}, PROMPTS[:2]))
    jobs[-1]["bad_call_first"] = True
    rank0, rank1 = run_torchrun(tmp_path, 2, jobs)
    for name, got in zip([*names, "llama-gqa"], rank0):
        path, hf_model = models[name]
        expected = [hf_greedy(hf_model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]
        assert got["token_ids"] == expected, name
        with mii.pipeline(str(path), **TIGHT_OPTIONS) as pipe:  # one rank
            single = pipe(PROMPTS, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert got["token_ids"] == [r.token_ids for r in single], name
    assert [r["type"] for r in rank0] == ["Pipeline"] * len(jobs)
    assert [r["type"] for r in rank1] == ["RankPipeline"] * len(jobs)
    assert [r["is_rank_0"] for r in rank0 + rank1] == [True] * len(jobs) + [False] * len(jobs)
    # all_rank_output: rank 1 receives rank 0's responses; otherwise nothing.
    assert rank1[:-1] == [{**r, "type": "RankPipeline", "is_rank_0": False} for r in rank0[:-1]]
    assert rank1[-1]["token_ids"] == [] and len(rank0[-1]["token_ids"]) == 2
    # A call that rank 0 refuses (bad option) ends on every rank: the next one works.
    assert rank0[-1]["bad_call"] == "refused" and rank1[-1]["bad_call"] == 0
    assert rank0[-1]["token_ids"] == rank0[0]["token_ids"][:2]


def test_four_ranks_replicate_key_value_heads(models, tokenizer, tmp_path):
    """4 ranks over 2 KV heads (llama) and 1 (Falcon MQA): each KV head is held by
    the ranks whose query heads use it."""
    names = ["llama-gqa", "falcon-7b-mqa"]
    results = run_torchrun(tmp_path, 4, [job(models[n][0]) for n in names])
    for name, got in zip(names, results[0]):
        hf_model = models[name][1]
        expected = [hf_greedy(hf_model, tokenizer, p, NEW_TOKENS) for p in PROMPTS]
        assert got["token_ids"] == expected, name
    assert all(
        r == [{**x, "type": "RankPipeline", "is_rank_0": False} for x in results[0]]
        for r in results[1:]
    )


@pytest.fixture(scope="module")
def every_family(tmp_path_factory, tokenizer, checkpoints, models):
    """name -> (path, HF model): one checkpoint per family and layout of the spec."""
    from transformers import GemmaConfig, Phi3Config, Qwen2Config, Qwen3Config

    from helpers import save_checkpoint, tiny_config_kwargs
    from test_family_falcon import LAYOUTS as FALCON_LAYOUTS
    from test_family_llama_variants import to_qwen_v1
    from test_family_mixtral import qwen2_moe_config
    from test_family_opt import VARIANTS as OPT_VARIANTS
    from test_family_opt import opt_config
    from test_family_phi import VARIANTS as PHI_VARIANTS
    from test_family_phi import phi_config

    def build(name, config, **options):
        path = tmp_path_factory.mktemp(f"tp-{name}")
        return path, save_checkpoint(path, config, tokenizer, **options)

    found = dict(models)
    for name in ("llama-mha-tied", "llama3-rope", "mistral-window", "qwen2-window"):
        found[name] = checkpoints(name)
    for name, layout in FALCON_LAYOUTS.items():
        found[f"falcon-{name}"] = build(
            name, falcon_config(tokenizer, **layout), seed=2, vector_noise=torch.default_generator
        )
    for name in ("pre-ln", "post-ln-projected"):
        found[f"opt-{name}"] = build(
            name, opt_config(tokenizer, **OPT_VARIANTS[name]), vector_noise=1
        )
    for name, variant in PHI_VARIANTS.items():
        found[f"phi-{name}"] = build(name, phi_config(tokenizer, **variant), vector_noise=1)
    found["qwen3"] = build("qwen3", Qwen3Config(**tiny_config_kwargs(tokenizer, head_dim=32)))
    found["gemma"] = build(
        "gemma",
        GemmaConfig(
            **tiny_config_kwargs(
                tokenizer, head_dim=32, num_key_value_heads=1, tie_word_embeddings=True
            )
        ),
    )
    found["phi3"] = build("phi3", Phi3Config(**tiny_config_kwargs(tokenizer, sliding_window=10)))
    qwen2_path, qwen2_hf = build(
        "qwen2-mha", Qwen2Config(**tiny_config_kwargs(tokenizer, num_key_value_heads=4))
    )
    found["qwen-v1"] = (
        to_qwen_v1(qwen2_path, tmp_path_factory.mktemp("tp-qwen-v1") / "model"),
        qwen2_hf,
    )
    moe_path = tmp_path_factory.mktemp("tp-qwen2-moe")
    moe_hf = hf_model_from_config(qwen2_moe_config(tokenizer))
    moe_hf.save_pretrained(moe_path)
    tokenizer.save_pretrained(moe_path)
    found["qwen2-moe"] = (moe_path, moe_hf)
    return found


FOUR_RANK_FAMILIES = ["mixtral", "qwen2-moe", "opt-pre-ln", "phi-partial-0.5", "falcon-40b-grouped"]


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_family_matches_transformers(every_family, tokenizer, tmp_path, ranks):
    names = list(every_family) if ranks == 2 else FOUR_RANK_FAMILIES
    prompts = PROMPTS[:3]
    jobs = [job(every_family[n][0], {"all_rank_output": False}, prompts) for n in names]
    rank0 = run_torchrun(tmp_path, ranks, jobs)[0]
    for name, got in zip(names, rank0):
        hf_model = every_family[name][1]
        expected = [hf_greedy(hf_model, tokenizer, p, NEW_TOKENS) for p in prompts]
        assert got["token_ids"] == expected, name


# -- shards, built in one process as each rank would -------------------------------


def build_rank(path: Path, rank: int, world: int):
    hf_config = loader.read_hf_config(path)
    with parallel_state(rank, world):
        return loader.build_model(hf_config, path, torch.float32, torch.device("cpu"), "auto", 0)


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    [file] = path.glob("*.safetensors")
    return load_file(file)


def test_shards_hold_their_slices(models):
    path, _ = models["llama-gqa"]
    full = full_weights(path)
    shards = [build_rank(path, r, 2) for r in range(2)]
    attn = [s.model.layers[0].self_attn for s in shards]
    assert [a.num_heads for a in attn] == [2, 2] and [a.num_kv_heads for a in attn] == [1, 1]
    for name, part in (("q_proj", 0), ("k_proj", 1), ("v_proj", 2)):
        pieces = []
        for a in attn:
            sizes = a.qkv_proj.output_sizes
            start = sum(sizes[:part])
            pieces.append(a.qkv_proj.weight[start : start + sizes[part]])
        expected = full[f"model.layers.0.self_attn.{name}.weight"]
        torch.testing.assert_close(torch.cat(pieces), expected)
    o_proj = torch.cat([a.o_proj.weight for a in attn], dim=1)
    torch.testing.assert_close(o_proj, full["model.layers.0.self_attn.o_proj.weight"])
    embed = torch.cat([s.model.embed_tokens.weight for s in shards])
    vocab = full["model.embed_tokens.weight"].shape[0]
    torch.testing.assert_close(embed[:vocab], full["model.embed_tokens.weight"])
    assert not embed[vocab:].any()  # padding rows of the last rank


def test_single_key_value_head_is_replicated(models):
    path, _ = models["falcon-7b-mqa"]
    shards = [build_rank(path, r, 2) for r in range(2)]
    layers = [s.transformer.h[0].self_attention.qkv_proj for s in shards]
    q_rows = layers[0].output_sizes[0]
    k_rank0 = layers[0].weight[q_rows:]
    k_rank1 = layers[1].weight[q_rows:]
    torch.testing.assert_close(k_rank0, k_rank1)  # the same k and v on both ranks
    assert not torch.equal(layers[0].weight[:q_rows], layers[1].weight[:q_rows])


def test_layouts():
    assert [kv_head_layout(8, 4, r) for r in range(4)] == [(2, 0), (2, 2), (2, 4), (2, 6)]
    assert [kv_head_layout(2, 4, r) for r in range(4)] == [(1, 0), (1, 0), (1, 1), (1, 1)]
    assert [kv_head_layout(1, 4, r)[1] for r in range(4)] == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="multiple of the model's 3 key/value heads"):
        kv_head_layout(3, 4, 0)
    assert vocab_range(10, 4, 3) == (9, 3)  # 3 rows per rank, 2 of the last are padding


def test_head_count_not_divisible_is_a_clear_error(models):
    path, _ = models["llama-gqa"]
    with pytest.raises(ValueError, match=r"tensor_parallel \(3\)"):
        build_rank(path, 0, 3)  # 4 query heads, 2 KV heads
    hf_config = loader.read_hf_config(path)
    with parallel_state(0, 8), pytest.raises(ValueError, match=r"\(4\) is not divisible by"):
        loader.build_model(hf_config, path, torch.float32, torch.device("cpu"), "auto", 0)


def test_tensor_parallel_without_a_launcher_says_how_to_launch(models, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(mii.InvalidRequestError, match="torchrun --nproc-per-node 2"):
        mii.pipeline(str(models["llama-gqa"][0]), tensor_parallel=2)


# -- deployments -------------------------------------------------------------------


def deployment_processes(name: str) -> set[int]:
    from mii.rpc import registry

    info = registry.lookup(name)
    return {info["pid"], *descendants(info["pid"])}


def wait_until(predicate, timeout: float = 20.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


SERVE_OPTIONS = dict(kv_block_size=4, num_kv_blocks=64)


def serve_options() -> dict:
    """SERVE_OPTIONS on a free gRPC port: the default, 50050, may be taken by any
    deployment on this machine (a CI run failed so beside a user's mii serve)."""
    from mii.rpc.deployment import free_port

    return {**SERVE_OPTIONS, "port": free_port()}


def test_serve_two_ranks_two_replicas(models, tmp_path, monkeypatch):
    from mii.rpc import registry

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    path = str(models["llama-gqa"][0])
    with mii.pipeline(path, **SERVE_OPTIONS) as pipe:
        expected = pipe(PROMPTS[:3], do_sample=False, max_new_tokens=NEW_TOKENS)
    client = mii.serve(
        path, deployment_name="tp", tensor_parallel=2, replica_num=2, **serve_options()
    )
    processes = deployment_processes("tp")
    try:
        # deployment + 2 replicas (rank 0) + 2 rank-1 workers
        assert len([p for p in processes if registry.pid_alive(p)]) >= 5
        got = client.generate(PROMPTS[:3], do_sample=False, max_new_tokens=NEW_TOKENS)
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]
        streamed = list(client.stream(PROMPTS[0], do_sample=False, max_new_tokens=NEW_TOKENS))
        assert "".join(p.generated_text for p in streamed) == expected[0].generated_text
    finally:
        client.terminate_server()
    assert wait_until(lambda: not any(registry.pid_alive(p) for p in processes))
    assert registry.lookup("tp") is None


def test_failing_rank_fails_the_request_and_the_deployment_turns_unhealthy(
    models, tmp_path, monkeypatch
):
    from mii.rpc import registry

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MII_TP_FAIL_AT_PASS", "1:3")  # rank 1 raises on its third pass
    path = str(models["llama-gqa"][0])
    client = mii.serve(path, deployment_name="tp-fail", tensor_parallel=2, **serve_options())
    processes = deployment_processes("tp-fail")
    try:
        with pytest.raises(mii.UnavailableError, match="rank 1: RuntimeError: injected failure"):
            # ignore_eos: a sampled end of text within two tokens would end the
            # request before the failing pass (the test flaked so, rarely)
            client.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, ignore_eos=True, timeout=60)
        assert wait_until(lambda: not client.is_healthy(timeout=1.0))
    finally:
        client.terminate_server()
    assert wait_until(lambda: not any(registry.pid_alive(p) for p in processes))


def test_device_map_of_a_deployment():
    from mii.rpc.deployment import DeploymentError, _device_map

    two_by_two = {"tensor_parallel": 2, "replica_num": 2}
    assert _device_map(two_by_two, gpus=0) is None  # CPU
    with pytest.raises(DeploymentError, match="no GPU is present"):  # not quietly the CPU
        _device_map({**two_by_two, "device_map": [0, 1, 2, 3]}, gpus=0)
    # every GPU it names, also past those one replica uses ([0] before: user trial)
    with pytest.raises(DeploymentError, match=r"names GPUs \[0, 1\], but no GPU"):
        _device_map({"device_map": {"localhost": [[0], [1]]}}, gpus=0)
    assert _device_map(two_by_two, gpus=4) == [0, 1, 2, 3]
    assert _device_map({**two_by_two, "device_map": [3, 2, 1, 0]}, gpus=4) == [3, 2, 1, 0]
    with pytest.raises(DeploymentError, match="needs 4 GPUs; 2 found"):
        _device_map(two_by_two, gpus=2)
    with pytest.raises(DeploymentError, match=r"names GPUs \[5\]"):
        _device_map({**two_by_two, "device_map": [0, 1, 2, 5]}, gpus=4)


def test_bad_device_map_fails_before_anything_starts(models):
    with pytest.raises(ValueError, match="needs 4"):
        mii.serve(str(models["llama-gqa"][0]), tensor_parallel=2, replica_num=2, device_map=[0])


def test_each_rank_reads_only_its_share_of_the_checkpoint(models, monkeypatch):
    """Sharded tensors are read slice by slice from safetensors: at 2 ranks a rank
    reads about half of the checkpoint (norms are replicated, so a little more)."""
    from mii.models import checkpoint_tensor

    read = []
    original = checkpoint_tensor.LazyTensor.__init__

    def tracking_init(self, handle, name):
        original(self, handle, name)
        read.append(self)

    monkeypatch.setattr(checkpoint_tensor.LazyTensor, "__init__", tracking_init)
    for name in ("llama-gqa", "mixtral"):  # mixtral: per-expert tensors too
        path, _ = models[name]
        total = sum(t.numel() for t in full_weights(path).values())
        shares = []
        for rank in range(2):
            read.clear()
            build_rank(path, rank, 2)
            shares.append(sum(t.elements_read for t in read) / total)
        assert all(0.45 < share < 0.56 for share in shares), (name, shares)
        read.clear()
        build_rank(path, 0, 1)
        assert sum(t.elements_read for t in read) == total  # one rank reads everything once


def os_threads() -> set[str]:
    """The process's OS thread ids (native threads too, which threading does not list)."""
    return set(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_stop_joins_gloo_worker_threads():
    """After a clean STOP the group's gloo worker threads are joined at once. A
    worker thread that outlived the group dropped its last collective during
    interpreter shutdown and aborted the process (SIGABRT on rank 1 under CPU load)."""
    import torch.distributed as dist

    from mii.engine.distributed import TPGroup

    # The threads this test starts, by id: a count of all threads also saw an earlier
    # test's native threads exiting meanwhile (8 > 10 + 1 failed, idle and loaded).
    before = os_threads()
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    group = TPGroup(0, 1, 0, dist.group.WORLD, dist.group.WORLD, store)
    group.send_pass(np.arange(8, dtype=np.int64), None)
    started = os_threads() - before
    assert len(started) > 1  # gloo's worker threads (and the store's)
    group.stop()
    assert not dist.is_initialized()
    del store
    assert len(started & os_threads()) <= 1  # at most the store's thread is left
