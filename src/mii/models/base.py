"""What every model family implements, and what the model runner hands it per step."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mii.models.layers import default_weight_loader
from mii.ops.attention import AttentionBatch


@dataclass
class ForwardContext:
    """Everything a forward pass needs besides token ids and positions."""

    batch: AttentionBatch
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (keys, values)


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the KV cache this model needs, per rank."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class CausalLM(nn.Module):
    """A decoder-only language model over a ragged, paged batch.

    Subclasses set ``stacked_params`` to map Hugging Face weight names onto fused
    parameters: ``(hf_fragment, our_fragment, shard_id)``.
    """

    stacked_params: ClassVar[tuple[tuple[str, str, Any], ...]] = ()
    ignored_weights: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    max_positions: int
    kv_spec: KVCacheSpec
    tied_embeddings: bool = False

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden states [T, D]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, D] -> float32 logits [S, V]."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face tensors into our parameters; returns the names filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if any(hf_name.endswith(s) for s in self.ignored_weights):
                continue
            name, shard_id = self.map_weight_name(hf_name)
            if name not in params:
                if self.tied_embeddings and name.startswith("lm_head."):
                    continue  # tied checkpoints sometimes still ship the head
                raise KeyError(hf_name)
            param = params[name]
            module_name, _, leaf = name.rpartition(".")
            module = self.get_submodule(module_name)
            tensor = tensor.to(param.dtype)
            if hasattr(module, "weight_loader"):
                module.weight_loader(leaf, param, tensor, shard_id)
            else:
                default_weight_loader(param, tensor)
            loaded.add(name if shard_id is None else f"{name}#{shard_id}")
        return loaded

    def map_weight_name(self, hf_name: str) -> tuple[str, Any]:
        for hf_fragment, our_fragment, shard_id in self.stacked_params:
            if hf_fragment in hf_name:
                return hf_name.replace(hf_fragment, our_fragment), shard_id
        return hf_name, None

    def expected_weight_names(self) -> set[str]:
        """Names ``load_weights`` must fill for the model to be complete."""
        shards: dict[str, list[Any]] = {}
        for _, ours, shard_id in self.stacked_params:
            shards.setdefault(ours, []).append(shard_id)
        expected: set[str] = set()
        for name, _ in self.named_parameters():
            fused = next((f for f in shards if f in name), None)
            if fused is None:
                expected.add(name)
            else:
                expected.update(f"{name}#{s}" for s in shards[fused])
        return expected
