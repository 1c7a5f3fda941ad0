"""From a model name to a ready model: find the files, read the config, build the
architecture without allocating twice, and fill it with weights.

Weights come from safetensors, or from ``.bin`` files read with
``torch.load(weights_only=True)`` only; ``load_format="dummy"`` fills the real
architecture with random values (for benchmarks) and reads no weight file.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mii.errors import InvalidRequestError, MiiError, ModelLoadError
from mii.models.base import CausalLM
from mii.models.checkpoint_tensor import LazyTensor
from mii.models.gguf import gguf_checkpoint_dir, is_gguf_path
from mii.models.quant_config import missing_scales_hint, weight_quantization
from mii.models.registry import model_class
from mii.models.weight_quant import fill_random_fp8, fp8_weights
from mii.ops.fp8_linear import FP8_DTYPE

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_local_model(name_or_path: str) -> None:
    """ModelLoadError for a name that is a local path but no checkpoint here: a
    missing .gguf file, or a path (it exists, starts like a path, or has more slashes
    than a hub id's ``org/name``) that is neither a directory nor a .gguf file. A
    directory, an existing .gguf file and a hub id pass (nothing is read)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return
    if is_gguf_path(path):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name_or_path!r} does not exist")
        return
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(
            f"model path {name_or_path!r} is not a directory with a config.json nor a .gguf file"
        )


def resolve_model_dir(name_or_path: str, revision: str | None = None, weights: bool = True) -> Path:
    """A local directory holding the checkpoint: the path itself, a GGUF file's
    converted checkpoint (cached), or a hub download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    check_local_model(name_or_path)
    if is_gguf_path(path):
        return gguf_checkpoint_dir(path)
    try:
        from huggingface_hub import snapshot_download

        patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
        return Path(snapshot_download(name_or_path, revision=revision, allow_patterns=patterns))
    except Exception as err:
        raise ModelLoadError(
            f"model {name_or_path!r} is neither a local directory nor downloadable from the "
            f"Hugging Face hub ({type(err).__name__}: {err}). Pass a local checkpoint path, "
            "or check the model id and your network connection."
        ) from None


def check_model(
    name_or_path: str,
    revision: str | None = None,
    device: str | None = None,
    max_length: int | None = None,
) -> None:
    """Everything about a model that can be checked without its weights: the path or
    hub id resolves (a GGUF file is converted, once), its config.json reads, the
    device exists, and an engine ``max_length`` is within the model's. ModelLoadError
    / InvalidRequestError name what to change."""
    hf_config = read_hf_config(resolve_model_dir(name_or_path, revision, weights=False))
    default_device(device)
    model_max = model_max_positions(hf_config)  # (a config the family cannot read fails here)
    if model_max is not None:
        engine_max_length(max_length, model_max)


def engine_max_length(requested: int | None, model_max: int) -> int:
    """The engine-wide cap on prompt + response: the engine option ``max_length``
    when given (at most the model's), else the model's maximum."""
    if requested is None:
        return model_max
    if requested > model_max:
        raise InvalidRequestError(
            f"engine option 'max_length' ({requested}) exceeds the model's "
            f"maximum sequence length ({model_max})",
            field="max_length",
        )
    return requested


def model_max_positions(hf_config: dict[str, Any]) -> int | None:
    """The longest sequence the model takes (its RoPE scaling counted), from a
    weightless build on the meta device. An unsupported model type or a config
    that lacks a field the family reads raises as a load would; None when the build
    fails otherwise (the load then says why)."""
    with torch.device("meta"):
        try:
            return int(_instantiate(hf_config).max_positions)
        except MiiError:
            raise
        except Exception:  # e.g. a layer that cannot be built on the meta device
            log.debug("no weightless build of this config", exc_info=True)
            return None


def _instantiate(hf_config: dict[str, Any]) -> CausalLM:
    """The family's model for ``hf_config`` (on the current default device); a
    config that lacks a field the family reads is ModelLoadError naming it."""
    cls = model_class(hf_config.get("model_type"))
    try:
        return cls(hf_config)
    except KeyError as err:  # the family's spec reads a field the config lacks
        raise ModelLoadError(
            f"config.json of a {hf_config.get('model_type')!r} model lacks the field "
            f"{err.args[0]!r}, which {cls.__name__} needs: add it (as in the model's "
            "original Hugging Face config.json)"
        ) from err


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        gguf_files = sorted(f.name for f in model_dir.glob("*.gguf"))
        if gguf_files:
            # A folder holding a .gguf only: the file itself is the model to pass.
            raise ModelLoadError(
                f"{model_dir} has no config.json but holds {', '.join(gguf_files)}; "
                f"pass the .gguf file itself as the model (e.g. {model_dir / gguf_files[0]})"
            )
        raise ModelLoadError(f"{model_dir} has no config.json; is it a Hugging Face checkpoint?")
    return read_json_object(config_file)


def read_json_object(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config.json, generation_config.json) as a dict; a
    broken one raises ModelLoadError naming the file."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{file} is not valid JSON ({err}); fix or replace it") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} must hold a JSON object, not a {type(value).__name__}")
    return value


def choose_dtype(hf_config: dict[str, Any], requested: str) -> torch.dtype:
    """``requested`` unless "auto"; then the checkpoint's dtype (float32 if it names none)."""
    if requested != "auto":
        return _DTYPES[requested]
    named = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(named).replace("torch.", ""), torch.float32)


