"""The serving benchmark's workload and metrics (benchmarks/serving_load.py), without
a deployment: exact prompt token counts, lengths clipped to the model, the FastGen
effective-throughput rule and the SSE chunk reader."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks.serving_load import (  # noqa: E402
    HttpSender,
    PromptMaker,
    Request,
    Timing,
    clipped_lengths,
    is_effective,
    request_set,
    summarize,
)


@pytest.fixture(scope="module")
def maker() -> PromptMaker:
    from mii.demo import _CORPUS, train_tokenizer

    return PromptMaker(train_tokenizer(_CORPUS.splitlines() * 4))


def test_lengths_fit_the_model():
    pairs = clipped_lengths(random.Random(0), 2600, 60, 500, max_length=4096, low=2)
    assert all(p + g <= 4096 and p >= 2 and g >= 1 for p, g in pairs)
    assert max(p for p, _ in pairs) > 3900  # N(2600, 780) reaches the clip at 500 draws


def test_prompts_have_exact_token_counts(maker):
    lengths = clipped_lengths(random.Random(1), 40, 8, 30, max_length=64, low=maker.min_tokens)
    requests = request_set(maker, lengths, seed=3)
    for request, (prompt_len, gen) in zip(requests, lengths):
        assert request.prompt_tokens == prompt_len == maker.count(request.prompt)
        assert request.max_new_tokens == gen
        assert not any(t in request.prompt for t in ("<s>", "</s>", "<pad>"))


def timing(sent: float, first: float, gaps: list[float], prompt: int) -> Timing:
    stamps = [sent + first]
    for gap in gaps:
        stamps.append(stamps[-1] + gap)
    return Timing(sent, stamps, prompt, len(stamps), done=stamps[-1])


def test_effective_and_summary():
    fast = timing(0.0, 0.5, [0.05] * 9, prompt=1024)  # TTFT 0.5 s <= 2 s, 20 tok/s
    late = timing(0.0, 2.5, [0.05] * 9, prompt=1024)  # first token after 1024/512 s
    slow = timing(0.0, 0.5, [0.3] * 9, prompt=1024)  # 3.3 tok/s < 4
    failed = Timing(0.0, error="boom", done=1.0)
    assert [is_effective(t) for t in (fast, late, slow)] == [True, False, False]
    requests = [Request("x", 1024, 10)] * 4
    row = summarize(2.0, requests, 0.0, [fast, late, slow, failed])
    assert (row["completed"], row["failed"], row["errors"]) == (3, 1, ["boom"])
    wall = slow.done
    assert row["served_rps"] == round(3 / wall, 2)
    assert row["effective_rps"] == round(1 / wall, 2)
    assert row["ttft_ms"] == {"p50": 500.0, "p99": 2500.0}
    assert row["prompt_tokens_off"] == 0


def test_sse_chunks():
    t = Timing()
    HttpSender.read_chunk({"choices": [{"text": "", "finish_reason": None}], "usage": None}, t)
    assert t.stamps == []  # no text: nothing arrived for the user yet
    HttpSender.read_chunk({"choices": [{"text": " a", "finish_reason": None}], "usage": None}, t)
    HttpSender.read_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}, t)
    assert (len(t.stamps), t.prompt_tokens, t.generated, t.error) == (1, 7, 3, None)
    HttpSender.read_chunk({"error": {"message": "too long"}}, t)
    assert t.error == "too long"


def test_the_prompt_tokenizer_of_a_gguf_file(gguf_files, tmp_path, monkeypatch):
    """--model takes what mii takes, a .gguf file too: its prompts are tokenized by
    the converted checkpoint's tokenizer (AutoTokenizer cannot read the file)."""
    from benchmarks.serving import prompt_tokenizer
    from transformers import AutoTokenizer

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    path, checkpoint_dir = gguf_files("F32")
    expected = AutoTokenizer.from_pretrained(checkpoint_dir)
    tokenizer = prompt_tokenizer(str(path))
    assert tokenizer("Seattle is a city").input_ids == expected("Seattle is a city").input_ids
    assert prompt_tokenizer(str(checkpoint_dir)).vocab_size == expected.vocab_size


def test_fp8_options_reach_the_deployment_and_offline_engine():
    import argparse

    from benchmarks.serving import model_and_options

    base = dict(model="/x", token_budget=None, max_num_seqs=None, short_prompt_reserve=None)
    args = argparse.Namespace(**base, quantization="fp8", kv_cache_dtype="fp8")
    assert model_and_options(args) == ("/x", {"quantization": "fp8", "kv_cache_dtype": "fp8"})
    args = argparse.Namespace(**base, quantization="none", kv_cache_dtype="auto")
    assert model_and_options(args) == ("/x", {})
    args = argparse.Namespace(**{**base, "short_prompt_reserve": 0}, quantization="none",
                              kv_cache_dtype="auto")  # fmt: skip
    assert model_and_options(args) == ("/x", {"short_prompt_reserve": 0})
