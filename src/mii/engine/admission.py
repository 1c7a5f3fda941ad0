"""Admission control: a bound on the requests that wait for their first forward pass.

An engine refuses a new request at once, with ``ServerOverloadedError`` (gRPC
RESOURCE_EXHAUSTED, HTTP 429, a Retry-After), while ``max_queued_requests``
requests are already waiting to start (queued, or preempted to be recomputed);
requests being generated do not count (``max_num_seqs`` bounds those). So a
burst beyond capacity is answered in milliseconds instead of waiting minutes in
a queue, or being cancelled by a transport's own limits. A call of several
prompts is admitted or refused whole.
"""

from __future__ import annotations

from mii.errors import ServerOverloadedError

# What a refused client is told to wait before retrying: about the time a few
# passes take to start the waiting requests, short enough to matter, long enough
# not to turn a burst into a retry storm.
RETRY_AFTER_S = 1.0


def admit(queued: int, limit: int | None) -> None:
    """Raise ServerOverloadedError when ``queued`` requests already wait and
    ``limit`` (max_queued_requests; None: no limit) is reached."""
    if limit is not None and queued >= limit:
        raise ServerOverloadedError(
            f"the server is overloaded: {queued} requests are already waiting to start "
            f"(max_queued_requests={limit}); retry after {RETRY_AFTER_S:g} s",
            retry_after=RETRY_AFTER_S,
        )
