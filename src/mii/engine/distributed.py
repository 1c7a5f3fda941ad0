"""Tensor parallelism across processes: joining the group, and the pass protocol.

Every rank is a process holding one shard of the model and of the KV cache.
Rank 0 owns the scheduler and the engine loop; for every forward pass it sends
the pass's description (``PassInputs``, packed into one int64 tensor: never
pickle) to the other ranks, which run the same forward on their shard;
sampling happens once, on rank 0. Messages travel on a gloo "control" group,
so that they are plain host tensors on GPUs too; the layers' collectives use
the data group (NCCL on GPUs, gloo on CPU).

Messages: a header ``[kind, payload length, pending length, 0]``, then the
payload. ``PASS`` runs a forward; ``DONE`` ends a ``pipeline`` call on the
other ranks (payload: the responses as JSON when they want them); ``STOP``
ends the worker loop.

A rank that fails records its error in the group's key-value store and exits;
rank 0's next collective then fails instead of waiting, and rank 0 reports the
recorded error. The group is unusable afterwards: the engine fails every
later request with that error and reports itself unhealthy.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

import mii.envs as envs
from mii.engine.tp_store import fresh_store
from mii.errors import InvalidRequestError
from mii.models.parallel import set_parallel_state

log = logging.getLogger(__name__)

PASS, DONE, STOP = 1, 2, 3
ERROR_KEY = "mii/tensor-parallel/error"


class TensorParallelError(RuntimeError):
    """A rank of a tensor-parallel engine failed; the engine cannot continue."""


@dataclass
class TPGroup:
    """This process's place in a tensor-parallel engine."""

    rank: int
    world_size: int
    local_rank: int
    control: Any  # gloo group for messages
    data: Any  # group of the layers' collectives
    store: Any  # the group's key-value store, where a failing rank leaves its error
    device: Any = "cpu"  # this rank's engine device (set by the engine)
    failure: str | None = None  # set once any rank failed: the group is unusable
    # The last message's collectives and tensors, held until ``leave`` (see there).
    _last_message: list[Any] = field(default_factory=list, init=False, repr=False)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ----- rank 0 -------------------------------------------------------------

    def send_pass(self, packed: np.ndarray, pending: torch.Tensor | None) -> None:
        self._send(PASS, torch.from_numpy(packed), pending)

    def send_done(self, payload: bytes = b"") -> None:
        self._send(DONE, torch.from_numpy(np.frombuffer(payload, dtype=np.uint8).copy()))

    def stop(self) -> None:
        """End the other ranks' loops and leave the group (rank 0; once)."""
        if self.failure is None:
            try:
                self._send(STOP, torch.empty(0, dtype=torch.uint8))
                # Every rank has read the STOP before any leaves: no message is in
                # flight when the connections close.
                self._barrier()
            except Exception:  # a rank already gone: nothing to stop
                log.debug("tensor-parallel STOP failed", exc_info=True)
                destroy()
                return
        self.leave()

    def leave(self) -> None:
        """Leave the group after a clean STOP and wait for gloo's worker threads to end.

        A gloo worker thread drops its reference to a finished collective just
        after completing it. If that is the last reference while the interpreter
        is finalizing (the script returned right after the STOP), the drop takes
        the GIL from a dying interpreter and the process aborts (SIGABRT, seen on
        rank 1 under CPU load). So: the last message's works and tensors are held
        here (the threads never drop the last reference), and the process groups'
        last references are dropped now, which runs their destructors: they join
        the worker threads while the interpreter is fully alive. Only after a
        clean STOP: a thread stuck in a collective with a dead rank would never join.
        """
        destroy()
        self.control = self.data = None
        gc.collect()  # the groups' destructors join their worker threads
        self._last_message.clear()

    def _barrier(self) -> None:
        work = dist.barrier(group=self.control, async_op=True)
        work.wait()
        self._last_message.append(work)

    def _broadcast(self, tensor: torch.Tensor, group: Any) -> None:
        """``dist.broadcast`` from rank 0 that keeps the work and the tensor (see leave)."""
        work = dist.broadcast(tensor, 0, group=group, async_op=True)
        work.wait()
        self._last_message += (work, tensor)

    def _send(self, kind: int, payload: torch.Tensor, pending: torch.Tensor | None = None) -> None:
        self.check()
        pending_len = 0 if pending is None else pending.numel()
        header = torch.tensor([kind, payload.numel(), pending_len, 0], dtype=torch.int64)
        self._last_message = []
        try:
            self._broadcast(header, self.control)
            if payload.numel():
                self._broadcast(payload, self.control)
            if pending_len:
                self._broadcast(pending, self.data)
        except Exception as err:
            raise self.failed(err) from err

    def check(self) -> None:
        """Raise the recorded failure: a broken group must not be used again."""
        if self.failure is not None:
            raise TensorParallelError(self.failure)

    def poll_failure(self) -> None:
        """Raise if another rank has reported a failure (and leave the group)."""
        reported = _read_reported_error(self.store)
        if reported is not None:
            self.failure = reported
            abort()
            raise TensorParallelError(reported)

    def failed(self, err: BaseException) -> TensorParallelError:
        """Turn an error of a collective into the failing rank's own error."""
        if self.failure is None:
            reported = _read_reported_error(self.store)
            self.failure = reported or f"tensor-parallel group failed: {err}"
        return TensorParallelError(self.failure)

    # ----- ranks > 0 ----------------------------------------------------------

    def serve(self, execute) -> bytes | None:
        """Run passes sent by rank 0 with ``execute(packed, pending)`` until a DONE
        (returns its payload) or a STOP (returns None). On an error of this rank:
        record it for rank 0, then re-raise. After a STOP, call ``leave``."""
        fail_at = _injected_failure(self.rank)
        passes = 0
        try:
            while True:
                self._last_message = []
                header = torch.empty(4, dtype=torch.int64)
                self._broadcast(header, self.control)
                kind, length, pending_len, _ = header.tolist()
                dtype = torch.int64 if kind == PASS else torch.uint8
                payload = torch.empty(length, dtype=dtype)
                if length:
                    self._broadcast(payload, self.control)
                if kind == STOP:
                    self._barrier()  # see stop()
                    return None
                if kind == DONE:
                    return payload.numpy().tobytes()
                pending = None
                if pending_len:
                    pending = torch.empty(pending_len, dtype=torch.int64, device=self.device)
                    self._broadcast(pending, self.data)
                passes += 1
                if passes == fail_at:
                    raise RuntimeError(f"injected failure on rank {self.rank} at pass {passes}")
                execute(payload.numpy(), pending)
        except Exception as err:
            report_error(self.store, f"rank {self.rank}: {type(err).__name__}: {err}")
            # Leave the group, so that rank 0's collectives fail instead of waiting.
            self.failure = str(err)
            abort()
            raise


