"""Tiny checkpoints built with transformers itself, and the Hugging Face oracle."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from mii.demo import _CORPUS, train_tokenizer
from mii.ops.attention import AttentionBatch

PROMPTS = [
    "DeepSpeed is",
    "Seattle is a city on the west coast of the United States, known for rain",
    "The quick brown fox",
    "A blocked KV cache stores attention keys in fixed-size blocks, allocated as sequences grow. "
    "Continuous batching lets requests join",
    "Unicode: café 東京 😀",
]


def make_tokenizer():
    return train_tokenizer(_CORPUS.splitlines() * 4, vocab_size=400)


def tiny_config_kwargs(tokenizer, **overrides) -> dict:
    """Keyword arguments of a small Llama-like config whose logits are far from ties
    (large init scale); ``overrides`` replace or extend them."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
        tie_word_embeddings=False,
    )
    return {**common, **overrides}


def tiny_config(family: str, tokenizer, **overrides):
    """A small config of ``family`` whose logits are far from ties (large init scale)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**tiny_config_kwargs(tokenizer, **overrides))


def randomise_vectors(model, generator: torch.Generator) -> None:
    """Add noise to every 1-D parameter. HF initialises norms to 1 and biases to 0;
    make them random so that a misplaced or dropped one changes the answer."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def save_checkpoint(
    path: Path,
    config,
    tokenizer,
    seed: int = 0,
    safetensors: bool = True,
    vector_noise: int | torch.Generator | None = None,
):
    """Save a random-weight model of ``config`` as a Hugging Face checkpoint; return the model.

    ``vector_noise`` randomises the norms and biases too (see ``randomise_vectors``): an
    int seeds a fresh generator, a generator (``torch.default_generator`` for the global
    one) is drawn from as it is."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    if vector_noise is not None:
        if isinstance(vector_noise, int):
            vector_noise = torch.Generator().manual_seed(vector_noise)
        randomise_vectors(model, vector_noise)
    if safetensors:
        model.save_pretrained(path)
    else:  # the older PyTorch format (transformers 5 only writes safetensors)
        config.save_pretrained(path)
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    tokenizer.save_pretrained(path)
    return model


def checkpoint_cache(tmp_path_factory, tokenizer, prefix: str, make_config, **save_options):
    """name -> (path, HF model) of ``save_checkpoint(make_config(name))``, each built on
    first use."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"{prefix}-{name}")
            model = save_checkpoint(path, make_config(name), tokenizer, **save_options)
            cache[name] = (path, model)
        return cache[name]

    return get


def _hf_generate(model, tokenizer, prompt: str, max_new_tokens: int, **options):
    """transformers' greedy ``generate`` on ``prompt``; returns the prompt ids and its output."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **options,
        )
    return ids, out


def hf_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation from transformers (stops at EOS like mii does)."""
    ids, out = _hf_generate(
        model, tokenizer, prompt, max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    return out[0, ids.shape[1] :].tolist()


# Engine options that split prompts over many passes and force preemption.
TIGHT_OPTIONS = dict(token_budget=6, max_num_seqs=4, kv_block_size=4, num_kv_blocks=24)


def assert_greedy_margins(hf_model, tokenizer, prompts=PROMPTS, new_tokens: int = 24):
    """The oracle is only meaningful if every greedy pick wins by a margin that
    float reordering cannot overturn."""
    for prompt in prompts:
        _, out = _hf_generate(
            hf_model,
            tokenizer,
            prompt,
            new_tokens,
            output_logits=True,
            return_dict_in_generate=True,
        )
        top2 = torch.cat(out.logits).topk(2, dim=-1).values
        # mii and HF differ only by float32 rounding, far below this margin.
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, prompt


def assert_matches_hf(
    model_dir,
    hf_model,
    tokenizer,
    prompts=PROMPTS,
    new_tokens: int = 24,
    expect_preemption=False,
    **engine_options,
):
    """Greedy tokens from mii on ``model_dir`` equal transformers' ``generate`` for
    every prompt, run as one mixed batch. Returns the engine stats."""
    import mii

    with mii.pipeline(str(model_dir), **engine_options) as pipe:
        responses = pipe(prompts, do_sample=False, max_new_tokens=new_tokens)
        for prompt, response in zip(prompts, responses):
            expected = hf_greedy(hf_model, tokenizer, prompt, new_tokens)
            assert response.token_ids == expected, prompt
            assert response.generated_text == tokenizer.decode(expected, skip_special_tokens=True)
            assert response.prompt_length == len(tokenizer(prompt).input_ids)
            want = "stop" if expected[-1] == tokenizer.eos_token_id else "length"
            assert response.finish_reason == want
        stats = pipe.engine.stats()
    if expect_preemption:
        assert stats["preemptions"] > 0, "the KV pool was meant to force preemption"
    assert stats["free_blocks"] == pipe.engine.core.blocks.num_blocks
    return stats


def ragged_paged_batch(shapes, block_size: int, free: list[int]):
    """A ragged batch over a paged KV cache: ``shapes`` lists (tokens already cached,
    new tokens) per sequence, whose blocks are popped from ``free`` in turn. Returns the
    ``AttentionBatch`` and each sequence's block table."""
    tables, slots, cu = [], [], [0]
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range((total + block_size - 1) // block_size)]
        tables.append(table)
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(cached, total)
        ]
        cu.append(cu[-1] + new)
    width = max(map(len, tables))
    batch = AttentionBatch(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n in shapes], dtype=torch.int32),
        query_lens_host=[n for _, n in shapes],
        seq_lens_host=[c + n for c, n in shapes],
    )
    return batch, tables


