"""``vllm serve`` flags that a launch script carried over to ``mii serve`` may hold.

Three kinds (docs/cli.md):

- flags for what mii always does: accepted and ignored, each one's help says why
  (``--enable-chunked-prefill``: Dynamic SplitFuse splits every long prompt);
- flags that choose something mii has only one of: accepted when they choose it,
  an error naming the one mii has otherwise (``--guided-decoding-backend``);
- flags of features mii does not have (``NOT_TAKEN``): an error saying what to do
  instead, rather than argparse's bare "unrecognized arguments".
"""

from __future__ import annotations

import argparse

from mii.cli.errors import CliError

# Switches of vllm serve for what mii does anyway.
ALWAYS_ON = {
    "--enable-chunked-prefill": "Dynamic SplitFuse always splits long prompts into chunks",
    "--enable-prompt-tokens-details": "usage.prompt_tokens_details.cached_tokens is always "
    "reported",
    "--disable-fastapi-docs": "the gateway serves no /docs or /redoc pages",
}
# Options of vllm serve with a value mii has no use for.
IGNORED_VALUES = {
    "--swap-space": "preempted sequences are recomputed, never swapped to CPU memory",
    "--max-seq-len-to-capture": "mii chooses the CUDA-graph batch sizes itself "
    "(--max-graph-batch); decode passes of every context length replay them",
    "--num-scheduler-steps": "mii schedules one step at a time, overlapped with the GPU "
    "(--async-scheduling)",
    # vLLM's ways of letting short prompts run beside long ones; mii's is its own
    **dict.fromkeys(
        (
            "--long-prefill-token-threshold",
            "--max-num-partial-prefills",
            "--max-long-partial-prefills",
        ),
        "short prompts start beside a long prompt's prefill, before longer prompts "
        "waiting (--short-prompt-reserve sets how many tokens of a pass they may take)",
    ),
}
# Options of vllm serve that mii accepts with the value that means what it does, and
# refuses with any other: (flags, values accepted, what mii does instead).
ONLY_VALUES = {
    "pipeline_parallel_size": (
        ("--pipeline-parallel-size", "-pp"),
        ("1",),
        "mii has no pipeline parallelism: split a model over the GPUs of one host with "
        "--tensor-parallel-size, and scale out with --replica-num or a Ray cluster "
        "(--backend ray, docs/multi_node.md)",
    ),
    "tokenizer_mode": (
        ("--tokenizer-mode",),
        ("auto",),
        "mii reads the checkpoint's fast tokenizer (tokenizer.json); --tokenizer names "
        "another tokenizer",
    ),
    "task": (
        ("--task",),
        ("auto", "generate"),
        "mii serves text generation (vLLM's generate task) only",
    ),
}
# What structured output runs on (--guided-decoding-backend NAME[:OPTIONS]).
STRUCTURED_OUTPUT_BACKENDS = ("xgrammar", "auto")

NOT_TAKEN = {
    "--max-logprobs": "mii's limit is fixed at 20 (vLLM's default); leave the flag out",
    "--lora-modules": "mii serves no LoRA adapters: merge the adapter into the weights "
    "(peft's merge_and_unload) and serve the merged checkpoint",
    "--enable-lora": "mii serves no LoRA adapters: merge the adapter into the weights "
    "(peft's merge_and_unload) and serve the merged checkpoint",
    "--reasoning-parser": "mii does not split reasoning_content from content: the model's "
    "reasoning text stays in content; leave the flag out",
    "--no-enable-chunked-prefill": "mii always splits long prompts (Dynamic SplitFuse); "
    "--token-budget sets the chunk size",
    "--ssl-keyfile": "mii's gateway serves plain HTTP: terminate TLS in a reverse proxy "
    "(nginx, Caddy, a Kubernetes ingress) in front of it",
    "--ssl-certfile": "mii's gateway serves plain HTTP: terminate TLS in a reverse proxy "
    "(nginx, Caddy, a Kubernetes ingress) in front of it",
    "--ssl-ca-certs": "mii's gateway serves plain HTTP: terminate TLS in a reverse proxy "
    "(nginx, Caddy, a Kubernetes ingress) in front of it",
    "--root-path": "the gateway serves its routes at /: let the reverse proxy strip its path "
    "prefix",
    "--download-dir": "models download into the Hugging Face cache: set HF_HOME or "
    "HF_HUB_CACHE to move it",
    "--config": "mii serve reads no config file: pass its options as flags (mii.serve() "
    "takes them as keyword arguments)",
    "--distributed-executor-backend": "mii runs a replica's tensor-parallel ranks as its own "
    "processes on one host; on a Ray cluster the whole deployment goes there with "
    "--ray-address ADDR (or --backend ray), ranks as Ray actors (docs/multi_node.md)",
}


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """Add the vllm serve flags that ``mii serve`` accepts without using them."""
    for flag, why in ALWAYS_ON.items():
        parser.add_argument(  # vllm serve's older form takes a value: --flag [true|false]
            flag,
            nargs="?",
            const="true",
            metavar="true",
            help=f"accepted for vllm serve: {why}",
        )
    for flag, why in IGNORED_VALUES.items():  # (a value vllm serve would refuse is refused)
        number = float if flag == "--swap-space" else int  # (GiB; the others count)
        parser.add_argument(flag, type=number, metavar="N", help=f"accepted for vllm serve: {why}")
    for dest, (flags, values, _) in ONLY_VALUES.items():
        parser.add_argument(
            *flags,
            dest=dest,
            metavar="VALUE",
            help=f"accepted for vllm serve as {' or '.join(values)} (what mii does); "
            "other values are refused",
        )
    parser.add_argument(
        "--guided-decoding-backend",
        metavar="BACKEND",
        help="accepted for vllm serve: structured output runs on xgrammar "
        f"(one of {', '.join(STRUCTURED_OUTPUT_BACKENDS)}; others are refused)",
    )


def check_vllm_flags(args: argparse.Namespace) -> None:
    """CliError where an accepted vllm serve flag asks for what mii does not have."""
    for flag in ALWAYS_ON:
        value = getattr(args, flag.removeprefix("--").replace("-", "_"), None)
        if value is not None and value.lower() not in ("true", "1", "yes"):
            raise CliError(f"{flag} {value}: mii always does this ({ALWAYS_ON[flag]})")
    for dest, (flags, values, why) in ONLY_VALUES.items():
        value = getattr(args, dest, None)
        if value is not None and value not in values:
            raise CliError(f"{flags[0]} {value}: {why}")
    backend = getattr(args, "guided_decoding_backend", None)
    if backend is not None and backend.split(":")[0] not in STRUCTURED_OUTPUT_BACKENDS:
        raise CliError(
            f"--guided-decoding-backend {backend}: mii's structured output runs on "
            "xgrammar only; give xgrammar or auto, or leave the flag out"
        )
