"""``mii.pipeline``: a synchronous wrapper over AsyncEngine for scripts and notebooks.

The engine runs on an event loop in a private background thread, so the
pipeline works the same in a plain script and inside a running event loop
(Jupyter).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from mii.config import GenerateParams
from mii.engine.async_engine import AsyncEngine
from mii.response import Response

PROGRESS_BAR_MIN_PROMPTS = 16


class Pipeline:
    """Call it with one prompt or a list: ``pipe(prompts, **generation_options)``."""

    def __init__(self, model: str, **options: Any) -> None:
        self.engine = AsyncEngine(model, **options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mii-pipeline", daemon=True
        )
        self._thread.start()
        # A script that never calls destroy() still shuts the engine down cleanly at exit.
        self._finalizer = weakref.finalize(self, _shutdown, self.engine, self._loop, self._thread)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def __call__(
        self, prompts: str | Sequence[str], progress: bool | None = None, **params: Any
    ) -> list[Response]:
        """Generate for every prompt and return the responses in order.

        ``progress`` shows a progress bar (default: for 16 or more prompts when
        stderr is a terminal).
        """
        if self._loop is None:
            raise RuntimeError("this pipeline was destroyed; create a new one")
        if isinstance(prompts, str):
            prompts = [prompts]
        GenerateParams.parse(**params)
        if progress is None:
            progress = len(prompts) >= PROGRESS_BAR_MIN_PROMPTS and sys.stderr.isatty()
        future = asyncio.run_coroutine_threadsafe(
            self._generate(list(prompts), params, progress), self._loop
        )
        try:
            return future.result()
        except KeyboardInterrupt:
            future.cancel()  # aborts every request of this call
            raise

    async def _generate(
        self, prompts: list[str], params: dict[str, Any], progress: bool
    ) -> list[Response]:
        if not progress:
            return await self.engine.generate(prompts, **params)
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="mii", unit="prompt")

        async def one(prompt: str) -> Response:
            [response] = await self.engine.generate([prompt], **params)
            bar.update(1)
            return response

        try:
            return list(await asyncio.gather(*(one(p) for p in prompts)))
        finally:
            bar.close()

    def destroy(self) -> None:
        """Stop the engine and free its memory (device memory included)."""
        if self._loop is None:
            return
        self._finalizer()
        self._loop = None

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()


def _shutdown(
    engine: AsyncEngine, loop: asyncio.AbstractEventLoop, thread: threading.Thread
) -> None:
    if loop.is_closed():
        return
    asyncio.run_coroutine_threadsafe(engine.aclose(), loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def pipeline(model_name_or_path: str, max_length: int | None = None, **options: Any) -> Pipeline:
    """Load a model for in-process generation.

    ``model_name_or_path`` is a Hugging Face hub id or a local checkpoint
    directory. ``max_length`` caps prompt + response tokens (default: the
    model's maximum). Other engine options are those of :class:`mii.AsyncEngine`.
    """
    if max_length is not None:
        options["max_length"] = max_length
    return Pipeline(model_name_or_path, **options)
