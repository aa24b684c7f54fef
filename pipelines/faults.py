"""Injected failure points, for testing that a crash at any step leaves a usable store.

Every step of build, update, compact, reindex, publish and gc calls ``maybe_fail(point)``. Nothing
happens unless ``DRESD_FAULT`` names the point (``DRESD_FAULT=after_manifest``), optionally
with the occurrence to fail at (``after_shard_write:2`` fails at the second shard written in
this process; default the first). The failure is an ``InjectedFault`` raised at that instant,
which stops the run as a write error would (Beam workers inherit the environment); with a third
field ``exit`` (``after_manifest:1:exit``) the process is killed on the spot instead, as by
``kill -9``: no exception handler or cleanup runs. With ``DRESD_FAULT_ONCE`` naming a file, the
failure happens once across all processes (the one that creates that file first), so one of a
cluster's workers dies and the others, and its restarted self, carry on.
"""

from __future__ import annotations

import os
from collections import Counter

ENV = "DRESD_FAULT"
ONCE_ENV = "DRESD_FAULT_ONCE"

POINTS = (
    "after_fit",  # transform and quantizer written, nothing recorded
    "after_fragment_write",  # a shard's archive fragment written, not committed
    "after_shard_write",  # a shard's tokens, docs and archive fragment written, no index yet
    "after_index_fill",  # a shard's ivf.faiss written, the shard not recorded in the journal
    "after_shard_record",  # a shard recorded in the run journal (reusable by a rerun)
    "after_reindex_train",  # a re-index's quantizer written, no shard filled
    "before_archive_commit",  # the run's result collected, nothing committed
    "after_archive_commit",  # an archive version committed that no manifest names yet
    "before_manifest",  # the archive version committed, the manifest not
    "after_manifest",  # generation committed, CURRENT not updated
    "after_current",  # CURRENT updated, the run's journal not cleaned up
    "during_cleanup",  # part of the run's own temporary files removed
    "during_gc",  # dresd gc has removed part of the garbage
)

_seen: Counter = Counter()


class InjectedFault(RuntimeError):
    """Raised at the failure point named by DRESD_FAULT."""


def maybe_fail(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, mode = rest.partition(":")
    _seen[point] += 1
    if _seen[point] == int(nth or 1):
        if not _first_anywhere():
            return
        if mode == "exit":
            os._exit(137)
        raise InjectedFault(f"injected fault at {point}")


def _first_anywhere() -> bool:
    once = os.environ.get(ONCE_ENV)
    if not once:
        return True
    try:
        os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def reset() -> None:
    """Forget the occurrences counted so far (tests call it between runs)."""
    _seen.clear()
