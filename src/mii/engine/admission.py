"""Admission control: a bound on the requests an engine holds.

An engine refuses a new request at once, with ``ServerOverloadedError`` (gRPC
RESOURCE_EXHAUSTED, HTTP 429, a Retry-After), while it already holds
``max_queued_requests`` requests: queued to start or being generated, until
their last piece is delivered. So a burst beyond capacity is answered in
milliseconds instead of waiting minutes in a queue, or being cancelled by a
transport's own limits, and the number a client sees refused is plain: with a
limit of 4, the fifth concurrent request is refused. A call of several prompts
is admitted or refused whole (admitted while the engine holds fewer than the
limit, whatever the call's size, so that no call is refused forever).
"""

from __future__ import annotations

from mii.errors import ServerOverloadedError

# What a refused client is told to wait before retrying: long enough for a few
# passes to finish requests, short enough to matter, and long enough not to turn
# a burst into a retry storm.
RETRY_AFTER_S = 1.0


def admit(held: int, limit: int | None) -> None:
    """Raise ServerOverloadedError when the engine holds ``held`` requests and
    ``limit`` (max_queued_requests; None: no limit) is reached."""
    if limit is not None and held >= limit:
        raise ServerOverloadedError(
            f"the server is overloaded: it holds {held} requests, queued or being generated "
            f"(max_queued_requests={limit}); retry after {RETRY_AFTER_S:g} s",
            retry_after=RETRY_AFTER_S,
        )
