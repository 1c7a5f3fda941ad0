"""The ``mii`` command line (also ``python -m mii``).

    mii serve MODEL [options]            run a deployment in the foreground (Ctrl-C stops it)
    mii generate [MODEL|DEPLOYMENT] ...  stream text from a deployment, or from a model in-process
    mii list                             running deployments on this machine
    mii terminate NAME                   stop a running deployment
    mii demo                             the built-in demo model, end to end

Every subcommand documents its options under ``--help``; the engine, generation
and deployment options are derived from the configuration models
(:mod:`mii.cli.options`), which the Jupyter magics in :mod:`mii.magic` share.
"""

from mii.cli.commands import build_parser, main

__all__ = ["build_parser", "main"]
