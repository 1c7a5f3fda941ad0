"""``%load_ext mii``: the ``%mii`` / ``%%mii`` magics in a real IPython shell."""

from __future__ import annotations

import asyncio
import sys

import pytest
from IPython.core.error import UsageError
from IPython.terminal.interactiveshell import TerminalInteractiveShell
from IPython.testing.globalipapp import start_ipython
from IPython.utils.capture import capture_output

import mii
from mii.rpc.deployment import free_port

PROMPT = "DeepSpeed is"


class Recorder:
    """A stdout that remembers what was written before each flush."""

    def __init__(self) -> None:
        self.text = ""
        self.flushed: list[str] = []

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        self.flushed.append(self.text)


@pytest.fixture(scope="module")
def shell():
    # start_ipython() returns the shell only on its first call in a process.
    ip = start_ipython() or TerminalInteractiveShell.instance()
    ip.run_line_magic("load_ext", "mii")
    yield ip
    ip.run_line_magic("unload_ext", "mii")


@pytest.fixture
def expected(llama) -> str:
    """The pipeline's greedy text: the oracle of every magic."""
    with mii.pipeline(llama) as pipe:
        return pipe(PROMPT, do_sample=False, max_new_tokens=5)[0].generated_text


def run(shell, cell: str):
    with capture_output() as captured:
        result = shell.run_cell(cell, store_history=False)
    return result, captured.stdout + captured.stderr


def test_without_a_model_the_magic_says_what_to_do(shell):
    shell.run_line_magic("mii", "unload")
    result, out = run(shell, f"%mii {PROMPT}")
    assert isinstance(result.error_in_exec, UsageError)
    assert "%mii load MODEL" in out and "%mii attach NAME" in out
    result, out = run(shell, f"%%mii --greedy\n{PROMPT}")
    assert "%mii load MODEL" in str(result.error_in_exec)
    _, out = run(shell, "%mii")  # bare: status and usage
    assert "%mii load MODEL" in out and "%%mii [generation options]" in out