def build_model(
    hf_config: dict[str, Any],
    model_dir: Path | None,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str = "auto",
    seed: int = 0,
    quantization: str = "none",
) -> CausalLM:
    """Instantiate the family's model on ``device`` and fill its weights;
    ``quantization="fp8"`` (or a pre-quantized checkpoint) gives its linear layers
    float8 weights (``models.weight_quant``)."""
    cls = model_class(hf_config.get("model_type"))
    quant = weight_quantization(hf_config, quantization)
    if quant.mode == "online":
        log.info("linear weights: float8 e4m3, quantized at load (quantization='fp8')")
    elif quant.mode == "checkpoint":
        log.info("linear weights: float8 e4m3, pre-quantized checkpoint (%s)", quant.source)
    # Our layers allocate with torch.empty and never initialise, so building
    # directly on the device in the final dtype wastes neither time nor memory.
    with torch.device(device), _default_dtype(dtype), fp8_weights(quant.mode):
        model = _instantiate(hf_config)
    if load_format == "dummy":
        _fill_random(model, seed)
    else:
        if model_dir is None:
            raise ModelLoadError("a checkpoint directory is needed unless load_format='dummy'")
        try:
            weights = _iterate_weights(model_dir, load_format)
            if quant.skipped_suffixes:  # static activation scales: quantized per token instead
                weights = (w for w in weights if not w[0].endswith(quant.skipped_suffixes))
            loaded = model.load_weights(weights)
        except (KeyError, ValueError) as err:
            raise ModelLoadError(
                f"checkpoint {model_dir} does not fit {cls.__name__}: {err}"
            ) from None
        missing = model.expected_weight_names() - loaded
        if missing:
            names = sorted({model.checkpoint_weight_name(key) for key in missing})
            raise ModelLoadError(
                f"checkpoint {model_dir} lacks weights for: {', '.join(names[:8])}"
                + (" ..." if len(names) > 8 else "")
                + (missing_scales_hint(hf_config, missing) if quant.mode == "checkpoint" else "")
            )
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    model.weight_quantization = quant.source
    return model.eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _fill_random(model: CausalLM, seed: int) -> None:
    """Random weights of the real shapes, drawn on the model's own device (fast for 7B+)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    scales = {f"{name}_scale" for name, p in params.items() if p.dtype == FP8_DTYPE}
    for name, param in params.items():
        if name in scales:
            continue  # filled with its float8 weight
        if param.dtype == FP8_DTYPE:
            fill_random_fp8(param, params[f"{name}_scale"], generator)
        elif param.dim() == 1:
            param.data.fill_(1.0 if "norm" in name else 0.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    """A .bin checkpoint's tensors. weights_only=True refuses pickled code: a
    checkpoint cannot run anything. Memory-mapped where the file allows it (the zip
    format of torch >= 1.6); files of the older format are read whole."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "_use_new_zipfile_serialization" not in str(err):
            raise
    return torch.load(file, map_location="cpu", weights_only=True)


def _unreadable(file: Path, err: Exception) -> ModelLoadError:
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    if "Unsupported global" in str(err):  # a class or function, which weights_only refuses
        return ModelLoadError(
            f"the weight file {file} holds Python objects other than tensors, which mii "
            "does not unpickle (torch.load(weights_only=True): a checkpoint cannot run "
            f"code); convert it to safetensors where you trust it ({first_line})"
        )
    return ModelLoadError(
        f"cannot read the weight file {file} ({type(err).__name__}: {first_line}); "
        "it may be truncated or corrupt: download it again"
    )


def _iterate_weights(
    model_dir: Path, load_format: str
) -> Iterator[tuple[str, torch.Tensor | LazyTensor]]:
    safetensors = sorted(model_dir.glob("*.safetensors"))
    bins = sorted(p for p in model_dir.glob("*.bin") if p.name != "training_args.bin")
    if load_format in ("auto", "safetensors") and safetensors:
        from safetensors import safe_open

        for file in safetensors:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # SafetensorError: truncated, corrupt header, ...
                raise _unreadable(file, err) from None
            with handle as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    # Lazy: a sharded layer reads only this rank's slice.
                    yield key, LazyTensor(f, key)
        return
    if load_format in ("auto", "pt") and bins:
        for file in bins:
            try:
                state = _load_bin(file)
            except Exception as err:  # a pickle weights_only refuses, a corrupt archive
                raise _unreadable(file, err) from None
            yield from state.items()
        return
    raise ModelLoadError(
        f"no weight files ({'*.safetensors or *.bin' if load_format == 'auto' else load_format}) "
        f"in {model_dir}; use load_format='dummy' for random weights"
    )


def default_device(requested: str | None) -> torch.device:
    """The engine's device: ``requested``, checked (InvalidRequestError naming
    ``device`` for a name torch does not know or a device this machine lacks), else
    CUDA when there is a GPU, else the CPU."""
    if not requested:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise InvalidRequestError(
            f"invalid engine option 'device': {err} (use cpu, cuda or cuda:N)", field="device"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            found = f"{count} CUDA device(s)" if count else "no CUDA device (or a CPU-only torch)"
            raise InvalidRequestError(
                f"invalid engine option 'device': {requested!r}, but this machine has {found}; "
                "use device='cpu'" + (f" or cuda:0..{count - 1}" if count else ""),
                field="device",
            )
    return device


def load_tokenizer(model_dir: Path, tokenizer: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    source = tokenizer or str(model_dir)
    if is_gguf_path(source):  # a GGUF file's tokenizer: the one of its converted checkpoint
        source = str(gguf_checkpoint_dir(source))
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelLoadError(f"could not load a tokenizer from {source!r}: {err}") from None
