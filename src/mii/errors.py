"""Exceptions raised by mii. Every user-facing error says what to change."""

from __future__ import annotations

import os


class MiiError(Exception):
    """Base class of every error mii raises on purpose."""


class InvalidRequestError(MiiError, ValueError):
    """A generation option or engine option has a bad name or value.

    ``field`` names the offending option so that servers can report it; ``code``,
    when set, is OpenAI's machine-readable code for it (``context_length_exceeded``:
    a prompt too long for the model or the cache, as OpenAI's clients branch on).
    """

    def __init__(self, message: str, field: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.code = code


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


class ModelLoadError(MiiError, OSError):
    """The model could not be found, downloaded or understood."""


class UnsupportedModelError(ModelLoadError, ValueError):
    """The checkpoint's ``model_type`` (or one of its features) is not implemented."""


class RequestTooLargeError(InvalidRequestError):
    """A request can never fit in the KV cache, even running alone."""


class EngineClosedError(MiiError, RuntimeError):
    """The engine was closed; no more requests are accepted."""


class ForkedEngineError(EngineClosedError):
    """The engine was created in another process: ``fork`` copied it into this one
    without the threads that run it (create it in the process that uses it)."""

    @classmethod
    def in_fork_of(cls, creator: int) -> ForkedEngineError:
        """The error of a call in a fork of process ``creator``."""
        return cls(
            f"this engine ran in process {creator}, and the threads that run it did not "
            f"survive the fork into process {os.getpid()}: create the pipeline (or engine) "
            "in the process that uses it (gunicorn: without --preload; multiprocessing: "
            "the 'spawn' start method; celery: in worker_process_init)"
        )


class UnavailableError(MiiError, RuntimeError):
    """The request could not be served now, but a retry can succeed: the replica
    serving it crashed, became unreachable, lost a tensor-parallel rank or is
    shutting down (gRPC UNAVAILABLE, HTTP 503)."""


class NoReplicaError(UnavailableError):
    """The deployment has no replica to serve the call: every replica is out of
    rotation, or the replica serving its stream stopped responding for
    ``replica_timeout_s`` (another may be serving: retry), or the deployment is
    shutting down. HTTP:
    503 with code ``no_replica_available``."""


class ServerOverloadedError(MiiError, RuntimeError):
    """Refused at once, not queued: ``max_queued_requests`` requests were already
    waiting (gRPC RESOURCE_EXHAUSTED, HTTP 429). Retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ReplicaError(MiiError, RuntimeError):
    """A replica failed the request (the replica's message is kept)."""


class DeploymentError(MiiError, RuntimeError):
    """A deployment could not start; the message carries the server's error."""


class RequestTimeoutError(MiiError, TimeoutError):
    """A call's ``timeout=`` passed before its answer was complete; the request was
    aborted on the server (gRPC DEADLINE_EXCEEDED, HTTP 504). Also a TimeoutError,
    so ``except TimeoutError`` catches it."""


class DeploymentUnresponsiveError(MiiError, TimeoutError):
    """A deployment's process exists but did not answer a call in time (stopped,
    wedged, or too busy to answer): ``mii terminate NAME`` then signals its
    processes instead (``--force``: kills them)."""


class DeploymentNotFoundError(MiiError, LookupError):
    """No live deployment has that name (on this machine's registry: the folder
    ``deployments`` of ``MII_CACHE_DIR``, default ``~/.cache/mii``)."""


class AmbiguousDeploymentError(MiiError, LookupError):
    """Several live deployments serve the model name given (each under its own
    deployment name): name the deployment instead (``mii list`` shows them)."""


class AuthenticationError(MiiError, PermissionError):
    """A deployment refused the call: its API key is missing or wrong (HTTP 401,
    gRPC UNAUTHENTICATED). Pass ``api_key=`` to ``mii.client``, or set ``MII_API_KEY``."""


# DeepSpeed-MII's name for an unknown or invalid option, which ported code catches.
UnknownArgument = InvalidRequestError