def test_load_then_line_and_cell_magics_stream(
    shell, llama, expected, tmp_path, gguf_files, monkeypatch
):
    result, out = run(shell, f"%mii load {llama} --max-length 64")
    assert result.success, out
    magics = shell.magics_manager.registry["MiiMagics"]
    assert magics.model is not None and magics.model.engine.core.max_length == 64

    # Default sampling; a random model may draw EOS at once, so it is ignored.
    result, out = run(shell, f"%mii --ignore-eos -- {PROMPT}")
    assert result.success, out
    assert out.strip() and magics.last_text and out.startswith(magics.last_text)

    result, out = run(shell, f"%%mii --max-new-tokens 5 --greedy\n{PROMPT}\n")
    assert result.success, out
    assert out == expected + "\n"

    result, out = run(shell, f"%mii --max-new-tokens 5 --greedy {PROMPT}")
    assert out == expected + "\n"
    # A question: IPython read the trailing "?" as help on the last word ("Object
    # `France` not found.") and never ran the magic; now the magic gets it whole.
    with mii.pipeline(llama) as pipe:
        asked = pipe("Is it France?", do_sample=False, max_new_tokens=5)[0].generated_text
    result, out = run(shell, "%mii --max-new-tokens 5 --greedy -- Is it France?")
    assert result.success and out == asked + "\n", out
    result, out = run(shell, "if True:\n    %mii --max-new-tokens 5 --greedy Is it France?\n")
    assert result.success and out == asked + "\n", out
    # ... but neither inside a string nor in a cell magic's body
    from mii.magic import keep_questions

    for cell in ('s = """\n%mii Is it France?\n"""\n', "%%bash\n%mii Is it France?\n"):
        lines = cell.splitlines(keepends=True)
        assert keep_questions(lines) == lines
    # --chat: the prompt as a user turn (this tokenizer has no template: the chat
    # route's fallback text), as pipe.chat answers it
    with mii.pipeline(llama) as pipe:
        turn = [{"role": "user", "content": PROMPT}]
        chatted = pipe.chat(turn, do_sample=False, max_new_tokens=5)[0].generated_text
    result, out = run(shell, f"%mii --chat --max-new-tokens 5 --greedy {PROMPT}")
    assert result.success and out == chatted + "\n", out

    # Pieces are printed and flushed as they arrive, not at the end.
    recorder, stdout = Recorder(), sys.stdout
    sys.stdout = recorder
    try:
        shell.run_cell_magic("mii", "--max-new-tokens 5 --greedy", PROMPT)
    finally:
        sys.stdout = stdout
    assert recorder.text == expected + "\n"
    partial = [t for t in recorder.flushed if t and t != recorder.text]
    assert len(partial) >= 2, recorder.flushed

    result, out = run(shell, "%%mii --top-k -2\nx")  # bad options: a usage error naming them
    assert isinstance(result.error_in_exec, UsageError) and "top_k" in out
    # The line magic takes quoted option values as %%mii does: unquoted, the prompt
    # was "never seen' DeepSpeed is" and the stop string "'~~".
    result, quoted = run(shell, f"%mii --max-new-tokens 5 --greedy --stop '~~ never seen' {PROMPT}")
    assert result.success and quoted == expected + "\n", quoted

    # A load with a typo in the path, a hub id, an option or a device, or of something
    # that is no checkpoint, keeps the model in use (all but the first two freed it).
    loaded = magics.model
    not_gguf, empty_dir = tmp_path / "notes.gguf", tmp_path / "empty"
    not_gguf.write_text("not a model")
    empty_dir.mkdir()
    for bad in (
        "/nonexistent/dir",
        "missing.gguf",
        f"{llama} --kv-block-size 0",
        "no-such-org/no-such-model",  # offline: does not resolve
        str(not_gguf),
        str(empty_dir),
        f"{llama} --device cuda:99",
    ):
        result, out = run(shell, f"%mii load {bad}")
        assert isinstance(result.error_in_exec, UsageError), out
        assert "stays loaded" in out and magics.model is loaded, out
    # a GGUF file that cannot be converted into an unwritable cache: the same (review:
    # an OSError traceback)
    with monkeypatch.context() as patch:
        patch.setenv("MII_GGUF_CACHE_DIR", str(not_gguf))  # a file, not a directory
        result, out = run(shell, f"%mii load {gguf_files('Q8_0')[0]}")
    assert isinstance(result.error_in_exec, UsageError), out
    assert "stays loaded" in out and magics.model is loaded, out
    result, out = run(shell, f"%mii --max-new-tokens 5 --greedy {PROMPT}")
    assert out == expected + "\n"


