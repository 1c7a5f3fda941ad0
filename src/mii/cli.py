"""The ``mii`` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    import asyncio

    import mii
    from mii.demo import demo_model_path

    model = args.model
    if model is None:
        model = str(demo_model_path())
        print(f"[mii] no model given: using the built-in demo model ({model}).", file=sys.stderr)
        print("[mii] its weights are random, so its text is random too.", file=sys.stderr)
    options = {"device": args.device} if args.device else {}
    engine = mii.AsyncEngine(model, **options)
    params = {"max_new_tokens": args.max_new_tokens, "do_sample": not args.greedy}
    if args.seed is not None:
        params["seed"] = args.seed

    async def run() -> None:
        for prompt in args.prompt:
            start, pieces = time.perf_counter(), 0
            print(prompt, end="", flush=True)
            async for piece in engine.stream(prompt, **params):
                print(piece.generated_text, end="", flush=True)
                pieces = piece.generated_length
            elapsed = time.perf_counter() - start
            print(f"\n[mii] {pieces} tokens in {elapsed:.2f} s", file=sys.stderr)
        await engine.aclose()

    asyncio.run(run())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mii", description="Fast LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("generate", "stream generated text to the terminal"),
        ("demo", "run the built-in demo model"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name == "generate":
            p.add_argument(
                "model",
                nargs="?",
                default=None,
                help="hub id or local path (default: the demo model)",
            )
        p.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable)")
        p.add_argument("--max-new-tokens", type=int, default=48)
        p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
        p.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) is None:
        args.model = None
    if not args.prompt:
        args.prompt = ["DeepSpeed is", "Seattle is"]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