def replica_token(pid: int) -> str:
    """The internal token that replica process ``pid``'s port requires: it is in
    the replica's environment, readable by the same user (tests call replicas
    directly with it)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    prefix = b"MII_REPLICA_TOKEN="
    return next(v[len(prefix) :] for v in environ if v.startswith(prefix)).decode()


def replica_client(address: str, pid: int):
    """A MiiClient of replica process ``pid`` at ``address`` that proves the replica's
    token on every call, as its deployment's pool does (mii.rpc.auth.call_proof)."""
    from mii.rpc import auth, mii_pb2_grpc
    from mii.rpc.client import MiiClient

    client = MiiClient(address)
    client._channel.close()
    client._channel = auth.channel(address, replica_token(pid), proof=True)
    client._open_stub = mii_pb2_grpc.MiiStub(client._channel)
    return client


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` seconds passed (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are already gone
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@dataclass
class Served:
    """A deployment of a test model with its REST API on, and clients of it."""

    client: Any  # mii.rpc.client.MiiClient
    name: str  # the deployment's name
    model: str  # the model path it serves
    url: str  # http://127.0.0.1:PORT
    oai: Any  # openai.OpenAI on url/v1
    http: Any  # httpx.Client on url


@contextmanager
def served_deployment(model_path: str, cache_dir: Path, prefix: str, **options) -> Iterator[Served]:
    """``mii.serve`` of ``model_path`` on free loopback ports (REST on), with
    ``MII_CACHE_DIR`` set to ``cache_dir`` while it lives (its registry record is
    there); the deployment is terminated and the clients closed on exit."""
    import httpx
    import openai
    import pytest

    import mii
    from mii.rpc.deployment import free_port

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rest_port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(cache_dir))
        client = mii.serve(
            model_path,
            deployment_name=name,
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=free_port(),
            **options,
        )
        url = f"http://127.0.0.1:{rest_port}"
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        http = httpx.Client(base_url=url, timeout=60)
        try:
            yield Served(client, name, model_path, url, oai, http)
        finally:
            http.close()
            oai.close()
            client.terminate_server()


class SseStream(threading.Thread):
    """An SSE completion read to its end in a thread; ``started`` once the first
    event came."""

    def __init__(self, url: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens = url, max_tokens
        self.started = threading.Event()
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        body = {"prompt": PROMPTS[0], "max_tokens": self.max_tokens, "ignore_eos": True}
        try:
            with httpx.stream(
                "POST", f"{self.url}/v1/completions", json={**body, "stream": True}, timeout=60
            ) as response:
                for line in response.iter_lines():
                    if line:
                        self.events.append(line)
                        self.started.set()
        except BaseException as err:  # handed to the test
            self.error = err
        self.started.set()
