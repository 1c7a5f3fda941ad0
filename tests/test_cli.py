"""The ``mii`` command line, run for real as subprocesses (``python -m mii ...``)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mii
from mii.cli import build_parser
from mii.cli.options import generation_params
from mii.config import CLI_MAX_NEW_TOKENS
from mii.rpc import registry
from mii.rpc.deployment import free_port

GREEDY = ["--greedy", "--max-new-tokens", "8"]
SUBCOMMANDS = ["serve", "generate", "list", "terminate", "demo"]
# Options the brief of each subcommand promises.
SERVE_OPTIONS = [
    "--deployment-name",
    "--port",
    "--grpc-port",
    "--host",
    "--replica-num",
    "--tensor-parallel",
    "--enable-restful-api",
    "--restful-api-port",
    "--dtype",
    "--device",
    "--max-length",
    "--kv-block-size",
    "--kv-cache-dtype",
    "--num-kv-blocks",
    "--token-budget",
    "--max-num-seqs",
    "--load-format",
    "--trust-remote-code",
]
GENERATE_OPTIONS = [
    "--prompt",
    "--max-new-tokens",
    "--min-new-tokens",
    "--ignore-eos",
    "--greedy",
    "--seed",
    "--temperature",
    "--top-p",
    "--top-k",
    "--stop",
]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private registry and cache, here and in every ``mii`` subprocess."""
    path = tmp_path / "cache"
    monkeypatch.setenv("MII_CACHE_DIR", str(path))
    return path


def mii_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}


def start_mii(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mii", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        env=mii_env(),
    )


