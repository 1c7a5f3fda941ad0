"""The engine's side of tensor parallelism: every forward pass reaches every rank.

Rank 0 schedules and, once bring-up is over, sends each pass's description to
the other ranks just before running it; ranks > 0 run what rank 0 sends. The
group, its messages and its failure reporting are ``engine/distributed.py``'s;
this module connects them to the ``ModelRunner``.
"""

from __future__ import annotations

import time

import torch

from mii.engine import distributed
from mii.engine.distributed import TensorParallelError, TPGroup
from mii.engine.model_runner import ModelRunner, PassInputs


class PassRelay:
    """Connects one rank's ``ModelRunner`` to its tensor-parallel group."""

    def __init__(self, group: TPGroup, runner: ModelRunner) -> None:
        self.group = group
        self.runner = runner

    # ----- rank 0 -------------------------------------------------------------

    def start_sending(self) -> None:
        """From now on, send every pass to the other ranks before running it. (The
        warm-up passes of bring-up run on every rank by themselves, in step.)"""
        self.runner.broadcast = self._send_pass

    def _send_pass(self, inputs: PassInputs, pending: torch.Tensor | None):
        self.group.send_pass(inputs.pack(), pending if len(inputs.pending_dst) else None)
        return pending

    def wait(self, ready: torch.cuda.Event) -> None:
        """Wait for a pass without hanging on a failed rank: NCCL waits on the
        device for a rank that is gone, so watch for its reported error."""
        self.group.check()
        next_check = time.monotonic() + 0.01
        while not ready.query():
            time.sleep(50e-6)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + 0.01
                self.group.poll_failure()

    def failed(self, err: BaseException) -> TensorParallelError:
        """A pass failed on this rank: the other ranks may be stuck in one of its
        collectives, so the group is unusable. Leave it, so that their collectives
        fail instead of waiting, and return the failing rank's own error."""
        err = self.group.failed(err)
        distributed.abort()
        return err

    # ----- ranks > 0 ----------------------------------------------------------

    def serve(self) -> bytes | None:
        """Run the passes rank 0 sends until it ends a pipeline call (returns that
        message's payload) or stops the engine (returns None)."""

        def execute(packed, pending) -> None:
            self.runner.execute(PassInputs.unpack(packed), pending)

        return self.group.serve(execute)
