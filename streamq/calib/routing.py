"""Sum statistics under a split of the calibration samples, byte-identical to one process.

A floating-point sum depends on its order, so shares of a Hessian summed by several
processes and then added would differ from one process's sum in their last bits. Instead,
every update a statistic would make is routed: during its own batch, each process records
the update (a label naming the statistic, and its tensors) rather than applying it; after
every step, all processes' records are replayed on every process, in rank order, against
the statistics that process keeps (a process keeps only its work units' statistics, so it
computes only those). Rank r replays batch `step * world + r` (`Dist.batches`), so rank
order is batch order: each statistic sees exactly the updates, values and order one process
would make.

The labels and the functions that apply them are structural (the same module, in the same
layer, on every process), so a label recorded by one process is applied by the function
another process registered for it; what depends on the batch travels as tensors, the
nesting of tuples, lists and dicts (and any non-tensor values in them) in a picklable note.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from streamq.errors import CheckpointError

# (label, argument skeleton) per record of one process's step; the skeleton is the
# arguments with every tensor replaced by its `_Slot`.
Note = list[tuple[str, tuple]]
# The exchange of one step: this process's tensors (unique names) and note -> every
# process's (note, tensors), in rank order (`Dist.each`).
Exchange = Callable[[dict[str, torch.Tensor], Note], Iterable[tuple[Note, dict[str, torch.Tensor]]]]


class _Slot:
    """Where a tensor sat in a record's arguments."""

    __slots__ = ("key",)

    def __init__(self, key: str):
        self.key = key

    def __reduce__(self):
        return (_Slot, (self.key,))


def _pack(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(obj):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach()
        return _Slot(key)
    if isinstance(obj, tuple):
        return tuple(_pack(o, prefix, tensors) for o in obj)
    if isinstance(obj, list):
        return [_pack(o, prefix, tensors) for o in obj]
    if isinstance(obj, dict):
        return {k: _pack(v, prefix, tensors) for k, v in obj.items()}
    return obj


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, _Slot):
        return tensors[obj.key]
    if isinstance(obj, tuple):
        return tuple(_unpack(o, tensors) for o in obj)
    if isinstance(obj, list):
        return [_unpack(o, tensors) for o in obj]
    if isinstance(obj, dict):
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    return obj


def skip(*_args: Any) -> None:
    """The function of a statistic another process keeps."""


class Router:
    """Records one step's statistic updates of this process and replays every process's.

    `add(label, fn, *args)`: `fn(*args)` is the update; `args` are tensors, None, or tuples,
    lists and dicts of them (anything else must pickle). `flush()` ends the step: a
    collective of all processes, called once per step by each, with or without a batch.
    """

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.fns: dict[str, Callable[..., None]] = {}
        self.records: list[tuple[str, tuple]] = []

    def add(self, label: str, fn: Callable[..., None], *args: Any) -> None:
        self.fns.setdefault(label, fn)
        self.records.append((label, args))

    def flush(self) -> None:
        tensors: dict[str, torch.Tensor] = {}
        note: Note = [(label, _pack(args, str(i), tensors)) for i, (label, args) in enumerate(self.records)]
        self.records.clear()
        for records, received in self.exchange(tensors, note):
            for label, skeleton in records:
                fn = self.fns.get(label)
                if fn is None:
                    raise CheckpointError(f"calibration statistic '{label}' was recorded by another process but "
                                          "never by this one: the processes replay different layers")
                fn(*_unpack(skeleton, received))