def run_mii(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    process = start_mii(*args)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"mii {' '.join(args)} did not finish in {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


_expected: dict[tuple[str, str], str] = {}


def pipeline_text(model: str, *prompts: str) -> list[str]:
    """The pipeline's greedy answers (8 new tokens), the oracle of every command."""
    missing = [p for p in prompts if (model, p) not in _expected]
    if missing:
        with mii.pipeline(model) as pipe:
            for prompt, r in zip(missing, pipe(missing, do_sample=False, max_new_tokens=8)):
                _expected[model, prompt] = r.generated_text
    return [_expected[model, p] for p in prompts]


def test_every_argument_has_help():
    parser = build_parser()
    [subparsers] = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    assert sorted(subparsers.choices) == sorted(SUBCOMMANDS)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help, f"mii {name}: {action.option_strings or action.dest} has no help"


def test_options_go_between_and_after_the_prompts():
    """README's ``mii generate MODEL --chat "question"``: argparse's plain parse ended
    the prompts at the first option and refused the question ("unrecognized
    arguments")."""
    from mii.cli.commands import parse_command_line

    parser = build_parser()
    args = parse_command_line(parser, ["generate", "m", "--chat", "What?", "--greedy", "Why?"])
    assert (args.command, args.model, args.prompt_args) == ("generate", "m", ["What?", "Why?"])
    assert args.chat and args.greedy
    args = parse_command_line(parser, ["generate", "m", "--max-new-tokens", "5", "Seattle is"])
    assert args.prompt_args == ["Seattle is"] and args.max_new_tokens == 5
    # "--" ends the options, as before: prompts may then start with "-"
    for argv in (["--", "m", "-x"], ["--greedy", "--", "m", "-x"], ["m", "--", "-x"]):
        args = parse_command_line(parser, ["generate", *argv])
        assert (args.model, args.prompt_args) == ("m", ["-x"]), argv
    # ... also after an option or a prompt that follows MODEL (docs/cli.md: options go
    # anywhere); argparse refused them ("unrecognized arguments: -- -5 is")
    for argv, prompts in (
        (["m", "--greedy", "--max-new-tokens", "4", "--", "-5 is"], ["-5 is"]),
        (["m", "x", "--greedy", "--", "-5 is", "--chat"], ["x", "-5 is", "--chat"]),
    ):
        args = parse_command_line(parser, ["generate", *argv])
        assert (args.model, args.prompt_args, args.greedy) == ("m", prompts, True), argv
        assert not args.chat
    # An option whose value would come after "--" still lacks one (review: it took the
    # placeholder that stood in for "-x", and sent a NUL as the prompt)
    for option in ("--prompt", "--stop", "--max-new-tokens"):
        with pytest.raises(SystemExit):
            parse_command_line(parser, ["generate", "m", option, "--", "-x"])


def test_the_demo_takes_questions_as_words():
    """``mii demo "question"`` was refused (only --prompt took one)."""
    from mii.cli.commands import parse_command_line

    args = parse_command_line(build_parser(), ["demo", "Why?", "--greedy", "How?"])
    assert (args.model, args.prompt_args) == (None, ["Why?", "How?"])
    assert args.greedy and args.chat


def test_a_mistyped_option_gets_its_commands_usage_and_the_nearest_option(capsys):
    from mii.cli.commands import parse_command_line

    for argv, said in (
        (["serve", "m", "--max-model-lenn", "512"], "did you mean --max-model-len?"),
        (["demo", "--temprature", "0.5"], "did you mean --temperature?"),
        # an abbreviation is not taken (--gpu-mem ran as --gpu-memory-utilization, silently)
        (["serve", "m", "--gpu-mem", "0.5"], "did you mean --gpu-memory-utilization?"),
        # a prompt that starts with "-": argparse's "ignored explicit argument 'ello'"
        (["generate", "m", "-hello"], "goes after --: mii generate MODEL -- PROMPT)\n"),
        (["demo", "-xyz"], "goes after --: mii demo -- QUESTION)\n"),
        # a per-request option given to serve: no misleading guess (--max-num-batched-tokens)
        (["serve", "m", "--max-new-tokens", "5"], "unrecognized arguments: --max-new-tokens 5\n"),
        # a vLLM flag mii does not take: what to do instead
        (["serve", "m", "--max-logprobs", "5"], "--max-logprobs is vLLM's: mii's limit is fixed"),
        (["serve", "m", "--lora-modules", "a=b"], "--lora-modules is vLLM's: mii serves no LoRA"),
        (["serve", "m", "--reasoning-parser", "qwen3"], "stays in content"),
        # more of vllm serve's flags (SRE trial: refused with a bare "unrecognized")
        (["serve", "m", "--ssl-keyfile", "k.pem"], "terminate TLS in a reverse proxy"),
        (["serve", "m", "--root-path", "/llm"], "strip its path"),
        (["serve", "m", "--download-dir", "/d"], "HF_HOME"),
        (["serve", "m", "--config", "c.yaml"], "reads no config file"),
        (["serve", "m", "--distributed-executor-backend", "ray"], "--ray-address ADDR"),
        # vllm serve flags mii ignores still take only what vllm serve takes (any was)
        (["serve", "m", "--swap-space", "abc"], "--swap-space: invalid float value: 'abc'"),
        (["serve", "m", "--max-num-partial-prefills", "2.5"], "invalid int value: '2.5'"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parse_command_line(build_parser(), argv)
        assert exit_.value.code == 2
        stderr = capsys.readouterr().err
        assert f"usage: mii {argv[0]}" in stderr and said in stderr, stderr


def test_vllm_model_flag_and_data_parallel_size(monkeypatch):
    """vllm serve's --model (its api_server's form, common in Helm charts) and
    --data-parallel-size / -dp (N engines behind one server: mii's replicas) were
    refused; -dp's "did you mean --tensor-parallel-size?" pointed the wrong way."""
    from mii.cli.commands import parse_command_line
    from mii.cli.errors import CliError
    from mii.cli.serve import serve_config

    monkeypatch.delenv("MII_API_KEY", raising=False)

    def config(*argv: str):
        return serve_config(parse_command_line(build_parser(), ["serve", *argv]))

    assert config("--model", "org/m").model == "org/m"
    assert config("org/m", "--model", "org/m").model == "org/m"
    with pytest.raises(CliError, match="two models given"):
        config("org/a", "--model", "org/b")
    assert config("org/m", "--data-parallel-size", "3").replica_num == 3
    assert config("org/m", "-dp", "2").replica_num == 2
    assert config("org/m").replica_num == 1
    # tuning flags of vllm serve with no counterpart: accepted, changing nothing
    assert config("org/m", "--max-seq-len-to-capture", "8192").model == "org/m"
    # flags whose value means what mii does: accepted; another value: what to do
    for same in (("-pp", "1"), ("--task", "generate"), ("--tokenizer-mode", "auto")):
        assert config("org/m", *same).model == "org/m"
    for other, said in (
        (("--pipeline-parallel-size", "2"), "--pipeline-parallel-size 2: mii has no pipeline"),
        (("-pp", "4"), "no pipeline parallelism"),
        (("--task", "embed"), "--task embed: mii serves text generation"),
        (("--tokenizer-mode", "slow"), "fast tokenizer"),
    ):
        with pytest.raises(CliError, match=said):
            config("org/m", *other)


def test_vllm_request_id_flag_is_accepted():
    """vllm serve's --enable-request-id-headers: what the gateway always does."""
    from mii.cli.commands import parse_command_line
    from mii.cli.options import deployment_options

    args = parse_command_line(build_parser(), ["serve", "m", "--enable-request-id-headers"])
    assert args.request_id_headers and "request_id_headers" not in deployment_options(args)


def test_vllm_flags_for_what_mii_always_does_are_accepted(monkeypatch):
    """vllm serve launch scripts carry --enable-chunked-prefill, --swap-space, ...:
    they stopped mii serve with "unrecognized arguments" (user trial). Accepted and
    left out of the deployment; a structured-output backend other than xgrammar is
    refused by name."""
    from mii.cli.commands import parse_command_line
    from mii.cli.errors import CliError
    from mii.cli.options import deployment_options
    from mii.cli.serve import serve_config

    monkeypatch.delenv("MII_API_KEY", raising=False)
    flags = [
        "--enable-chunked-prefill",
        "--enable-prompt-tokens-details=True",  # vllm serve's older form
        "--enable-chunked-prefill",
        "--disable-fastapi-docs",
        *("--swap-space", "4"),
        *("--guided-decoding-backend", "xgrammar"),
        *("--long-prefill-token-threshold", "2048", "--max-num-partial-prefills", "4"),
    ]
    plain = deployment_options(parse_command_line(build_parser(), ["serve", "org/m"]))
    args = parse_command_line(build_parser(), ["serve", "org/m", *flags])
    assert serve_config(args).model == "org/m" and deployment_options(args) == plain
    args = parse_command_line(
        build_parser(), ["serve", "org/m", "--guided-decoding-backend", "outlines"]
    )
    with pytest.raises(CliError, match=r"--guided-decoding-backend outlines: .*xgrammar"):
        serve_config(args)
    args = parse_command_line(
        build_parser(), ["serve", "org/m", "--guided-decoding-backend", "xgrammar:no-fallback"]
    )
    assert serve_config(args).model == "org/m"
    args = parse_command_line(
        build_parser(), ["serve", "org/m", "--enable-chunked-prefill", "false"]
    )
    with pytest.raises(CliError, match="--enable-chunked-prefill false: mii always"):
        serve_config(args)


def test_short_prompt_reserve_flag_reaches_the_engine_options():
    from mii.cli.commands import parse_command_line
    from mii.cli.serve import serve_config

    args = parse_command_line(build_parser(), ["serve", "org/m", "--short-prompt-reserve", "1K"])
    assert serve_config(args).engine_options["short_prompt_reserve"] == 1024
    args = parse_command_line(
        build_parser(), ["serve", "org/m", "--token-budget", "512", "--short-prompt-reserve", "300"]
    )
    with pytest.raises(Exception, match=r"short_prompt_reserve \(300\).*token_budget \(512\)"):
        serve_config(args)


def test_help_of_every_subcommand():
    runs = {None: start_mii("--help")}
    runs.update({name: start_mii(name, "--help") for name in SUBCOMMANDS})
    out = {}
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, (name, stderr)
        out[name] = stdout
    for name in SUBCOMMANDS:
        assert name in out[None]
        assert f"usage: mii {name}" in out[name]
    for option in SERVE_OPTIONS:
        assert option in out["serve"], option
    for option in GENERATE_OPTIONS:
        assert option in out["generate"], option
    assert "MODEL_OR_DEPLOYMENT" in out["generate"] and "PROMPT" in out["generate"]
    assert "--json" in out["list"]


def test_generation_options_reach_the_request():
    args = build_parser().parse_args(
        ["generate", "m", "p", "--ignore-eos", "--min-new-tokens", "3", "--top-k", "5"]
    )
    params = generation_params(args)
    assert params["ignore_eos"] is True and params["min_new_tokens"] == 3 and params["top_k"] == 5
    # Accepted by the request validator, so no option is dropped or misnamed on the way.
    mii.GenerateParams(**params)
    assert "ignore_eos" not in generation_params(build_parser().parse_args(["generate", "m"]))


def test_greedy_with_a_sampling_option_is_refused():
    """``--greedy --temperature 1.5``: the temperature was silently ignored (the same
    text for every value and seed)."""
    for flag, value in (("--temperature", "1.5"), ("--top-p", "0.5"), ("--min-p", "0.1")):
        args = build_parser().parse_args(["generate", "m", "p", "--greedy", flag, value])
        with pytest.raises(mii.InvalidRequestError, match=f"--greedy .* so {flag} would change"):
            generation_params(args)
    args = build_parser().parse_args(["generate", "m", "p", "--greedy", "--seed", "3"])
    expected = {"max_new_tokens": CLI_MAX_NEW_TOKENS, "seed": 3, "do_sample": False}
    assert generation_params(args) == expected


def test_sampling_options_reach_the_request():
    argv = (
        "generate m p --repetition-penalty 1.2 --presence-penalty -0.5 --frequency-penalty 0.3 "
        "--min-p 0.1 --logit-bias 5=-100,7=2.5 --stop-token-ids 3 --stop-token-ids 4 "
        "--no-skip-special-tokens"
    )
    args = build_parser().parse_args(argv.split())
    params = generation_params(args)
    assert params == {
        "max_new_tokens": 48,
        "repetition_penalty": 1.2,
        "presence_penalty": -0.5,
        "frequency_penalty": 0.3,
        "min_p": 0.1,
        "logit_bias": {5: -100.0, 7: 2.5},
        "stop_token_ids": [3, 4],
        "skip_special_tokens": False,
    }
    mii.GenerateParams(**params)
    defaults = generation_params(build_parser().parse_args(["generate", "m"]))
    assert "skip_special_tokens" not in defaults and "logit_bias" not in defaults


def test_engine_options_reach_the_engine_config():
    from mii.cli.options import engine_options

    args = build_parser().parse_args(
        ["generate", "m", "p", "--kv-cache-dtype", "fp8", "--kv-block-size", "32"]
    )
    options = engine_options(args)
    assert options == {"kv_cache_dtype": "fp8", "kv_block_size": 32}
    mii.EngineConfig(model="m", **options)  # names and values the config accepts


def test_generate_in_process_equals_pipeline(llama, cache):
    # One prompt positional after MODEL, one with --prompt.
    result = run_mii("generate", llama, "DeepSpeed is", "--prompt", "Seattle is", *GREEDY)
    assert result.returncode == 0, result.stderr
    first, second = pipeline_text(llama, "DeepSpeed is", "Seattle is")
    assert result.stdout == f"DeepSpeed is{first}\nSeattle is{second}\n"
    assert result.stderr.count("8 tokens") == 2
    # A request refused before any text leaves stdout empty (the prompt was printed
    # first and the error came after it: "Seattle is" with no answer nor line break).
    for refused in (["--max-length", "2"], ["--chat", "--regex", "[0-9"]):
        result = run_mii("generate", llama, "Seattle is", *GREEDY, *refused)
        assert result.returncode == 1 and result.stdout == "", (refused, result.stdout)
        assert "error" in result.stderr


def test_a_prompt_from_standard_input(llama, cache, monkeypatch, capsys):
    """``echo "Seattle is" | mii generate MODEL`` ran the default prompts and ignored
    the pipe; ``-`` reads the prompt from standard input."""
    import io

    from mii.cli.commands import main

    monkeypatch.setattr("sys.stdin", io.StringIO("Seattle is\n"))
    assert main(["generate", llama, "-", *GREEDY]) == 0
    [expected] = pipeline_text(llama, "Seattle is")
    assert capsys.readouterr().out == f"Seattle is{expected}\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert main(["generate", llama, "-", *GREEDY]) == 1
    assert "standard input, which was empty" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", None)  # closed (`<&-`): was an AttributeError traceback
    assert main(["generate", llama, "-", *GREEDY]) == 1
    assert "standard input, which is closed" in capsys.readouterr().err


def test_serve_foreground_generate_list_and_ctrl_c(llama, cache):
    port, name = free_port(), "cli-test"
    server = start_mii(
        "serve",
        llama,
        "--deployment-name",
        name,
        "--grpc-port",
        str(port),
        "--port",
        str(free_port()),
        "--max-length",
        "64",
    )
    try:
        deadline = time.monotonic() + 60
        while registry.lookup(name) is None:
            assert server.poll() is None, server.communicate()
            assert time.monotonic() < deadline, "the deployment did not start in 60 s"
            time.sleep(0.2)
        info = registry.lookup(name)
        pids = [info["pid"], *info["replica_pids"]]
        assert info["pid"] == server.pid  # in the foreground: this very process

        listed = run_mii("list")
        assert listed.returncode == 0, listed.stderr
        [row] = [line for line in listed.stdout.splitlines() if line.startswith(name)]
        assert f"127.0.0.1:{port}" in row and llama in row

        result = run_mii("generate", name, "--prompt", "DeepSpeed is", *GREEDY)
        assert result.returncode == 0, result.stderr
        [expected] = pipeline_text(llama, "DeepSpeed is")
        assert result.stdout == f"DeepSpeed is{expected}\n"
        assert "deployment 'cli-test'" in result.stderr
        # --max-length is a request's cap there too (it was ignored with the engine
        # options); the engine options left are named as ignored.
        from transformers import AutoTokenizer

        prompt_length = len(AutoTokenizer.from_pretrained(llama)("DeepSpeed is").input_ids)
        capped = run_mii(
            "generate", name, "--prompt", "DeepSpeed is", *GREEDY,
            "--max-length", str(prompt_length + 2), "--dtype", "float32",
        )  # fmt: skip
        assert capped.returncode == 0, capped.stderr
        text = capped.stdout.removesuffix("\n")
        assert result.stdout.startswith(text) and len(text) < len(result.stdout) - 1, text
        assert "ignored for a running deployment: --dtype" in capped.stderr
        refused = run_mii("generate", name, "--prompt", "DeepSpeed is", "--max-length", "2")
        assert refused.returncode == 1 and refused.stdout == "", refused.stdout
        # --chat with a deployment: its chat template (from its record) here, the ids
        # generated there: the answer of the model loaded here with --chat (it was
        # refused, pointing at the OpenAI route)
        chat = run_mii("generate", name, "--chat", "--prompt", "Hi", *GREEDY)
        assert chat.returncode == 0, chat.stderr
        local = run_mii("generate", llama, "--chat", "--prompt", "Hi", *GREEDY)
        assert local.returncode == 0, local.stderr
        assert chat.stdout.startswith("> Hi\n") and chat.stdout == local.stdout
        # by its address: the record at that address (it was refused: "has no record")
        chat = run_mii("generate", f"localhost:{port}", "--chat", "--prompt", "Hi", *GREEDY)
        assert chat.returncode == 0 and chat.stdout == local.stdout, chat.stderr
        # an address where nothing answers: said so, before any template is looked for
        chat = run_mii("generate", f"127.0.0.1:{port + 1}", "--chat", "--prompt", "Hi", *GREEDY)
        assert chat.returncode == 1 and "no mii deployment answers" in chat.stderr, chat.stderr

        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert server.returncode == 0, err
    assert f"127.0.0.1:{port}" in out + err  # it said where it serves
    assert "stopped" in err
    assert registry.lookup(name) is None
    deadline = time.monotonic() + 10
    while any(registry.pid_alive(p) for p in pids):
        assert time.monotonic() < deadline, "deployment processes left behind"
        time.sleep(0.1)
    with socket.socket() as s:  # nothing listens on the port any more
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_errors_exit_non_zero_with_one_line(llama, cache):
    with socket.socket() as taken:  # a start-up error: the port is in use
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        serve = start_mii("serve", llama, "--grpc-port", str(port), "--port", str(free_port()))
        terminate = start_mii("terminate", "no-such-deployment")
        bad_option = start_mii("serve", llama, "--token-budget", "0")
        _, err = serve.communicate(timeout=120)
    assert serve.returncode == 1
    assert err.strip().splitlines()[-1] == (
        f"mii serve: error: cannot listen on 127.0.0.1:{port} (is the port in use? "
        "choose another: mii serve --grpc-port, mii.serve(port=...))"
    )
    assert "Failed to add port" not in err  # grpc's own log line came before ours
    _, err = terminate.communicate(timeout=120)
    assert terminate.returncode == 1
    assert err.strip().startswith(
        "mii terminate: error: no running deployment named 'no-such-deployment' is recorded in "
    )
    assert err.strip().endswith("(see: mii list; --ignore-not-found: exit 0 then)")
    assert len(err.strip().splitlines()) == 1
    _, err = bad_option.communicate(timeout=120)
    assert bad_option.returncode == 1
    assert err.strip().startswith("mii serve: error: invalid engine option 'token_budget'")


def test_the_real_demo_samples_with_its_model_cards_settings(monkeypatch):
    """mii demo on SmolLM2 samples at temperature 0.2 / top_p 0.9 (mii's defaults
    ramble on a 135M model); the command line's own options win."""
    import mii.cli.generate as generate_cli
    import mii.demo

    seen = []
    monkeypatch.setattr(
        mii.demo,
        "demo_model",
        lambda: mii.demo.DemoModel(path="x.gguf", real=True, name="SmolLM2"),
    )
    monkeypatch.setattr(
        generate_cli, "_generate_in_process", lambda *args, **kw: seen.append(args[3]) or 0
    )
    from mii.cli.commands import main

    assert main(["demo"]) == 0
    assert main(["demo", "--temperature", "0.9"]) == 0
    assert main(["demo", "--greedy"]) == 0
    assert seen[0]["temperature"] == 0.2 and seen[0]["top_p"] == 0.9
    assert seen[1]["temperature"] == 0.9
    assert seen[2]["do_sample"] is False


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, tmp_path):
    """`mii list --json | head -5` sometimes printed 'mii list: error: [Errno 32]
    Broken pipe' and exited 1 (user trial): the reader leaving is not an error."""
    import io
    import os

    from mii.cli.commands import main

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    read_end, write_end = os.pipe()

    class ClosedPipe(io.TextIOBase):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return write_end

    monkeypatch.setattr("sys.stdout", ClosedPipe())
    try:
        assert main(["list", "--json"]) == 0
    finally:
        os.close(read_end)
        os.close(write_end)


def test_terminate_refuses_a_timeout_that_is_not_positive(capsys):
    """``--timeout -5`` asked the deployment to stop, then reported it "still running
    after -5.0 s": the value is refused before anything is done."""
    from mii.cli.commands import parse_command_line

    for bad in ("-5", "0", "abc", "nan", "inf"):
        with pytest.raises(SystemExit) as stopped:
            parse_command_line(build_parser(), ["terminate", "x", "--timeout", bad])
        assert stopped.value.code == 2
        assert "is not a positive number of seconds" in capsys.readouterr().err
    args = parse_command_line(build_parser(), ["terminate", "x", "--timeout", "2.5"])
    assert args.timeout == 2.5


def test_an_unusable_cache_directory_is_named_with_its_variable(tmp_path, monkeypatch, capsys):
    """``MII_CACHE_DIR`` at a file: "[Errno 20] Not a directory: '.../deployments'" did
    not say where that path came from."""
    from mii.cli.commands import main

    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("MII_CACHE_DIR", str(not_a_dir))
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mii list: error: [Errno 20] Not a directory"), err
    assert f"mii's cache directory is {not_a_dir}: set MII_CACHE_DIR" in err


def test_an_option_error_names_the_flag_to_change(llama, cache, capsys):
    """mii serve's errors named the flag; mii generate's only the Python name
    ('max_new_tokens'), which is not what was typed."""
    from mii.cli.commands import main

    assert main(["generate", llama, "hi", "--max-new-tokens", "-1"]) == 1
    err = capsys.readouterr().err
    assert "'max_new_tokens'" in err and err.rstrip().endswith("(flag --max-new-tokens)"), err
    assert main(["generate", llama, "hi", "--device", "cuda:99"]) == 1
    assert capsys.readouterr().err.rstrip().endswith("(flag --device)")
    # the name typed: mii's own, or the vLLM alias beside it (a trial: the error for
    # --gpu-memory-utilization named --kv-cache-memory-fraction)
    assert main(["generate", llama, "hi", "--max-length", "0"]) == 1
    assert capsys.readouterr().err.rstrip().endswith("(flag --max-length)")
    assert main(["generate", llama, "hi", "--max-model-len=0"]) == 1
    assert capsys.readouterr().err.rstrip().endswith("(flag --max-model-len)")
    for flags, named in ((["-dp", "0"], "-dp"), (["--restful-api-port", "99999"], None)):
        assert main(["serve", llama, *flags]) == 1  # deployment options' aliases too
        assert capsys.readouterr().err.rstrip().endswith(f"(flag {named or flags[0]})")
    # a prompt given as an argument is no --prompt; --truncate-prompt-tokens, which the
    # advice names, is a flag (it was not)
    assert main(["generate", llama, "a b c d e f g h", "--max-length", "3"]) == 1
    err = capsys.readouterr().err
    assert "truncate_prompt_tokens" in err and "(flag --prompt)" not in err, err
    assert main(["generate", llama, "a b c d e f g h", "--max-length", "3",
                 "--truncate-prompt-tokens", "-1", "--max-new-tokens", "1"]) == 0  # fmt: skip
    # mii serve's deployment options too (only those renamed for vLLM were named), and
    # a startup timeout of 0 is refused, not a start that fails at once
    for flag, value in (("--shutdown-grace-s", "-1"), ("--startup-timeout", "0")):
        assert main(["serve", llama, flag, value]) == 1
        assert capsys.readouterr().err.rstrip().endswith(f"(flag {flag})")


def test_an_address_that_is_no_deployment_s_says_what_answers_there(capsys):
    """`mii generate HOST:PORT` / `mii terminate` at the HTTP port said only "no mii
    deployment answers" (mii.client names the REST / OpenAI port); a URL or a port
    past 65535 is refused as what it is (a user trial)."""
    import http.server
    import threading

    from mii.cli import main as mii_main

    http_api = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=http_api.serve_forever, daemon=True).start()
    try:
        address = f"127.0.0.1:{http_api.server_address[1]}"
        for argv in (["generate", address, "hi"], ["terminate", address]):
            assert mii_main(argv) == 1
            said = capsys.readouterr().err
            assert "no mii deployment answers" in said and "REST / OpenAI port" in said, said
    finally:
        http_api.shutdown()
    for target, said in (("http://127.0.0.1:8000", "is a URL"), ("127.0.0.1:99999", "1..65535")):
        assert mii_main(["generate", target, "hi"]) == 1
        assert said in capsys.readouterr().err