class InterruptOnFirstPiece(Recorder):
    """A stdout on which the first piece of text raises KeyboardInterrupt (Ctrl-C,
    or Jupyter's interrupt, arriving while an answer streams)."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def write(self, text: str) -> int:
        if text and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().write(text)


def test_an_interrupt_aborts_the_request_and_stops_the_cell(shell, llama):
    magics = shell.magics_manager.registry["MiiMagics"]
    shell.run_line_magic("mii", f"load {llama}")  # its whole length: 256 tokens
    before = magics.model.engine.stats()["generation_tokens"]
    shell.user_ns.pop("after_the_loop", None)
    cell = (
        "for topic in ['cats', 'dogs']:\n"
        "    %mii --max-new-tokens 200 --ignore-eos Write about $topic:\n"
        "after_the_loop = True\n"
    )
    recorder, stdout = InterruptOnFirstPiece(), sys.stdout
    sys.stdout = recorder
    try:
        result = shell.run_cell(cell, store_history=False)
    finally:
        sys.stdout = stdout
    # The magic caught the interrupt, printed that, and stopped the cell there: the
    # second prompt was never sent, the line after the loop never ran.
    assert isinstance(result.error_in_exec, KeyboardInterrupt), result.error_in_exec
    assert "[interrupted]" in recorder.text
    assert "after_the_loop" not in shell.user_ns
    # ... and the request it cut off was aborted, not left to run its 200 tokens.
    engine = magics.model.engine
    magics.model.submit(engine.wait_idle()).result(timeout=60)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["kv_cache_usage"] == 0, stats
    assert stats["generation_tokens"] - before < 200, stats


def test_magic_inside_the_kernels_running_event_loop(shell, llama, expected):
    """ipykernel runs cells with ``await shell.run_cell_async`` on its event loop."""
    magics = shell.magics_manager.registry["MiiMagics"]
    if magics.model is None:
        shell.run_line_magic("mii", f"load {llama}")

    cell = f"%%mii --max-new-tokens 5 --greedy\n{PROMPT}"

    async def kernel():
        asyncio.get_running_loop()  # what the kernel has, and asyncio.run cannot nest in
        with capture_output() as captured:
            result = await shell.run_cell_async(
                cell, store_history=False, transformed_cell=shell.transform_cell(cell)
            )
        return result, captured.stdout

    result, out = asyncio.run(kernel())
    assert result.success, result.error_in_exec
    assert out == expected + "\n"


def test_attach_to_a_deployment(shell, llama, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    result, out = run(shell, "%mii attach no-such-deployment")
    assert isinstance(result.error_in_exec, UsageError) and "no-such-deployment" in out

    client = mii.serve(llama, deployment_name="magic-test", port=free_port(), max_length=64)
    try:
        result, out = run(shell, "%mii attach magic-test")
        assert result.success, out
        magics = shell.magics_manager.registry["MiiMagics"]
        assert magics.model is None  # attaching freed the in-process model
        assert "attached to deployment 'magic-test'" in out

        result, out = run(shell, f"%%mii --max-new-tokens 5 --greedy\n{PROMPT}")
        assert result.success, out
        assert out == expected + "\n"
        # A bad option value: the client's error as a usage error (was a traceback)
        result, out = run(shell, f"%mii --top-p 2 -- {PROMPT}")
        assert isinstance(result.error_in_exec, UsageError) and "top_p" in out, out

        # --chat: the deployment's chat template (loaded here from its record), as the
        # pipeline's chat answers the same turn
        with mii.pipeline(llama, max_length=64) as pipe:
            turn = [{"role": "user", "content": PROMPT}]
            chatted = pipe.chat(turn, do_sample=False, max_new_tokens=5)[0].generated_text
        result, out = run(shell, f"%mii --chat --max-new-tokens 5 --greedy {PROMPT}")
        assert result.success and out == chatted + "\n", out
        # Attached by address: the record at that address gives the template (it was
        # refused: "no record" for a host:port)
        result, out = run(shell, f"%mii attach {client.address}")
        assert result.success, out
        result, out = run(shell, f"%mii --chat --max-new-tokens 5 --greedy {PROMPT}")
        assert result.success and out == chatted + "\n", out
        result, out = run(shell, "%mii attach magic-test")
        assert result.success, out

        _, out = run(shell, "%mii unload")
        assert "keeps running" in out and client.is_healthy()
        result, out = run(shell, "%mii attach magic-test")
        assert result.success, out
    finally:
        client.terminate_server()
    # Stopped while attached: not said to keep running (it was)
    _, out = run(shell, "%mii unload")
    assert "does not answer any more" in out and "keeps running" not in out, out


def test_a_stop_string_can_be_a_line_break():
    """A magic's line holds no line break, so --stop reads \\n (and \\t, \\r, \\\\)."""
    from mii.magic_options import generation_parser, magic_params, split_line

    options, prompt = split_line(r"--stop '\n' --stop 'a\tb\\n' The capital is")
    params = magic_params(generation_parser("%mii").parse_args(options))
    assert prompt == "The capital is"
    assert params["stop"] in (["\n", "a\tb\\n"], ("\n", "a\tb\\n")), params
    # the cell magic's line reads its words alike (shlex made an unquoted \n an "n")
    from mii.magic_line import split_args

    for line in (r"--stop \n --greedy", r"--stop '\n' --greedy", r'--stop "\n" --greedy'):
        args = generation_parser("%%mii").parse_args(split_args(line))
        assert magic_params(args)["stop"] in ("\n", ["\n"], ("\n",)), line


