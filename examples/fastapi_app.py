"""A FastAPI app that embeds ``mii.AsyncEngine``: the engine lives as long as the
app (FastAPI's lifespan), and every request shares it (continuous batching).

    MII_MODEL=meta-llama/Llama-2-7b-hf uvicorn examples.fastapi_app:app --port 8000
    python examples/fastapi_app.py            # the demo model (SmolLM2-135M-Instruct if installed)

    curl -N localhost:8000/stream -H 'content-type: application/json' \\
         -d '{"prompt": "DeepSpeed is", "max_new_tokens": 32}'
    curl localhost:8000/generate -H 'content-type: application/json' \\
         -d '{"prompt": "Seattle is", "do_sample": false}'
    curl localhost:8000/chat -H 'content-type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "What is DeepSpeed?"}]}'
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

import mii


class Options(BaseModel):
    """A few generation options (see mii.GenerateParams for all)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt option is a 422, not ignored

    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None

    def params(self) -> dict:
        """The options as keyword arguments of the engine's calls."""
        return self.model_dump(include=set(Options.model_fields), exclude_none=True)


class GenerateBody(Options):
    """One prompt and its options."""

    prompt: str


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    model = os.environ.get("MII_MODEL")
    if not model:
        from mii.demo import demo_model_path

        model = str(demo_model_path())
    # Loading blocks for a while: keep the event loop free meanwhile.
    app.state.engine = await asyncio.to_thread(mii.AsyncEngine, model)
    try:
        yield
    finally:
        await app.state.engine.aclose()  # aborts what is left and frees the memory


app = FastAPI(title="mii in FastAPI", lifespan=lifespan)


@app.exception_handler(mii.InvalidRequestError)
async def invalid_request(request: Request, err: mii.InvalidRequestError) -> JSONResponse:
    return JSONResponse({"error": str(err), "field": err.field}, status_code=400)


async def until_disconnected(request: Request, work):
    """Await ``work``; if the client leaves first, cancel it, which aborts its engine
    requests (Starlette does not cancel a handler whose client left)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None  # nobody reads it


@app.post("/generate")
async def generate(body: GenerateBody, request: Request) -> dict | None:
    engine: mii.AsyncEngine = request.app.state.engine
    answer = await until_disconnected(request, engine.generate(body.prompt, **body.params()))
    if answer is None:
        return None
    [response] = answer
    return {
        "text": response.generated_text,
        "finish_reason": response.finish_reason,
        "prompt_tokens": response.prompt_length,
        "generated_tokens": response.generated_length,
    }


class ChatBody(Options):
    """A conversation (``{"role", "content"}`` messages) and its options."""

    messages: list[dict]


@app.post("/chat")
async def chat(body: ChatBody, request: Request) -> dict | None:
    """The answer to a conversation, through the model's chat template (instruct
    models answer a raw prompt poorly)."""
    engine: mii.AsyncEngine = request.app.state.engine
    answer = await until_disconnected(request, engine.chat(body.messages, **body.params()))
    if answer is None:
        return None
    [response] = answer
    return {"role": "assistant", "content": response.generated_text}


@app.exception_handler(mii.ServerOverloadedError)
async def overloaded(request: Request, err: mii.ServerOverloadedError) -> JSONResponse:
    headers = {"retry-after": str(max(1, math.ceil(err.retry_after)))}
    return JSONResponse({"error": str(err)}, status_code=429, headers=headers)


@app.post("/stream")
async def stream(body: GenerateBody, request: Request) -> StreamingResponse:
    """Plain text, streamed piece by piece as the engine produces it."""
    engine: mii.AsyncEngine = request.app.state.engine
    answer = engine.stream(body.prompt, **body.params())
    # The first piece before the response starts: what the engine refuses (a bad
    # option, a prompt too long, no room) is then a 400 or 429, not a 200 cut short.
    first = await until_disconnected(request, answer.__anext__())
    if first is None:  # the client left while the request waited for its first token
        await answer.aclose()
        return StreamingResponse(iter(()), media_type="text/plain; charset=utf-8")

    async def pieces() -> AsyncIterator[str]:
        # When the client disconnects, Starlette closes this generator, which closes
        # the engine's stream, which aborts the request and frees its KV cache blocks.
        try:
            yield first.generated_text
            async for piece in answer:
                yield piece.generated_text
        finally:
            await answer.aclose()

    return StreamingResponse(pieces(), media_type="text/plain; charset=utf-8")


@app.get("/stats")
async def stats(request: Request) -> dict:
    return request.app.state.engine.stats()


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
