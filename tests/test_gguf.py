"""GGUF files load through mii: greedy tokens equal transformers loading the same
file, the converted checkpoint is cached, and bad files get one clear error and
leave nothing in the cache."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mii
from gguf_files import write_gguf

PROMPTS = ["DeepSpeed is", "The quick brown fox"]
NEW_TOKENS = 12
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh mii cache directory; returns its gguf/ folder."""
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MII_GGUF_CACHE_DIR", raising=False)  # conftest shares one
    return tmp_path / "cache" / "gguf"


def hf_from_gguf(path: str):
    """transformers' own loading of the file: the oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.mark.parametrize("qtype", QTYPES)
def test_gguf_greedy_matches_transformers(gguf_files, qtype, cache):
    path = str(gguf_files(qtype)[0])
    hf_model, hf_tokenizer = hf_from_gguf(path)
    with mii.pipeline(path, device="cpu") as pipe:
        assert pipe.engine.core.dtype == torch.float32  # dequantized values are float32
        for prompt in PROMPTS:
            ids = hf_tokenizer(prompt).input_ids
            with torch.no_grad():
                # The end tokens mii read from the file: some transformers versions
                # leave them out of a GGUF model's generation config (5.17 did, and
                # went on past an EOS that mii stopped at).
                out = hf_model.generate(
                    torch.tensor([ids]),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    eos_token_id=pipe.engine.core.eos_token_ids,
                )
            [response] = pipe([prompt], do_sample=False, max_new_tokens=NEW_TOKENS)
            assert response.prompt_length == len(ids), "the file's tokenizer"
            assert response.token_ids == out[0, len(ids) :].tolist(), (qtype, prompt)
        # The chat template came from the file too.
        assert pipe.engine.tokenizer.chat_template.startswith("{% for message in messages %}")


def test_second_load_uses_the_cache(gguf_files, cache, monkeypatch, capsys):
    from mii.models import gguf_convert
    from mii.models.loader import resolve_model_dir

    path = str(gguf_files("Q8_0")[0])
    first = resolve_model_dir(path)
    assert first.parent == cache and (first / "config.json").is_file()
    # The conversion (minutes for a large file) is said, once: it looked like a hang.
    said = capsys.readouterr().err
    assert f"[mii] converting {Path(path).name} once into {first}" in said, said
    assert "[mii] converted in" in said

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_convert, "convert", no_conversion)
    assert resolve_model_dir(path) == first
    with mii.pipeline(path, device="cpu") as pipe:
        assert pipe(PROMPTS[0], max_new_tokens=2)[0].generated_length >= 1
    assert "converting" not in capsys.readouterr().err
    # A changed file is a new entry (the key includes its size and mtime).
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    try:
        with pytest.raises(AssertionError, match="converted again"):
            resolve_model_dir(path)
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sorted(p.name for p in cache.iterdir()) == [first.name]  # no temporary, no lock


def test_gguf_cache_dir_holds_the_conversions_apart_from_the_mii_cache(
    gguf_files, cache, tmp_path, monkeypatch
):
    """MII_GGUF_CACHE_DIR: conversions there (shared by deployments whose
    MII_CACHE_DIR differ), none under MII_CACHE_DIR/gguf; empty counts as unset."""
    from mii.models.loader import resolve_model_dir

    path = str(gguf_files("Q8_0")[0])
    shared = tmp_path / "shared-conversions"
    monkeypatch.setenv("MII_GGUF_CACHE_DIR", str(shared))
    first = resolve_model_dir(path)
    assert first.parent == shared and (first / "config.json").is_file()
    assert not cache.exists()
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path / "another-cache"))
    assert resolve_model_dir(path) == first  # the same entry, not a second conversion
    monkeypatch.setenv("MII_GGUF_CACHE_DIR", "")
    assert resolve_model_dir(path).parent == tmp_path / "another-cache" / "gguf"


def assert_nothing_cached(cache) -> None:
    """Not even an empty gguf/ folder, a lock file or a temporary directory."""
    left = sorted(str(p) for p in cache.parent.rglob("*")) if cache.parent.exists() else []
    assert left == [], f"left in the mii cache: {left}"


def test_unsupported_quantization_type_is_named(tmp_path, checkpoints, cache):
    """Q8_K is a type llama.cpp uses only for intermediate results: nothing dequantizes it."""
    import gguf

    path, model = checkpoints("llama")
    file = write_gguf(tmp_path / "q8k.gguf", model, path, "F32")
    # Re-write one matrix as Q8_K blocks (the bytes do not matter: it is refused first).
    reader = gguf.GGUFReader(str(file))
    writer = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            writer.add_key_value(field.name, field.contents(), field.types[0], field.types[-1])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]
    for tensor in reader.tensors:
        data = np.array(tensor.data).reshape(tuple(reversed(tensor.shape.tolist())))
        if tensor.name == "blk.0.ffn_up.weight":  # [128, 64] -> 64 is no multiple of 256
            data = np.zeros((data.shape[0] * data.shape[1] // block, size), dtype=np.uint8)
            writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.Q8_K)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(mii.UnsupportedModelError, match=r"Q8_K.*blk\.0\.ffn_up\.weight"):
        mii.pipeline(str(tmp_path / "bad.gguf"), device="cpu")
    assert_nothing_cached(cache)


def test_unsupported_architecture_is_named(tmp_path, checkpoints, cache):
    path, model = checkpoints("llama")
    for arch in ("rwkv6", "bloom"):  # unknown to transformers; known to it but not to mii
        file = write_gguf(tmp_path / f"{arch}.gguf", model, path, "F32", arch=arch)
        with pytest.raises(mii.UnsupportedModelError, match=f"GGUF architecture '{arch}'"):
            mii.pipeline(str(file), device="cpu")
    assert_nothing_cached(cache)


def test_truncated_or_corrupt_file_is_refused(tmp_path, gguf_files, cache):
    source = gguf_files("Q8_0")[0]
    data = source.read_bytes()
    cases = {
        "half.gguf": (data[: len(data) // 2], "truncated"),
        "header.gguf": (data[:200], "not a valid GGUF file"),
        "text.gguf": (b"not a model at all\n" * 10, "not a GGUF file"),
        "empty.gguf": (b"", "not a GGUF file"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(mii.ModelLoadError, match=message):
            mii.pipeline(str(tmp_path / name), device="cpu")
        assert_nothing_cached(cache)
    with pytest.raises(mii.ModelLoadError, match="does not exist"):
        mii.pipeline(str(tmp_path / "missing.gguf"), device="cpu")


def test_a_failed_conversion_leaves_no_half_written_entry(gguf_files, cache, monkeypatch):
    from mii.models import gguf_convert

    def fail_while_writing(reader, arch, config, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "_write_weights", fail_while_writing)
    with pytest.raises(KeyboardInterrupt):
        mii.pipeline(str(gguf_files("F16")[0]), device="cpu")
    assert_nothing_cached(cache)


def test_missing_gguf_package_says_how_to_install(gguf_files, cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(mii.ModelLoadError, match=r"pip install 'mii\[gguf\]'"):
        mii.pipeline(str(gguf_files("F32")[0]), device="cpu")
    assert_nothing_cached(cache)


def test_gguf_tokenizer_option(gguf_files, cache, tmp_path):
    """``tokenizer=`` may name a .gguf file too (its converted tokenizer)."""
    path, checkpoint_dir = gguf_files("F32")
    plain = tmp_path / "weights-only"
    shutil.copytree(checkpoint_dir, plain)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (plain / name).unlink(missing_ok=True)
    with mii.pipeline(str(plain), tokenizer=str(path), device="cpu") as pipe:
        assert pipe.engine.tokenizer.chat_template is not None


def test_concurrent_loaders_share_one_conversion(gguf_files, cache, monkeypatch):
    """A deployment's replicas and gateway convert the same file at once: one converts
    (holding the lock), the others wait and reuse its entry."""
    import threading

    from mii.models import gguf_convert
    from mii.models.gguf import gguf_checkpoint_dir

    original, calls, started = gguf_convert.convert, [], threading.Event()

    def counted(source, out):
        calls.append(out)
        started.set()
        return original(source, out)

    monkeypatch.setattr(gguf_convert, "convert", counted)
    path = str(gguf_files("Q4_0")[0])
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(gguf_checkpoint_dir(path)))]
    threads[0].start()
    assert started.wait(60)  # the first one holds the lock now
    threads.append(threading.Thread(target=lambda: results.append(gguf_checkpoint_dir(path))))
    threads[1].start()
    for thread in threads:
        thread.join(120)
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
    assert sorted(p.name for p in cache.iterdir()) == [results[0].name]


def test_temporaries_of_killed_converters_are_removed(gguf_files, cache):
    """A converter killed mid-way (no Python cleanup) leaves a temporary directory;
    the next conversion removes it, and never uses it as an entry."""
    import subprocess

    from mii.models.gguf import gguf_checkpoint_dir

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    stale = cache / f".tmp-tiny-Q4_1-0123456789abcdef-{dead.stdout.strip()}-deadbeef"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    entry = gguf_checkpoint_dir(str(gguf_files("Q4_1")[0]))
    assert sorted(p.name for p in cache.iterdir()) == [entry.name]