def _injected_failure(rank: int) -> int | None:
    """The pass this rank fails on by design (fault injection, tests only: see
    ``envs.TP_FAIL_AT_PASS``); None in normal operation."""
    spec = envs.TP_FAIL_AT_PASS.get()
    if spec is None:
        return None
    failing_rank, count = spec
    return count if failing_rank == rank else None


def report_error(store, message: str) -> None:
    """Record a rank's failure where rank 0 can read it (best effort)."""
    try:
        store.set(ERROR_KEY, message)
    except Exception:
        log.debug("could not record the error in the store", exc_info=True)
    log.error("tensor-parallel %s", message)


def _read_reported_error(store) -> str | None:
    try:
        if store.check([ERROR_KEY]):
            return store.get(ERROR_KEY).decode(errors="replace")
    except Exception:
        log.debug("could not read the store", exc_info=True)
    return None


def launcher_world_size() -> int:
    """WORLD_SIZE as torchrun / ``deepspeed --num_gpus`` set it (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join(tensor_parallel: int, device_type: str, timeout_s: float = 1800.0) -> TPGroup:
    """Join the tensor-parallel group described by the launcher's environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
    world = launcher_world_size()
    if world != tensor_parallel:
        raise InvalidRequestError(
            f"tensor_parallel={tensor_parallel} needs {tensor_parallel} processes, one per "
            f"rank, but this process is one of {world}; launch the script with "
            f"`torchrun --nproc-per-node {tensor_parallel}` (or `deepspeed --num_gpus "
            f"{tensor_parallel}`), or let mii.serve start the processes",
            field="tensor_parallel",
        )
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise InvalidRequestError(
            f"tensor parallelism needs the launcher's {', '.join(missing)} environment "
            "variables; launch with torchrun",
            field="tensor_parallel",
        )
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():  # the script made the group itself: use it as it is
        store = dist.distributed_c10d._get_default_store()
    else:
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        store = fresh_store(rank, world, timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    data = dist.group.WORLD
    control = dist.new_group(backend="gloo") if backend == "nccl" else data
    set_parallel_state(rank, world, data)
    return TPGroup(rank, world, local_rank, control, data, store)


def agree_on_min(group: TPGroup, value: int) -> int:
    """The smallest ``value`` over all ranks (e.g. KV blocks that fit everywhere)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group.control)
    return int(tensor.item())


def abort() -> None:
    """Leave a failed group without waiting for collectives that cannot finish
    (NCCL's graceful destroy would wait for a rank that is gone)."""
    set_parallel_state(0, 1, None)
    if not dist.is_initialized():
        return
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    try:
        if abort_group is not None and dist.get_backend() == "nccl":
            abort_group()
        else:
            dist.destroy_process_group()
    except Exception:
        log.debug("leaving the failed group failed", exc_info=True)


def destroy() -> None:
    """Leave the process group and reset this process to world size 1."""
    set_parallel_state(0, 1, None)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            log.debug("destroy_process_group failed", exc_info=True)
