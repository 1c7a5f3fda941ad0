"""Generation options that reshape the logits before a token is picked: penalties,
``min_p``, ``logit_bias``, ``allowed_token_ids``, stop token ids; and the text
options ``skip_special_tokens``, ``include_stop_str_in_output``,
``truncate_prompt_tokens``.

``GenerateParams`` (``mii.config``) inherits these fields, so that they are
validated, described and documented like every other generation option; the
engine applies them in ``mii.engine.logits_processors``. Token ids are checked
against the model's vocabulary when a request is queued (``engine/intake.py``),
where the vocabulary is known.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, ClassVar, get_args

import numpy as np
from pydantic import BaseModel, Field, ValidationInfo, field_validator

# Token ids and other integers fit a signed 64-bit integer (the engine's tensors, gRPC).
_INT64_LIMIT = 2**63
# OpenAI's bounds of a logit bias and of the presence and frequency penalties.
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0
# repetition_penalty divides or multiplies 32-bit logits: past these bounds (1e-46
# is 0 in float32) the logits overflowed or the masked -inf ones became NaN, and a
# grammar or allowed_token_ids no longer held (a 500, or tokens outside the list).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 1e-20, 1e20


class ExactTypes(BaseModel):
    """A base of the options models: None is a generation option's default; a number
    is never a boolean (pydantic reads True
    as 1: ``min_p=True`` was a greedy request, ``temperature=True`` 1.0). True/false
    options keep pydantic's reading of JSON's other spellings (``"false"``, ``0``,
    ``"no"``: False), which REST clients of DeepSpeed-MII send."""

    # Generation options only (an engine's seed=None is no seed to choose silently).
    none_is_default: ClassVar[bool] = False

    @field_validator("*", mode="before")
    @classmethod
    def _exact_types(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is None:
            return value
        kinds = {field.annotation, *get_args(field.annotation)}
        if (
            cls.none_is_default
            and value is None
            and type(None) not in kinds
            and not field.is_required()
        ):
            # None is "the default" for every option, as in transformers' generate()
            # (top_p=None was refused where temperature=None was taken: a user trial).
            return field.get_default(call_default_factory=True)
        boolean = isinstance(value, (bool, np.bool_))  # (numpy's: a pandas row's values)
        if boolean and bool not in kinds and kinds & {int, float}:
            number = "a number" if float in kinds else "an integer"
            raise ValueError(f"must be {number}, not a boolean")
        if isinstance(value, (float, np.floating)) and math.isnan(value) and kinds & {int, float}:
            # (else the first bound speaks: "should be less than or equal to 2 (got nan)")
            raise ValueError("must be a finite number, not NaN")
        return value


class LogitsOptions(ExactTypes):
    """The logits processors' options of one request (all off by default)."""

    none_is_default: ClassVar[bool] = True

    presence_penalty: float = Field(
        default=0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="subtract this from the logit of every token generated so far "
        "(OpenAI's presence penalty, in [-2, 2])",
    )
    frequency_penalty: float = Field(
        default=0.0,
        ge=-MAX_PENALTY,
        le=MAX_PENALTY,
        description="subtract this times its count from the logit of every token generated "
        "so far (OpenAI's frequency penalty, in [-2, 2])",
    )
    repetition_penalty: float = Field(
        default=1.0,
        ge=MIN_REPETITION_PENALTY,
        le=MAX_REPETITION_PENALTY,
        description="divide the positive logits (multiply the negative ones) of the tokens of "
        "the prompt and the answer by this; > 1 discourages repetition (transformers')",
    )
    min_p: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="after temperature, drop the tokens less likely than min_p times the most "
        "likely one (in [0, 1]; 0: off)",
    )
    logit_bias: dict[int, float] | None = Field(
        default=None,
        description="token id -> bias in [-100, 100], added to that token's logit "
        "(-100 bans it, 100 forces it)",
    )
    allowed_token_ids: tuple[int, ...] | None = Field(
        default=None,
        description="generate only these token ids (vLLM's; end-of-sequence too only if "
        "listed) (repeatable)",
    )
    stop_token_ids: tuple[int, ...] = Field(
        default=(),
        description="token id that ends generation like end-of-sequence (finish reason "
        "stop, left out of the text; banned below min_new_tokens) (repeatable)",
    )
    skip_special_tokens: bool = Field(
        default=True,
        description="leave special tokens out of the generated text",
    )
    truncate_prompt_tokens: int | None = Field(
        default=None,
        ge=-1,
        lt=2**63,
        description="keep only the prompt's last N tokens (-1: as many as max_length "
        "leaves room for one new token; vLLM's)",
    )
    include_stop_str_in_output: bool = Field(
        default=False,
        description="end the text with the stop string that ended it (default: just before)",
    )

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_some(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("must be -1 (as many as fit) or at least 1")
        return value

    @field_validator("repetition_penalty")
    @classmethod
    def _finite_penalty(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids", mode="before")
    @classmethod
    def _token_id_tuple(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return () if info.field_name == "stop_token_ids" else None
        if (
            info.field_name == "allowed_token_ids"
            and isinstance(value, (list, tuple))
            and not value
        ):
            raise ValueError("must list at least one token id (leave it out to allow every token)")
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, (list, tuple)) and any(isinstance(t, bool) for t in value):
            raise ValueError("token ids must be integers, not booleans")
        return value

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids_in_range(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if any(not 0 <= t < _INT64_LIMIT for t in value or ()):
            raise ValueError("token ids must be non-negative 64-bit integers")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_boolean_biases(cls, value: Any) -> Any:
        if isinstance(value, dict) and any(isinstance(v, bool) for v in value.values()):
            raise ValueError("biases must be numbers, not booleans")
        if isinstance(value, dict) and any(isinstance(k, bool) for k in value):
            raise ValueError("token ids must be integers, not booleans")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _biases_in_range(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        if not value:
            return None
        for token, bias in value.items():
            if not 0 <= token < _INT64_LIMIT:
                raise ValueError(f"token id {token} is not a non-negative 64-bit integer")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # false for nan too
                raise ValueError(
                    f"the bias of token {token} ({bias}) is not in "
                    f"[{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
                )
        return value

    @cached_property
    def processes_logits(self) -> bool:
        """True when a logits processor applies to this request. Decided on the host
        once per request, so that a plain batch is sampled exactly as before."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
            or self.min_p > 0.0
            or self.logit_bias is not None
            or self.allowed_token_ids is not None
            # stop token ids are banned below min_new_tokens (a GenerateParams field)
            or (bool(self.stop_token_ids) and getattr(self, "min_new_tokens", 0) > 0)
        )

    def token_ids_used(self) -> list[tuple[str, int]]:
        """(option, token id) of every id these options name, to check against a vocabulary."""
        ids = [("stop_token_ids", t) for t in self.stop_token_ids]
        ids += [("allowed_token_ids", t) for t in self.allowed_token_ids or ()]
        return ids + [("logit_bias", t) for t in self.logit_bias or ()]