def test_options_after_the_prompt_are_options():
    """`%mii DeepSpeed is --max-new-tokens 8` sent the whole line as the prompt and
    generated the default 128 tokens (user trial), where `mii generate` reads options
    after its prompts. A tail of known options is read as options; anything else
    (an unknown or incomplete option, text after it, what follows `--`) stays text."""
    from mii.magic_options import generation_parser, magic_params, split_line

    options, prompt = split_line("--greedy DeepSpeed is --max-new-tokens 8 --stop '\\n'")
    params = magic_params(generation_parser("%mii").parse_args(options))
    assert prompt == "DeepSpeed is"
    assert params["max_new_tokens"] == 8 and params["stop"] in (["\n"], ("\n",), "\n")
    assert params["do_sample"] is False
    for line in (
        "What does --greedy mean?",  # text after the option
        "y --unknown 3",
        "--chat -- Explain --temperature 0.5",  # after --: the prompt, whole
    ):
        options, prompt = split_line(line)
        assert prompt == line.removeprefix("--chat -- "), line
    # MISSION.md's request options the line did not take, after the prompt as before it.
    options, prompt = split_line("Seattle is --greedy --return-full-text --max-length 9")
    params = magic_params(generation_parser("%mii").parse_args(options))
    assert prompt == "Seattle is"
    assert params["return_full_text"] is True and params["max_length"] == 9


def test_a_misspelt_option_after_the_prompt_is_refused():
    """`%mii Seattle is --max-new-token 6` sent the typo, and the options beside it,
    to the model as text (hundreds of tokens of it): an option's name misspelt is a
    UsageError that names the option meant; `--` keeps such words as text."""
    from IPython.core.error import UsageError

    from mii.magic_options import split_line

    for line in ("Seattle is --max-new-token 6", "Seattle is --greedy --max-new-token 6 --greedy"):
        with pytest.raises(UsageError, match="did you mean '--max-new-tokens'"):
            split_line(line)
    assert split_line("-- what does --max-new-token mean")[1] == "what does --max-new-token mean"
    # An option that ends the line without its value: refused, as at the line's start
    # (it generated 128 tokens from "hello --max-new-tokens")
    for line in ("hello --max-new-tokens", "hello --greedy --stop"):
        with pytest.raises(UsageError, match="needs a value"):
            split_line(line)
    assert split_line("-- hello --max-new-tokens")[1] == "hello --max-new-tokens"


def test_a_misspelt_command_is_not_a_prompt(shell):
    """`%mii unlod` generated 128 tokens from the prompt "unlod"; `--` keeps it one."""
    for typo, meant in (("unlod", "unload"), ("lod", "load"), ("atach", "attach")):
        result, out = run(shell, f"%mii {typo}")
        assert isinstance(result.error_in_exec, UsageError), out
        assert f"did you mean `%mii {meant}`" in out and f"%mii -- {typo}" in out, out
    result, out = run(shell, "%mii -- unlod")  # a prompt: no model in use here
    assert "did you mean" not in out, out


def test_a_misspelt_option_of_the_cell_magic_names_the_option_meant():
    """`%%mii --max-new-tokns 5` said only "unrecognized arguments", where the line
    magic and the CLI name the option meant."""
    from IPython.core.error import UsageError

    from mii.magic_line import split_args
    from mii.magic_options import generation_parser

    with pytest.raises(UsageError, match=r"did you mean --max-new-tokens\?"):
        generation_parser("%%mii").parse_args(split_args("--max-new-tokns 5"))


