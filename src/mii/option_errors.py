"""One InvalidRequestError from pydantic's error list for a set of options: the
first bad option named, with what was given, and a hint for DeepSpeed-MII's names."""

from __future__ import annotations

from pydantic import ValidationError

from mii.errors import InvalidRequestError

# DeepSpeed-MII's names that ported code passes: what to write here instead.
DEEPSPEED_MII_NAMES = {
    name: (
        f" (DeepSpeed-MII's {name}: its keys are plain keyword arguments here, e.g. "
        "mii.serve(model, deployment_name=..., tensor_parallel=..., max_length=...))"
    )
    for name in ("mii_config", "model_config")
} | {"port_number": " (DeepSpeed-MII's port_number is port here: mii.serve(model, port=...))"}


def raise_option_error(err: ValidationError, what: str) -> None:
    """Turn pydantic's error list into one InvalidRequestError naming the first bad field."""
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or None
    if field is None:  # a rule about several options; its message names them
        message = f"invalid {what}s: {first['msg'].removeprefix('Value error, ')}"
    elif first["type"] == "extra_forbidden":
        message = f"unknown {what} {field!r}" + DEEPSPEED_MII_NAMES.get(field or "", "")
    else:
        shown = repr(first.get("input"))
        if len(shown) > 200:  # e.g. thousands of stop strings: the message stays short
            shown = shown[:200] + "..."
        said = first["msg"].removeprefix("Value error, ")
        message = f"invalid {what} {field!r}: {said} (got {shown})"
    raise InvalidRequestError(message, field=field) from None
