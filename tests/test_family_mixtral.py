"""Mixture-of-experts families: Mixtral and Qwen2-MoE against transformers, and the
SparseMoE layer against a naive per-token reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mii
from helpers import PROMPTS, TIGHT_OPTIONS, assert_matches_hf, hf_greedy, tiny_config_kwargs
from mii.models.loader import build_model, read_hf_config
from mii.models.mixtral import (
    MixtralForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen2MoeSparseBlock,
    qwen2_moe_spec,
)
from mii.models.moe import ExpertShard, SparseMoE, map_expert_weight_name


def mixtral_config(tokenizer, **overrides):
    from transformers import MixtralConfig

    options = dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2)
    return MixtralConfig(**tiny_config_kwargs(tokenizer, **{**options, **overrides}))


def qwen2_moe_config(tokenizer, **overrides):
    from transformers import Qwen2MoeConfig

    options = dict(
        num_hidden_layers=3,
        intermediate_size=96,  # the dense layers'
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
        mlp_only_layers=[1],
    )
    return Qwen2MoeConfig(**tiny_config_kwargs(tokenizer, **{**options, **overrides}))


# name -> (config builder, overrides)
CHECKPOINTS = {
    "mixtral": (mixtral_config, {}),
    "mixtral-window": (mixtral_config, {"sliding_window": 8}),
    "qwen2-moe": (qwen2_moe_config, {}),
    # Sliding layers 0 and 2 (transformers' Qwen2-MoE rule), sparse layers 1 and 3,
    # renormalised top-k.
    "qwen2-moe-window": (
        qwen2_moe_config,
        {
            "num_hidden_layers": 4,
            "mlp_only_layers": [],
            "decoder_sparse_step": 2,
            "norm_topk_prob": True,
            "use_sliding_window": True,
            "sliding_window": 6,
            "max_window_layers": 3,
        },
    ),
}


def hf_model_from_config(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():  # biases start at zero and norms at one: make them matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory, tokenizer):
    """name -> (path, HF model), each built once per module."""
    cache: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in cache:
            builder, overrides = CHECKPOINTS[name]
            path = tmp_path_factory.mktemp(name)
            model = hf_model_from_config(builder(tokenizer, **overrides))
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[name] = (path, model)
        return cache[name]

    return get


# -- end to end: greedy tokens equal transformers' ------------------------------


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_matches_hf(moe_checkpoints, tokenizer, name):
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_matches_hf_with_chunking_and_preemption(moe_checkpoints, tokenizer, name):
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer, **TIGHT_OPTIONS, expect_preemption=True)


@pytest.mark.parametrize(
    ("name", "no_window"),
    [
        ("mixtral-window", {"sliding_window": None}),
        ("qwen2-moe-window", {"use_sliding_window": False}),
    ],
)
def test_sliding_window_changes_the_answer(moe_checkpoints, tokenizer, name, no_window):
    """Guard: with the same weights the window must matter, so matching HF with
    the window proves it is honoured."""
    from transformers import AutoModelForCausalLM

    _, windowed = moe_checkpoints(name)
    builder, overrides = CHECKPOINTS[name]
    config = builder(tokenizer, **{**overrides, **no_window})
    plain = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    plain.load_state_dict(windowed.state_dict())
    assert any(
        hf_greedy(windowed, tokenizer, p, 24) != hf_greedy(plain, tokenizer, p, 24) for p in PROMPTS
    )


def test_bfloat16_runs(moe_checkpoints):
    path, _ = moe_checkpoints("mixtral")
    with mii.pipeline(str(path), dtype="bfloat16") as pipe:
        [r] = pipe(PROMPTS[1], max_new_tokens=5, ignore_eos=True)
        assert pipe.engine.core.model.model.layers[0].mlp.w13.dtype == torch.bfloat16
    assert r.generated_length == 5


# -- the SparseMoE layer --------------------------------------------------------


def random_moe(renormalize: bool, seed: int = 0, **sizes) -> SparseMoE:
    sizes = {"hidden_size": 16, "intermediate_size": 24, "num_experts": 5, "top_k": 2, **sizes}
    moe = SparseMoE(**sizes, renormalize=renormalize)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in moe.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return moe


def per_token_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """The obvious definition, one token and one chosen expert at a time."""
    inter = moe.intermediate_size
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(moe.gate.weight @ x[t], dim=-1)
        weights, experts = probs.topk(moe.top_k)
        if moe.renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights, experts.tolist()):
            gate = moe.w13[e, :inter] @ x[t]
            up = moe.w13[e, inter:] @ x[t]
            out[t] += weight * (moe.w2[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens", [1, 3, 37])
def test_sparse_moe_matches_per_token_reference(renormalize, tokens):
    moe = random_moe(renormalize)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), per_token_reference(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_weights(renormalize):
    moe = random_moe(renormalize)
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        weights, experts = moe.route(x)
        probs = torch.softmax(moe.gate(x), dim=-1)
    assert weights.shape == experts.shape == (50, 2)
    assert weights.dtype == torch.float32
    # The chosen experts are the k most probable, each chosen once per token.
    assert torch.equal(experts, probs.topk(2, dim=-1).indices)
    assert (experts[:, 0] != experts[:, 1]).all()
    sums = weights.sum(dim=-1)
    if renormalize:
        torch.testing.assert_close(sums, torch.ones(50))
        torch.testing.assert_close(
            weights, probs.gather(1, experts) / probs.gather(1, experts).sum(-1, keepdim=True)
        )
    else:
        torch.testing.assert_close(weights, probs.gather(1, experts))
        assert (sums < 1).all()


def test_tokens_are_grouped_by_expert():
    moe = random_moe(True, num_experts=6, top_k=2)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, experts = moe.route(x)
    order, tokens, counts = moe.group_by_expert(experts)
    assert sum(counts) == 40 * 2
    start = 0
    for e, count in enumerate(counts):
        group = tokens[start : start + count]
        assert (experts.reshape(-1)[order[start : start + count]] == e).all()
        assert torch.equal(group, torch.sort(group).values)  # ascending, no duplicates
        assert set(group.tolist()) == set((experts == e).any(dim=-1).nonzero().flatten().tolist())
        start += count


def test_each_expert_runs_once_on_all_its_tokens(monkeypatch):
    """The compute is one matmul per expert over its gathered tokens, not per token."""
    moe = random_moe(True, num_experts=6)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(4))
    calls: list[tuple[int, int]] = []
    original = SparseMoE.expert_forward

    def spy(self, expert, h):
        calls.append((expert, h.shape[0]))
        return original(self, expert, h)

    monkeypatch.setattr(SparseMoE, "expert_forward", spy)
    with torch.no_grad():
        moe(x)
        _, experts = moe.route(x)
    hit = experts.unique().tolist()
    assert [e for e, _ in calls] == hit  # each expert hit once, in order
    assert [n for _, n in calls] == [int((experts == e).sum()) for e in hit]


def test_expert_shard_ids():
    assert ExpertShard(1, "up") == (1, "up")
    assert str(ExpertShard(1, "up")) == "expert1.up"
    moe = random_moe(True, num_experts=3)
    assert moe.weight_shards("w13") == [(e, p) for e in range(3) for p in ("gate", "up")]
    assert moe.weight_shards("w2") == [(0, "down"), (1, "down"), (2, "down")]


@pytest.mark.parametrize(
    ("hf_name", "expected"),
    [
        ("model.layers.3.mlp.experts.7.w1.weight", ("model.layers.3.mlp.w13", (7, "gate"))),
        ("model.layers.3.mlp.experts.7.w3.weight", ("model.layers.3.mlp.w13", (7, "up"))),
        ("model.layers.3.mlp.experts.7.w2.weight", ("model.layers.3.mlp.w2", (7, "down"))),
        (
            "model.layers.0.mlp.experts.12.gate_proj.weight",
            ("model.layers.0.mlp.w13", (12, "gate")),
        ),
        ("model.layers.0.mlp.experts.12.up_proj.weight", ("model.layers.0.mlp.w13", (12, "up"))),
        ("model.layers.0.mlp.experts.12.down_proj.weight", ("model.layers.0.mlp.w2", (12, "down"))),
        ("model.layers.0.mlp.experts.gate_up_proj", ("model.layers.0.mlp.w13", "packed")),
        ("model.layers.0.mlp.experts.down_proj", ("model.layers.0.mlp.w2", "packed")),
        ("model.layers.0.mlp.shared_expert.gate_proj.weight", None),
        ("model.layers.0.mlp.gate.weight", None),
        ("model.layers.0.mlp.down_proj.weight", None),
    ],
)
def test_expert_weight_names(hf_name, expected):
    assert map_expert_weight_name(hf_name) == expected


# -- loading real checkpoints ---------------------------------------------------


def load(path: Path) -> torch.nn.Module:
    return build_model(read_hf_config(path), path, torch.float32, torch.device("cpu"))


def test_mixtral_loads_per_expert_hf_names(moe_checkpoints):
    from safetensors.torch import load_file

    path, hf_model = moe_checkpoints("mixtral")
    tensors = load_file(path / "model.safetensors")
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in tensors  # legacy layout
    model = load(path)
    assert isinstance(model, MixtralForCausalLM)
    for i in range(2):
        prefix = f"model.layers.{i}.block_sparse_moe"
        moe = model.model.layers[i].mlp
        assert isinstance(moe, SparseMoE) and moe.renormalize
        assert torch.equal(moe.gate.weight, tensors[f"{prefix}.gate.weight"])
        for e in range(4):
            w1, w3 = (tensors[f"{prefix}.experts.{e}.{w}.weight"] for w in ("w1", "w3"))
            assert torch.equal(moe.w13[e], torch.cat([w1, w3]))
            assert torch.equal(moe.w2[e], tensors[f"{prefix}.experts.{e}.w2.weight"])
        # ...and the same as transformers' fused in-memory layout
        hf_experts = hf_model.model.layers[i].mlp.experts
        assert torch.equal(moe.w13, hf_experts.gate_up_proj)
        assert torch.equal(moe.w2, hf_experts.down_proj)


def test_qwen2_moe_loads_per_expert_hf_names(moe_checkpoints):
    from safetensors.torch import load_file

    path, hf_model = moe_checkpoints("qwen2-moe")
    tensors = load_file(path / "model.safetensors")
    model = load(path)
    assert isinstance(model, Qwen2MoeForCausalLM)
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp"
        attn = layer.self_attn
        assert torch.equal(
            attn.qkv_proj.bias,
            torch.cat([tensors[f"model.layers.{i}.self_attn.{p}_proj.bias"] for p in "qkv"]),
        )
        if i == 1:  # mlp_only_layers: dense
            assert not isinstance(layer.mlp, SparseMoE)
            gate, up = (tensors[f"{prefix}.{p}_proj.weight"] for p in ("gate", "up"))
            assert torch.equal(layer.mlp.gate_up_proj.weight, torch.cat([gate, up]))
            continue
        moe = layer.mlp
        assert isinstance(moe, Qwen2MoeSparseBlock) and not moe.renormalize
        for e in range(4):
            gate, up, down = (
                tensors[f"{prefix}.experts.{e}.{p}_proj.weight"] for p in ("gate", "up", "down")
            )
            assert torch.equal(moe.w13[e], torch.cat([gate, up]))
            assert torch.equal(moe.w2[e], down)
        shared = f"{prefix}.shared_expert"
        gate, up, down = (tensors[f"{shared}.{p}_proj.weight"] for p in ("gate", "up", "down"))
        assert torch.equal(moe.shared_expert.gate_up_proj.weight, torch.cat([gate, up]))
        assert torch.equal(moe.shared_expert.down_proj.weight, down)
        shared_gate = tensors[f"{prefix}.shared_expert_gate.weight"]
        assert torch.equal(moe.shared_expert_gate.weight, shared_gate)
        hf_experts = hf_model.model.layers[i].mlp.experts
        assert torch.equal(moe.w13, hf_experts.gate_up_proj)


@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_fused_transformers5_names_load_the_same(moe_checkpoints, name):
    """transformers' in-memory names (experts.gate_up_proj [E, 2I, H],
    experts.down_proj [E, H, I]) fill every expected weight, identically."""
    path, hf_model = moe_checkpoints(name)
    reference = load(path)
    state = hf_model.state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    cls = type(reference)
    with torch.device("meta"):
        model = cls(read_hf_config(path))
    model = model.to_empty(device="cpu")
    loaded = model.load_weights(state.items())
    assert loaded == model.expected_weight_names()
    for (ours, param), (_, ref) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, ref), ours


def test_sparse_block_equals_hf_block(moe_checkpoints):
    """One decoder MoE block, ours against transformers', on the same input."""
    for name in ("mixtral", "qwen2-moe"):
        path, hf_model = moe_checkpoints(name)
        model = load(path)
        x = torch.randn(11, 64, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            ours = model.model.layers[0].mlp(x)
            theirs = hf_model.model.layers[0].mlp(x[None])[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "deleted", "reported"),
    [
        (
            "mixtral",
            "model.layers.1.block_sparse_moe.experts.2.w3.weight",
            r"model\.layers\.1\.mlp\.w13#expert2\.up",
        ),
        (
            "qwen2-moe",
            "model.layers.2.mlp.experts.3.down_proj.weight",
            r"model\.layers\.2\.mlp\.w2#expert3\.down",
        ),
    ],
)
def test_missing_expert_is_named(tmp_path, moe_checkpoints, name, deleted, reported):
    from safetensors.torch import load_file, save_file

    path, _ = moe_checkpoints(name)
    shutil.copytree(path, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    weights = load_file(file)
    del weights[deleted]
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(mii.ModelLoadError, match=reported) as err:
        mii.pipeline(str(tmp_path / "m"))
    assert "expert2.gate" not in str(err.value)  # only the missing part is reported


def test_qwen2_moe_layout_follows_transformers(moe_checkpoints, tokenizer):
    """Which layers are sparse, which slide, and the biases: as transformers builds them,
    also from an older config.json without ``layer_types``."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    for name in ("qwen2-moe", "qwen2-moe-window"):
        path, hf_model = moe_checkpoints(name)
        model = load(path)
        config = read_hf_config(path)
        hf_sparse = [isinstance(x.mlp, Qwen2MoeSparseMoeBlock) for x in hf_model.model.layers]
        assert [isinstance(x.mlp, SparseMoE) for x in model.model.layers] == hf_sparse
        hf_windows = tuple(
            hf_model.config.sliding_window if t == "sliding_attention" else None
            for t in hf_model.config.layer_types
        )
        assert tuple(x.self_attn.sliding_window for x in model.model.layers) == hf_windows
        assert model.spec.qkv_bias and not model.spec.o_bias
        legacy = {k: v for k, v in config.items() if k != "layer_types"}
        if not legacy.get("use_sliding_window"):
            legacy["sliding_window"] = 4096  # old configs keep a window they do not use
        assert qwen2_moe_spec(model.spec, legacy).layer_windows == hf_windows
    assert any(hf_windows) and not all(hf_windows)


def test_qwen2_moe_without_qkv_bias(tmp_path, tokenizer):
    config = qwen2_moe_config(tokenizer, qkv_bias=False)
    hf_model = hf_model_from_config(config, seed=3)
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["qkv_bias"] is False
    assert_matches_hf(tmp_path, hf_model, tokenizer, prompts=PROMPTS[:2], new_tokens=8)