class FailingOutput(Recorder):
    """A stdout whose fourth write fails (a closed pipe, a broken display)."""

    def write(self, text: str) -> int:
        if len(self.flushed) >= 3:
            raise RuntimeError("the output went away")
        return super().write(text)


def test_a_failing_output_aborts_the_request(shell, llama):
    """Only Ctrl-C aborted the request: when the output failed mid-stream, the error
    stopped the cell and the model generated the whole answer for nobody (the
    traceback IPython keeps held the stream open)."""
    magics = shell.magics_manager.registry["MiiMagics"]
    shell.run_line_magic("mii", f"load {llama}")
    before = magics.model.engine.stats()["generation_tokens"]
    failing, stdout = FailingOutput(), sys.stdout
    sys.stdout = failing
    try:
        result = shell.run_cell("%mii --max-new-tokens 200 --ignore-eos -- Once upon a time")
    finally:
        sys.stdout = stdout
    assert isinstance(result.error_in_exec, RuntimeError), result.error_in_exec
    engine = magics.model.engine
    magics.model.submit(engine.wait_idle()).result(timeout=60)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["kv_cache_usage"] == 0, stats
    assert stats["generation_tokens"] - before < 200, stats


def test_a_prompt_that_starts_with_a_command_word_is_not_that_command(shell, llama):
    """`%mii unload the truck please` freed the model in use (minutes to load again on
    a GPU) and ignored the rest; `%mii help me write a poem` printed the usage. A
    command word with words after it it does not take is refused, saying how to send
    such a prompt."""
    magics = shell.magics_manager.registry["MiiMagics"]
    shell.run_line_magic("mii", f"load {llama}")
    for line in ("unload the truck please", "detach yourself", "help me write a poem"):
        result, out = run(shell, f"%mii {line}")
        assert isinstance(result.error_in_exec, UsageError), out
        assert f"%mii -- {line}" in out, out
        assert magics.model is not None  # still loaded
    for line in ("load balancing explained", "attach the file to an email"):
        result, out = run(shell, f"%mii {line}")
        assert isinstance(result.error_in_exec, UsageError), out
        assert f"%mii -- {line}" in out, out
        assert magics.model is not None
    with mii.pipeline(llama) as pipe:
        expected = pipe("unload the truck", do_sample=False, max_new_tokens=3)[0].generated_text
    result, out = run(shell, "%mii --greedy --max-new-tokens 3 -- unload the truck")
    assert result.success and out == expected + "\n", out


def test_unknown_options_after_the_prompt_are_refused():
    """`%mii Tell me a joke --max-new-tokens 5 --temp 0.5` sent the whole tail as
    prompt text with the default 128 tokens: an option-like word after known options
    is an unknown option, and the start of one option's name (argparse's
    abbreviation) a near miss."""
    from IPython.core.error import UsageError

    from mii.magic_options import split_line

    for line, meant in (
        ("Tell me a joke --max-new-tokens 5 --temp 0.5", "--temperature"),
        ("Tell me a joke --max-new-tokens 5 -t 0.5", None),
        ("--temprature 0.5 Tell me a joke", "--temperature"),
    ):
        with pytest.raises(UsageError, match="unknown option") as err:
            split_line(line)
        if meant:
            assert f"did you mean {meant!r}" in str(err.value), err.value
    # still prompt text: words that are no option's (the start of one's name among
    # them: `git add --all`), numbers, text after options, --help after the prompt
    for line in (
        "Is 5 --greedy -3 smaller?",
        "Explain git push --force",
        "Explain git add --all",
        "What does pip install --pre do",
        "x --max-new-tokens 3 -- y",
        "The answer is --greedy -ish",
        "Explain the output of grep --help",
        "What does ls -h",
    ):
        assert split_line(line) == ([], line), line


