"""What every model family implements, and what the model runner hands it per step."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from mii.models.checkpoint_tensor import materialize
from mii.models.layers import LMHead, VocabEmbedding, default_weight_loader
from mii.models.parallel import local_kv_heads
from mii.ops.attention import AttentionBatch
from mii.ops.fp8_linear import FP8_DTYPE


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions."""

    batch: AttentionBatch
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values)
    # [T] int64: each token's sequence length as length-dependent rope scalings
    # (longrope, dynamic NTK) see it, max(position + 1, prompt length). Only passed
    # to models that have such a scaling; None means position + 1 (decode tokens).
    rope_lens: torch.Tensor | None = None


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the KV cache this model needs, per rank."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class DecoderSizes:
    """The sizes a family's spec starts with (``LlamaSpec`` and ``PhiSpec`` extend
    it with their own settings, read from config.json by their ``from_hf``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


class AttentionSizes(Protocol):
    """What ``SelfAttention`` reads from a family's spec."""

    hidden_size: int
    num_heads: int  # query heads, over all ranks
    num_kv_heads: int  # key/value heads, over all ranks (= num_heads without GQA)
    head_dim: int


class ModelSpec(AttentionSizes, Protocol):
    """What ``CausalLM.set_spec`` reads from a family's spec."""

    num_layers: int
    max_positions: int
    tie_word_embeddings: bool


class CausalLM(nn.Module):
    """A decoder-only language model over a ragged, paged batch.

    Loading: every Hugging Face tensor goes through ``convert_weight`` (a hook
    for layouts that must be reordered), then ``weight_map`` renames it:
    entries ``(hf_fragment, our_fragment, shard_id)`` apply in order, renames
    (``shard_id`` None) all, and the first entry with a shard id says which
    part of a fused parameter the tensor fills. ``"packed"`` means the tensor
    holds every part, concatenated in order.
    """

    weight_map: ClassVar[tuple[tuple[str, str, Any], ...]] = ()
    ignored_weights: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    spec: Any  # the family's settings from config.json (a ModelSpec: LlamaSpec, ...)
    max_positions: int
    kv_spec: KVCacheSpec
    tied_embeddings: bool = False
    # The linear weights' quantization as loaded (models.quant_config's source:
    # "none", "fp8", "compressed-tensors", "fbgemm_fp8"), set by loader.build_model.
    weight_quantization: str = "none"
    lm_head: LMHead
    # Whether a decode forward can be captured in a CUDA graph (no host syncs inside).
    supports_cuda_graphs: ClassVar[bool] = True
    # A sequence that outgrows this length is recomputed from its first token
    # (Phi-3 longrope, as transformers' Phi-3 generate does); None: never.
    rope_recompute_at: int | None = None

    def set_spec(self, spec: ModelSpec) -> None:
        """Keep the family's settings and what the engine reads from them: the
        longest context, this rank's share of the KV cache and whether the head
        is tied."""
        self.spec = spec
        self.max_positions = spec.max_positions
        kv_heads = local_kv_heads(spec.num_kv_heads)
        self.kv_spec = KVCacheSpec(spec.num_layers, kv_heads, spec.head_dim)
        self.tied_embeddings = spec.tie_word_embeddings

    def make_lm_head(self, embedding: VocabEmbedding, bias: bool = False) -> LMHead:
        """The head back onto ``embedding``'s vocabulary; it shares the embedding
        matrix when the spec ties them (call ``set_spec`` first)."""
        tied_to = embedding if self.tied_embeddings else None
        return LMHead(embedding.hidden_size, embedding.vocab_size, bias=bias, tied_to=tied_to)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden states [T, D]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, D] -> float32 logits [S, V] (default: the ``lm_head``)."""
        return self.lm_head(hidden)

    def convert_weight(
        self, hf_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """Reorder a checkpoint tensor whose layout differs from ours (default: as is)."""
        yield hf_name, tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face tensors into our parameters; returns the (name, shard)
        keys filled, as in ``expected_weight_names``."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        reorders = type(self).convert_weight is not CausalLM.convert_weight
        for original_name, original in weights:
            if any(original_name.endswith(s) for s in self.ignored_weights):
                continue
            if reorders:  # the hook needs whole tensors
                original = materialize(original)
            for hf_name, tensor in self.convert_weight(original_name, original):
                name, shard_id = self.map_weight_name(hf_name)
                if name not in params:
                    if self.tied_embeddings and name.startswith("lm_head."):
                        continue  # tied checkpoints sometimes still ship the head
                    raise KeyError(f"unexpected weight {original_name!r} (mapped to {name!r})")
                param = params[name]
                module_name, _, leaf = name.rpartition(".")
                module = self.get_submodule(module_name)
                # A checkpoint tensor stays lazy only for a loader that narrows it to
                # this rank's slice (the copy into the parameter converts the dtype).
                if not (getattr(module, "reads_slices", False) and shard_id != "packed"):
                    tensor = materialize(tensor)
                    if param.dtype != FP8_DTYPE:  # float8 weights are quantized by their loader
                        tensor = tensor.to(param.dtype)
                if hasattr(module, "weight_loader"):
                    module.weight_loader(leaf, param, tensor, shard_id)
                else:
                    default_weight_loader(param, tensor)
                if shard_id == "packed":
                    loaded.update(_key(name, s) for s in _shards_of(module, leaf))
                else:
                    loaded.add(_key(name, shard_id))
        return loaded

    def map_weight_name(self, hf_name: str) -> tuple[str, Any]:
        name, shard = hf_name, None
        for hf_fragment, our_fragment, shard_id in self.weight_map:
            if hf_fragment not in name or (shard_id is not None and shard is not None):
                continue
            name = name.replace(hf_fragment, our_fragment)
            if shard_id is not None:
                shard = shard_id
        return name, shard

    def checkpoint_weight_name(self, key: str) -> str:
        """The checkpoint's name for a (name, shard) key of ``expected_weight_names``,
        as ``weight_map`` renames it (for messages: "lacks up_proj.weight_scale", not
        our fused parameter's shard); a key whose shard the map does not name (an MoE
        expert's part: ``mlp.w13#expert2.up``) is returned as it is."""
        name, _, shard = key.partition("#")
        for hf_fragment, our_fragment, shard_id in reversed(self.weight_map):
            if our_fragment not in name:
                continue
            if shard_id is not None:
                if shard_id != "packed" and str(shard_id) != shard:
                    continue
                shard = ""  # one checkpoint tensor: this shard's, or the packed one
            name = name.replace(our_fragment, hf_fragment)
        return key if shard else name

    def expected_weight_names(self) -> set[str]:
        """Every (name, shard) key that ``load_weights`` must fill."""
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            expected.update(_key(name, s) for s in _shards_of(module, leaf))
        return expected


def _shards_of(module: nn.Module, leaf: str) -> list[Any]:
    """The shard ids a fused parameter is loaded from ([None] for a plain one)."""
    if hasattr(module, "weight_shards"):
        return module.weight_shards(leaf)
    return [None]


def _key(name: str, shard_id: Any) -> str:
    return name if shard_id is None else f"{name}#{shard_id}"
