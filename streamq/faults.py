"""Crash injection for the resume tests: `STREAMQ_KILL_AT=point:n` SIGKILLs the process
the n-th time `point` is reached. Unset (always, outside tests), it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "STREAMQ_KILL_AT"
ENV_RANK = "STREAMQ_KILL_RANK"
_hits: Counter = Counter()


def checkpoint(point: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, _, count = spec.partition(":")
    if name != point:
        return
    rank = os.environ.get(ENV_RANK)  # under torchrun: only this rank dies
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    _hits[point] += 1
    if _hits[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