def test_help_lists_every_generation_option(shell):
    """`%mii --help` printed the short usage only (no --min-p, penalties, structured
    output); `%mii --max-new-tokens 3 --help` said "unknown option '--help'"."""
    for line in ("--help", "--max-new-tokens 3 --help", "-h"):
        result, out = run(shell, f"%mii {line}")
        assert result.success, out
        for option in ("--min-p", "--repetition-penalty", "--json-schema", "--max-new-tokens"):
            assert option in out, (line, out)
    assert "%mii load MODEL" in shell.find_line_magic("mii").__doc__
    # a misspelt option of a command: the option meant, not the prompt hint
    result, out = run(shell, "%mii load M --max-lenght 5")
    assert "did you mean --max-length?" in out and "%mii -- load" not in out, out
    result, out = run(shell, "%mii load --help")
    assert result.success and "--max-length" in out and "--dtype" in out, out


def test_attach_takes_an_api_key(shell):
    """`%mii attach HOST:PORT --api-key KEY` looked for a deployment named
    "HOST:PORT --api-key KEY"; the key is an option of attach."""
    port = free_port()
    result, out = run(shell, f"%mii attach 127.0.0.1:{port} --api-key sekret")
    assert isinstance(result.error_in_exec, UsageError), out
    assert "named" not in out and f"127.0.0.1:{port}" in out, out


def test_line_magic_fills_in_notebook_variables_as_ipython_does(shell, llama, monkeypatch):
    """As in every line magic: {expression} and $name from the notebook, {{ }} and $$
    literal; a cell magic's body is taken as typed (documented in the usage)."""
    magics = shell.magics_manager.registry["MiiMagics"]
    sent = []
    monkeypatch.setattr(magics, "_generate", lambda prompt, params, chat: sent.append(prompt))
    shell.user_ns["topic"] = "cats"
    run(shell, "%mii Write about {topic} and $topic, not {{topic}} or $$topic")
    run(shell, "%%mii\nWrite about {topic}\n")
    assert sent == ["Write about cats and cats, not {topic} or $topic", "Write about {topic}"]


def test_unloading_the_extension_removes_the_magic(shell, llama):
    """%unload_ext left %mii registered on the closed instance: a model loaded then was
    leaked by the next %load_ext, which made a new one."""
    shell.run_line_magic("mii", f"load {llama}")
    shell.run_line_magic("unload_ext", "mii")
    try:
        assert shell.find_line_magic("mii") is None and shell.find_cell_magic("mii") is None
        assert "MiiMagics" not in shell.magics_manager.registry
    finally:
        shell.run_line_magic("load_ext", "mii")
    magics = shell.magics_manager.registry["MiiMagics"]
    assert magics.model is None  # the old one was freed with its instance
    assert shell.find_line_magic("mii").__self__ is magics


@pytest.fixture
def config_lacking_a_field(llama, tmp_path) -> str:
    """The tiny llama with no intermediate_size in its config.json."""
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(llama, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["intermediate_size"]
    (broken / "config.json").write_text(json.dumps(config))
    return str(broken)


@pytest.mark.parametrize("case", ["max_length", "config"])
def test_a_load_that_cannot_work_keeps_the_model_in_use(shell, llama, config_lacking_a_field, case):
    """`%mii load M --max-length 10000000`, or a config.json lacking a field its family
    reads, freed the model in use, then failed: the engine's max_length against the
    model's and the family's (weightless) build are part of the check."""
    load, said = {
        "max_length": (f"{llama} --max-length 10000000", "exceeds the model's maximum"),
        "config": (config_lacking_a_field, "intermediate_size"),
    }[case]
    magics = shell.magics_manager.registry["MiiMagics"]
    shell.run_line_magic("mii", f"load {llama}")
    loaded = magics.model
    result, out = run(shell, f"%mii load {load}")
    assert isinstance(result.error_in_exec, UsageError), out
    assert said in out and "stays loaded" in out, out
    assert magics.model is loaded and not loaded.closed
