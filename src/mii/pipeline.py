"""``mii.pipeline``: a synchronous wrapper over AsyncEngine for scripts and notebooks.

The engine runs on an event loop in a private background thread, so the
pipeline works the same in a plain script and inside a running event loop
(Jupyter).

Under ``torchrun --nproc-per-node N`` every process runs the same script and
the model is split over the N ranks: rank 0 gets a ``Pipeline`` that schedules
and samples, the others a ``RankPipeline`` that runs rank 0's forward passes
while their own call of the pipeline lasts. Every rank must make the same
calls (SPMD); the prompts of ranks > 0 are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from mii.async_chat import AsyncEngine
from mii.config import EngineConfig, GenerateParams
from mii.engine import distributed
from mii.engine_thread import EngineThread, LoopClosedError
from mii.errors import EngineClosedError, InvalidRequestError
from mii.prompts import Prompt, prompt_batch
from mii.response import Response

PROGRESS_BAR_MIN_PROMPTS = 16


class Pipeline:
    """Call it with one prompt or a list: ``pipe(prompts, **generation_options)``."""

    def __init__(self, model: str, all_rank_output: bool = False, **options: Any) -> None:
        self.engine = AsyncEngine(model, **options)
        self.all_rank_output = all_rank_output
        # A script that never calls destroy() still shuts the engine down cleanly at exit.
        self._runner = EngineThread(self.engine, name="mii-pipeline")

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    # DeepSpeed-MII's ``if pipe.is_rank_0: print(responses)``: rank 0 gets a Pipeline.
    is_rank_0 = True

    def __call__(
        self, prompts: Prompt | Sequence[Prompt], progress: bool | None = None, **params: Any
    ) -> list[Response]:
        """Generate for every prompt and return the responses in order. A prompt is a
        text or a list of token ids (``[1, 2, 3]`` is one prompt, taken as it is).

        ``progress`` shows a progress bar (default: for 16 or more prompts when
        stderr is a terminal).
        """
        if self._runner.closed:
            raise EngineClosedError("this pipeline was destroyed; create a new one")
        if progress is not None and not isinstance(progress, bool):
            # pipe(prompts, params): vLLM's generate(prompts, sampling_params) habit
            raise TypeError(
                f"progress must be True, False or None (got {type(progress).__name__}); "
                "generation options are keyword arguments: pipe(prompts, max_new_tokens=64)"
            )
        try:  # (destroy() in another thread may close the engine at any point here)
            future = self._runner.submit(self._call(prompts, params, progress))
            try:
                return self._runner.wait(future)
            except LoopClosedError:  # (destroyed meanwhile: nothing left to cancel on)
                raise
            except BaseException:  # Ctrl-C, or a signal handler's (a timeout, sys.exit)
                future.cancel()  # aborts every request of this call (done: no-op)
                raise
        except LoopClosedError:
            raise EngineClosedError("this pipeline was destroyed; create a new one") from None

    async def _call(
        self, prompts: Any, params: dict[str, Any], progress: bool | None
    ) -> list[Response]:
        tp = self.engine.core.tp
        if tp is None:
            return await self._generate(prompts, params, progress)
        try:
            responses = await self._generate(prompts, params, progress)
        except BaseException:
            if tp.failure is None:  # the other ranks still wait for the end of this call
                await self.engine.run_on_engine_thread(tp.send_done, b"")
            raise
        # End the other ranks' call too (with the responses, if they want them),
        # between passes: on the engine's thread.
        payload = b""
        if self.all_rank_output:
            payload = json.dumps([dataclasses.asdict(r) for r in responses]).encode()
        await self.engine.run_on_engine_thread(tp.send_done, payload)
        return responses

    async def _generate(
        self, prompts: Any, params: dict[str, Any], progress: bool | None
    ) -> list[Response]:
        # Checked here, inside the call: under tensor parallelism a call that fails
        # still ends the other ranks' call (see _call).
        prompts = prompt_batch(prompts)
        GenerateParams.parse(**params)  # bad options fail before any prompt is queued
        if progress is None:
            progress = len(prompts) >= PROGRESS_BAR_MIN_PROMPTS and sys.stderr.isatty()
        if not progress:
            return await self.engine.generate(prompts, **params)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="mii", unit="prompt")
        try:  # (one call: admitted or refused whole, as without the bar)
            return await self.engine.generate(prompts, on_answer=lambda _: bar.update(1), **params)
        finally:
            bar.close()

    def chat(
        self,
        messages: Sequence[dict[str, Any]] | Sequence[Sequence[dict[str, Any]]],
        progress: bool | None = None,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> list[Response]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or a
        list of them, each through the model's chat template (vLLM's ``LLM.chat``):
        an instruct model given a raw question often ends it at once. The template
        options are the OpenAI chat route's (vLLM's names); generation options as
        for a call of the pipeline (``add_generation_prompt`` unset: true unless
        ``continue_final_message``, which continues the last message instead).
        Returns one response per conversation."""
        from mii.chat_prompts import chat_prompt_batch

        prompts = chat_prompt_batch(
            self.tokenizer,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        return self(prompts, progress=progress, **params)

    def destroy(self) -> None:
        """Stop the engine and free its memory (device memory included)."""
        self._runner.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


class RankPipeline:
    """Rank > 0 of a tensor-parallel pipeline: holds its shard of the model and runs
    rank 0's forward passes for as long as rank 0's call lasts."""

    def __init__(self, model: str, all_rank_output: bool = False, **options: Any) -> None:
        from mii.engine.core import EngineCore

        self.core = EngineCore(EngineConfig.parse(model, **options))
        self.all_rank_output = all_rank_output
        self._stopped = False

    @property
    def tokenizer(self):
        return self.core.tokenizer

    is_rank_0 = False  # (DeepSpeed-MII's name)

    def __call__(self, prompts: Any = None, progress: bool | None = None, **params: Any):
        """Serve rank 0's call; its responses when ``all_rank_output``, else []."""
        if self._stopped:
            raise EngineClosedError("this pipeline was destroyed; create a new one")
        try:
            payload = self.core.serve_worker()
        except Exception:
            self._stopped = True  # this rank failed and left the group
            raise
        if payload is None:
            self._stopped = True
            self.core.leave_group()
            raise EngineClosedError("rank 0 destroyed the pipeline during this call")
        if not payload:
            return []
        return [Response.from_dict(fields) for fields in json.loads(payload)]

    def destroy(self) -> None:
        """Wait for rank 0 to destroy the pipeline, then leave the process group."""
        if not self._stopped:
            self._stopped = True
            self.core.serve_until_stopped()  # serves calls this rank did not make, too

    def __enter__(self) -> RankPipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


def pipeline(
    model_name_or_path: str,
    max_length: int | None = None,
    tensor_parallel: int | None = None,
    all_rank_output: bool = False,
    **options: Any,
) -> Pipeline | RankPipeline:
    """Load a model for in-process generation.

    ``model_name_or_path`` is a Hugging Face hub id or a local checkpoint
    directory. ``max_length`` caps prompt + response tokens (default: the
    model's maximum). ``tensor_parallel`` splits the model over that many
    ranks (default: the launcher's world size, 1 without one); launch the
    script with ``torchrun --nproc-per-node N``. Only rank 0's calls return
    responses, unless ``all_rank_output``. Other engine options are those of
    :class:`mii.AsyncEngine`.
    """
    if not isinstance(all_rank_output, bool):  # ("x" was taken as true)
        raise InvalidRequestError(
            f"all_rank_output must be True or False (got {all_rank_output!r})",
            field="all_rank_output",
        )
    if max_length is not None:
        options["max_length"] = max_length
    if tensor_parallel is None:
        tensor_parallel = distributed.launcher_world_size()
    options["tensor_parallel"] = tensor_parallel
    if tensor_parallel > 1 and int(os.environ.get("RANK", "0")) != 0:
        return RankPipeline(model_name_or_path, all_rank_output, **options)
    return Pipeline(model_name_or_path, all_rank_output, **options)
