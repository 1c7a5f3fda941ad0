"""One GGUF file -> one Hugging Face checkpoint directory (config, tokenizer,
safetensors), through the ``gguf`` package and transformers' GGUF support.

transformers reads the metadata (architecture -> config, vocabulary -> tokenizer,
chat template) and maps GGUF tensor names to its own, undoing llama.cpp's
reordering of the query and key rows; ``gguf.dequantize`` expands each tensor.
We reuse both rather than parse the format ourselves, so that a converted
checkpoint is exactly what ``from_pretrained(dir, gguf_file=...)`` builds, and we
stream the tensors into safetensors shards instead of holding the whole
dequantized model in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mii.errors import ModelLoadError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'mii[gguf]' (or: pip install gguf)"
# A shard is written once this many bytes of tensors are waiting: bounds memory.
SHARD_BYTES = 2 << 30


def require_gguf():
    """The ``gguf`` package, or an error saying how to install it."""
    try:
        import gguf
    except ImportError:
        raise ModelLoadError(
            f"loading a GGUF file needs the gguf package: {INSTALL_HINT}"
        ) from None
    return gguf


def open_gguf(path: Path):
    """A ``GGUFReader`` over ``path``; ModelLoadError when the file is not a whole GGUF file."""
    gguf = require_gguf()
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises whatever numpy raises on short data
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (truncated or corrupt?): {type(err).__name__}: {err}"
        ) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        # numpy slices of the memory map silently come back short on a truncated file.
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise ModelLoadError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, the file has {size} bytes"
            )
    return reader


def architecture(reader, path: Path) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture in its GGUF metadata")
    return str(field.contents())


def check_quantization_types(reader, path: Path) -> None:
    """One clear error naming every tensor type that cannot be dequantized."""
    gguf = require_gguf()
    unsupported: dict[str, str] = {}
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        if qtype.name in unsupported or _can_dequantize(gguf, qtype):
            continue
        unsupported[qtype.name] = tensor.name
    if unsupported:
        names = ", ".join(f"{t} (e.g. tensor {n!r})" for t, n in unsupported.items())
        raise UnsupportedModelError(
            f"{path} uses GGUF quantization type(s) that mii cannot dequantize: {names}. "
            "Supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K and the IQ types; "
            "re-quantize the model to one of them."
        )


_DEQUANTIZABLE: dict[int, bool] = {}


def _can_dequantize(gguf, qtype) -> bool:
    if int(qtype) not in _DEQUANTIZABLE:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        try:  # one zero block: the package's own answer, not a list kept here
            gguf.dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
            _DEQUANTIZABLE[int(qtype)] = True
        except NotImplementedError:
            _DEQUANTIZABLE[int(qtype)] = False
    return _DEQUANTIZABLE[int(qtype)]


def hf_config(path: Path, arch: str):
    """transformers' config of the GGUF file; UnsupportedModelError for an architecture
    that transformers or mii lacks."""
    from transformers import AutoConfig

    from mii.models.registry import MODEL_REGISTRY

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except ValueError as err:
        if "not supported" in str(err):
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} of {path} is not supported (transformers: {err})"
            ) from None
        raise ModelLoadError(f"could not read the GGUF metadata of {path}: {err}") from None
    if config.model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} of {path} (model_type {config.model_type!r}) is not "
            f"supported by mii; supported model types: {', '.join(sorted(MODEL_REGISTRY))}"
        )
    return config


@dataclass
class GgufSource:
    """A GGUF file that passed every check: readable, whole, supported."""

    path: Path
    reader: Any  # gguf.GGUFReader
    arch: str  # general.architecture
    config: Any  # transformers PretrainedConfig


def inspect(path: Path) -> GgufSource:
    """Read and check ``path`` (without writing anything): ModelLoadError for a file
    that is not a whole GGUF file, UnsupportedModelError for what mii cannot load."""
    reader = open_gguf(path)
    arch = architecture(reader, path)
    config = hf_config(path, arch)
    check_quantization_types(reader, path)
    return GgufSource(path, reader, arch, config)


def convert(source: GgufSource, out: Path) -> None:
    """Write the checkpoint of ``source`` into the (empty) directory ``out``."""
    path, config = source.path, source.config
    _write_tokenizer(path, out)
    _write_weights(source.reader, source.arch, config, out)
    config_dict = config.to_dict()
    # Dequantized values are float32 (Q4_1 * its scale is no float16); "auto"
    # loads them as such. Pass dtype= for a smaller engine.
    config_dict["torch_dtype"] = config_dict["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
    stat = path.stat()
    origin = {"gguf_file": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out / "gguf_source.json").write_text(json.dumps(origin, indent=2))


def _write_tokenizer(path: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:
        raise ModelLoadError(f"could not build a tokenizer from {path}: {err}") from None
    tokenizer.save_pretrained(str(out))


def _write_weights(reader, arch: str, config, out: Path) -> None:
    """Dequantize tensor by tensor into safetensors shards (float16 / bfloat16 tensors
    keep their type, everything else becomes float32: both lossless)."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    gguf = require_gguf()
    with torch.device("meta"):  # only the parameter names: no memory
        meta_model = AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    with _memoized(gguf, "get_tensor_name_map"):
        names = get_gguf_hf_weights_map(meta_model, processor)
    qtypes = gguf.GGMLQuantizationType
    keep = {qtypes.F16: torch.float16, qtypes.BF16: torch.bfloat16}
    # Processors of MoE models assemble stacked expert tensors here over several calls.
    parsed: dict[str, Any] = {"config": config.to_dict(), "tensors": {}}
    shards = _ShardWriter(out)
    for tensor in reader.tensors:
        weights = gguf.dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name not in names:
            continue
        value = torch.from_numpy(np.array(result.weights, dtype=np.float32))  # a copy: writable
        shards.add(names[result.name], value.to(keep.get(tensor.tensor_type, torch.float32)))
    for name, value in parsed["tensors"].items():
        shards.add(name, value.float().contiguous())
    shards.close()


@contextlib.contextmanager
def _memoized(module, name: str) -> Iterator[None]:
    """``module.name`` cached for the duration: transformers rebuilds gguf's tensor-name
    table once per submodule (hundreds of times, seconds), always with the same arguments."""
    original = getattr(module, name)
    setattr(module, name, functools.lru_cache(maxsize=None)(original))
    try:
        yield
    finally:
        setattr(module, name, original)


class _ShardWriter:
    """Safetensors shards of at most about SHARD_BYTES, plus the index transformers reads."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        self.pending[name] = value
        self.pending_bytes += value.numel() * value.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self.files) == 1:  # the usual name of a one-file checkpoint
            (self.out / self.files[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {key: file for file, keys in self.files for key in keys}
        index = {"metadata": {}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
