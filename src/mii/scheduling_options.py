"""The scheduler's engine options: how many tokens and sequences a forward pass
takes, and how much of a pass short prompts may take beside a long one.

``EngineConfig`` (``mii.config``) inherits these fields, so that they are
validated, described and documented like every other engine option. Left unset
they are chosen for the device (``with_device_defaults``) when the engine starts.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from typing_extensions import Self

from mii.errors import InvalidRequestError
from mii.sampling_options import ExactTypes

# token_budget and max_num_seqs left unset, by device type. On CUDA, large passes:
# on one H200 (Llama-2-7B shape, W1) 4096 tokens / 256 sequences ran 2.12x the
# compute floor against 3.01x at 1024 / 128 (docs/performance.md); decodes still
# see a pass every ~75 ms at most. The engine halves the CUDA budget for models
# whose 4096-token pass would take longer than 0.2 s on its GPU (engine/pass_budget.py).
# On the CPU passes stay small: each one is slow.
SCHEDULING_DEFAULTS = {"cuda": (4096, 256), "cpu": (1024, 128)}
# short_prompt_reserve left unset: the token budget over this. A quarter keeps
# three quarters of every pass for a long prompt being prefilled, and lets the
# prompts of a chat turn (hundreds of tokens) start beside it.
SHORT_PROMPT_SHARE = 4


class SchedulingOptions(ExactTypes):
    """token_budget, max_num_seqs and short_prompt_reserve (engine/scheduler.py)."""

    token_budget: int | None = Field(
        default=None,
        gt=0,
        description="tokens per forward pass, Dynamic SplitFuse (default: "
        f"{SCHEDULING_DEFAULTS['cuda'][0]} on CUDA, halved down to 512 while such a pass "
        f"would take over 0.2 s for the model on its GPU; {SCHEDULING_DEFAULTS['cpu'][0]} on "
        "the CPU)",
    )
    max_num_seqs: int | None = Field(
        default=None,
        gt=0,
        description="sequences per forward pass (default: "
        f"{SCHEDULING_DEFAULTS['cuda'][1]} on CUDA, {SCHEDULING_DEFAULTS['cpu'][1]} on the CPU)",
    )
    short_prompt_reserve: int | None = Field(
        default=None,
        ge=0,
        description="tokens of each pass kept for waiting prompts this short (together): "
        "they are admitted before longer prompts waiting, beside a long prompt's prefill "
        "instead of after it; at most half the token budget, 0: off (default: a quarter "
        "of the token budget)",
    )

    @model_validator(mode="after")
    def _budget_covers_decodes(self) -> Self:
        # Decodes are scheduled first, one token each; a budget smaller than the
        # sequence cap would leave admitted sequences unable to advance.
        if None not in (self.token_budget, self.max_num_seqs) and (
            self.token_budget < self.max_num_seqs
        ):
            raise ValueError(
                f"token_budget ({self.token_budget}) must be at least max_num_seqs "
                f"({self.max_num_seqs}); raise token_budget or lower max_num_seqs"
            )
        if None not in (self.token_budget, self.short_prompt_reserve):
            _check_reserve(self.short_prompt_reserve, self.token_budget, "")
        return self

    def with_device_defaults(self, device_type: str, cuda_budget: int | None = None) -> Self:
        """This config with the scheduling options left unset chosen for the device
        (SCHEDULING_DEFAULTS; on CUDA the budget ``cuda_budget`` where the engine chose
        one for its model, engine/pass_budget.py); a sequence cap left unset never
        exceeds the budget, a budget left unset is never below a given cap."""
        budget, seqs = SCHEDULING_DEFAULTS.get(device_type, SCHEDULING_DEFAULTS["cpu"])
        if device_type == "cuda" and cuda_budget is not None:
            budget = cuda_budget
        if self.token_budget is not None:
            budget = self.token_budget
        elif self.max_num_seqs is not None:  # every running sequence's decode fits a pass
            budget = max(budget, self.max_num_seqs)
        seqs = min(seqs, budget) if self.max_num_seqs is None else self.max_num_seqs
        reserve = self.short_prompt_reserve
        if reserve is None:
            reserve = budget // SHORT_PROMPT_SHARE
        elif self.token_budget is None:  # checked against the budget chosen here
            _check_reserve(reserve, budget, f" on {device_type}; give a token_budget or lower it")
        return self.model_copy(
            update={"token_budget": budget, "max_num_seqs": seqs, "short_prompt_reserve": reserve}
        )


def _check_reserve(reserve: int, budget: int, advice: str) -> None:
    # A long prompt keeps at least half of each pass (less its decodes), however
    # many short prompts keep arriving.
    if reserve > budget // 2:  # (InvalidRequestError is a ValueError: pydantic takes it)
        raise InvalidRequestError(
            f"short_prompt_reserve ({reserve}) must be at most half of token_budget "
            f"({budget}){advice or '; lower short_prompt_reserve or raise token_budget'}",
            field="short_prompt_reserve",
        )
