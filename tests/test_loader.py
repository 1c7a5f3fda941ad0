"""Model loading: local paths, hub ids offline, formats, dtypes and clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import mii
from helpers import PROMPTS, hf_greedy, save_checkpoint, tiny_config
from mii.models.loader import build_model, read_hf_config


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(mii.ModelLoadError, match="not a directory"):
        mii.pipeline(str(tmp_path / "nope"))


def test_hub_id_without_connection_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(mii.ModelLoadError, match="neither a local directory nor downloadable"):
        mii.pipeline("some-org/some-model-that-is-not-cached")


def test_unsupported_model_type_lists_supported(tmp_path, llama):
    shutil.copytree(llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt_bigcode"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        mii.UnsupportedModelError,
        match=r"gpt_bigcode.*supported model types: .*llama.*mistral.*qwen2",
    ):
        mii.pipeline(str(tmp_path / "m"))


def test_config_missing_a_field_the_family_needs_names_it(tmp_path, llama):
    shutil.copytree(llama, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["num_attention_heads"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(mii.ModelLoadError, match=r"lacks the field 'num_attention_heads'"):
        mii.pipeline(str(tmp_path / "m"))


def test_folder_holding_only_a_gguf_names_the_file_to_pass(tmp_path):
    """A folder with a .gguf but no config.json said only "no config.json" (trial):
    the error now names the file to pass instead."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model-Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(mii.ModelLoadError, match=r"holds model-Q8_0\.gguf; pass the \.gguf file"):
        mii.pipeline(str(tmp_path / "m"))


def test_directory_without_weights(tmp_path, llama):
    shutil.copytree(llama, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(mii.ModelLoadError, match="no weight files"):
        mii.pipeline(str(tmp_path / "m"))


def test_broken_files_are_named(tmp_path, llama):
    """A config.json that is not JSON raised a bare JSONDecodeError, and a truncated
    safetensors file the library's own SafetensorError, neither naming the file
    (user trial); an empty model name read as the current directory."""
    shutil.copytree(llama, tmp_path / "m")
    config_file = tmp_path / "m" / "config.json"
    good = config_file.read_text()
    for broken, message in (("{", "is not valid JSON"), ("[1, 2]", "must hold a JSON object")):
        config_file.write_text(broken)
        with pytest.raises(mii.ModelLoadError, match=f"{re.escape(str(config_file))}.*{message}"):
            mii.pipeline(str(tmp_path / "m"))
    config_file.write_text(good)
    generation_file = tmp_path / "m" / "generation_config.json"
    generation_file.write_text('{"eos_token_id": ')
    with pytest.raises(
        mii.ModelLoadError, match=f"{re.escape(str(generation_file))} is not valid JSON"
    ):
        mii.pipeline(str(tmp_path / "m"))
    generation_file.unlink()
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        mii.ModelLoadError, match=f"cannot read the weight file {re.escape(str(weights))}"
    ):
        mii.pipeline(str(tmp_path / "m"))
    with pytest.raises(mii.InvalidRequestError, match="'model'"):
        mii.pipeline("")


def test_a_corrupt_bin_checkpoint_is_named_and_an_old_format_one_loads(tmp_path, llama):
    """A .bin that is not a checkpoint names the file; one saved in torch's pre-1.6
    format (not memory-mappable) loads, read whole (review: it was called corrupt)."""
    from safetensors.torch import load_file

    shutil.copytree(llama, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    weights = tmp_path / "m" / "pytorch_model.bin"
    weights.write_bytes(b"not a zip archive")
    with pytest.raises(
        mii.ModelLoadError, match=f"cannot read the weight file {re.escape(str(weights))}"
    ):
        mii.pipeline(str(tmp_path / "m"))
    state = load_file(Path(llama) / "model.safetensors")
    torch.save(state, weights, _use_new_zipfile_serialization=False)
    with mii.pipeline(str(tmp_path / "m")) as pipe, mii.pipeline(str(llama)) as reference:
        assert pipe(PROMPTS[1], do_sample=False, max_new_tokens=6)[0].token_ids == (
            reference(PROMPTS[1], do_sample=False, max_new_tokens=6)[0].token_ids
        )


def test_missing_tensor_is_named(tmp_path, llama):
    from safetensors.torch import load_file, save_file

    shutil.copytree(llama, tmp_path / "m")
    file = tmp_path / "m" / "model.safetensors"
    weights = load_file(file)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, file, metadata={"format": "pt"})
    # by the checkpoint's name, not our fused parameter's ("gate_up_proj.weight#1")
    with pytest.raises(
        mii.ModelLoadError, match=r"lacks weights for: model\.layers\.1\.mlp\.up_proj\.weight$"
    ):
        mii.pipeline(str(tmp_path / "m"))


def test_pytorch_bin_checkpoint_matches_hf(tmp_path, tokenizer):
    config = tiny_config("llama", tokenizer)
    hf_model = save_checkpoint(tmp_path, config, tokenizer, seed=5, safetensors=False)
    assert list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.safetensors"))
    with mii.pipeline(str(tmp_path)) as pipe:
        [r] = pipe(PROMPTS[1], do_sample=False, max_new_tokens=12)
    assert r.token_ids == hf_greedy(hf_model, tokenizer, PROMPTS[1], 12)


def test_bin_files_refuse_pickled_code(tmp_path, llama):
    """``.bin`` files go through torch.load(weights_only=True): no arbitrary objects."""
    shutil.copytree(llama, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(
        {"model.norm.weight": torch.ones(64), "evil": EvilPayload()},
        tmp_path / "m" / "pytorch_model.bin",
    )
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        mii.pipeline(str(tmp_path / "m"))
    assert not EvilPayload.ran


class EvilPayload:
    ran = False

    def __reduce__(self):
        return (EvilPayload._run, ())

    @staticmethod
    def _run():
        EvilPayload.ran = True
        return "boom"


def test_dummy_load_format_needs_only_config_and_tokenizer(tmp_path, llama):
    shutil.copytree(llama, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    with mii.pipeline(str(tmp_path / "m"), load_format="dummy") as pipe:
        [r] = pipe(PROMPTS[0], max_new_tokens=6, ignore_eos=True)
    assert r.generated_length == 6


def test_dummy_weights_have_real_shapes(llama):
    path = llama
    from pathlib import Path

    config = read_hf_config(Path(path))
    model = build_model(config, None, torch.float32, torch.device("cpu"), load_format="dummy")
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == (64 + 2 * 32, 64)  # 4 query heads and 2 KV heads of 16
    assert qkv.std() > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_option(llama, dtype):
    with mii.pipeline(llama, dtype=dtype) as pipe:
        params = list(pipe.engine.core.model.parameters())
        assert all(p.dtype == getattr(torch, dtype) for p in params)
        [r] = pipe(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
        assert r.generated_length == 4


def test_bad_engine_option_names_the_field(llama):
    with pytest.raises(mii.InvalidRequestError, match="kv_block_sizes"):
        mii.pipeline(llama, kv_block_sizes=8)
    with pytest.raises(mii.InvalidRequestError, match="dtype"):
        mii.pipeline(llama, dtype="float8")
