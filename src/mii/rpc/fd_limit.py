"""The open-files limit of mii's server processes.

Every HTTP connection, gRPC connection, log file and pipe takes a file
descriptor. Many systems start processes with a soft ``RLIMIT_NOFILE`` of 1,024
while allowing far more (the hard limit): a few hundred idle connections were
then enough to leave no descriptor for a new client. The deployment process and
every replica raise their soft limit to the hard limit at start-up
(:func:`raise_open_files_limit`), and the REST gateway keeps its connections
well below what is left (:func:`http_connection_budget`).
"""

from __future__ import annotations

import logging

try:  # POSIX only; elsewhere the limits are left as they are
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Descriptors the gateway never hands to HTTP connections: gRPC clients, the
# channels to the replicas, logs, pipes and the libraries' own files.
RESERVED_FDS = 64
# When the platform reports no finite limit, what the gateway budgets for.
UNLIMITED_FDS = 1 << 20


def open_files_limit() -> int:
    """The soft limit on open files of this process (UNLIMITED_FDS if infinite)."""
    if resource is None:
        return UNLIMITED_FDS
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return UNLIMITED_FDS if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; return the
    soft limit now in force. A refusal (some platforms cap it lower than the hard
    limit says) keeps the old limit and is logged, never fatal."""
    if resource is None:
        return UNLIMITED_FDS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An infinite hard limit (macOS) cannot be the soft one: try large finite values.
    targets = [hard] if hard != resource.RLIM_INFINITY else [UNLIMITED_FDS, 1 << 16, 10240]
    for target in targets:
        if soft != resource.RLIM_INFINITY and target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            break
        except (ValueError, OSError) as err:
            log.warning("cannot raise the open-files limit from %s to %s: %s", soft, target, err)
    return open_files_limit()


def http_connection_budget(requested: int, limit: int | None = None) -> int:
    """How many HTTP connections the gateway may hold open: ``requested``, but at
    most half of what the open-files limit leaves after RESERVED_FDS, so that a
    flood of HTTP connections never takes the descriptors gRPC clients need."""
    limit = open_files_limit() if limit is None else limit
    return max(1, min(requested, (limit - RESERVED_FDS) // 2))


def http_accept_backlog(limit: int | None = None) -> int:
    """The gateway's listen backlog, which asyncio also uses as the number of
    connections it accepts in one go, before the cap can close the excess: a
    quarter of what the open-files limit leaves after RESERVED_FDS (16 to 2048),
    so that a burst of connections never takes the last descriptors either."""
    limit = open_files_limit() if limit is None else limit
    return max(16, min(2048, (limit - RESERVED_FDS) // 4))
