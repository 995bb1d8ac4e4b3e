"""Several processes under `torchrun`: one per GPU (NCCL) or per CPU slot (gloo).

`python -m streamq quantize` alone is one process and never touches torch.distributed;
under `torchrun --nproc-per-node N [--nnodes M ...] -m streamq quantize -c CONFIG` the
environment torchrun sets (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT) makes `from_env`
start a process group. The output bytes are the single-process run's, whatever the
number of processes:

- calibration-free schemes split whole layers across ranks; each rank reads and writes
  only its layers;
- calibrated schemes split the calibration samples: each rank keeps only its batches'
  hidden states (round robin, `Dist.batches`) and replays every layer on them;
- whose statistics merge exactly (ranges: a max is the same in any order; SAMPLES), the
  ranges are max-reduced before quantizing;
- whose statistics are floating-point sums (Hessians, AWQ's means and recorded blocks;
  MODULES) also split the layer's work units (`Scheme.work_units`): each sum is kept whole
  by its unit's owner, who adds every batch in batch order, because a sum of per-rank
  partial sums would differ from one process's in its last bits. GPTQ (`replay_split`): each
  rank runs the layer on its own batches only, and the observed modules' inputs of each
  batch travel to every rank; otherwise (AWQ) every rank replays every batch, each batch's
  hidden states broadcast by the rank holding it. GPTQ ("quantize"
  `work_stage`): each rank solves its units, and the quantized weights are exchanged so
  every rank can replay the quantized layer on its own batches. AWQ ("transform"): each
  rank searches its smoothing groups, and the scales are exchanged before any is applied;
- rank 0 opens the output directory and writes the non-layer shard; a layer's shard is
  written by one rank; rank 0 writes the index and config.json last, after gathering
  every rank's shard records.

If one rank dies, torchrun's agent stops the others; collectives time out after
STREAMQ_DIST_TIMEOUT_MINUTES (default 30) as a second bound.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from streamq.errors import ConfigError, StreamqError

SAMPLES = "samples"  # calibration batches split across ranks, ranges max-reduced
MODULES = "modules"  # batches split too; each sum kept by its work unit's owner, from every batch


def calibration_split(scheme: Any) -> str:
    """How several processes share a calibrated scheme's work (SAMPLES or MODULES).

    Raises ConfigError for a scheme that neither merges exactly nor declares work units."""
    from streamq.calib.observers import merges_exactly

    kinds = [k for k in (scheme.observer_kind(), scheme.smoothing_kind()) if k is not None]
    if all(merges_exactly(k) for k in kinds):
        return SAMPLES
    if getattr(scheme, "work_units", None) is not None:
        return MODULES
    raise ConfigError(f"{scheme.name} under several processes is not implemented yet (its statistics are sums, "
                      "which only a split of its search by module would keep byte-identical); run it with one "
                      "process (plain python -m streamq)")


def replay_split(scheme: Any) -> bool:
    """Whether processes splitting a layer's work units (MODULES) also split the replay for
    the statistics: each runs the layer on its own batches and the observed modules' inputs
    travel to every process (`run._Calibrator._replay_split`). Needs statistics that are
    Hessians of module inputs alone (no smoothing, no recorded blocks): GPTQ. Other schemes
    (AWQ) replay every batch on every process."""
    return scheme.observer_kind() == "hessian" and scheme.smoothing_kind() is None


def assign(costs: list[float], world: int, sizes: list[tuple[int, ...]] | None = None,
           cap: tuple[int, ...] | None = None) -> list[int] | None:
    """Rank of each work unit: largest cost first to the least loaded rank (ties: lowest
    rank), so every rank computes the same assignment. With `sizes` and `cap` (what each
    unit holds, and the most a rank may hold, per kind of memory): only to a rank with room;
    None when a unit fits on no rank."""
    load = [0.0] * world
    held = [[0] * len(cap) for _ in range(world)] if cap is not None else []
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        room = [r for r in range(world) if cap is None or _fits(held[r], sizes[i], cap)]
        if not room:
            return None
        r = min(room, key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += costs[i]
        if cap is not None:
            held[r] = [h + n for h, n in zip(held[r], sizes[i], strict=True)]
    return owner


def _fits(held: list[int], size: tuple[int, ...] | list[int], cap: tuple[int, ...]) -> bool:
    return all(h + n <= c for h, n, c in zip(held, size, cap, strict=True))


def _rank_totals(owner: list[int], per_unit: list[tuple], world: int) -> list[list]:
    """Per rank, the element-wise sum of its units' `per_unit` tuples."""
    totals = [[0] * len(per_unit[0]) if per_unit else [] for _ in range(world)]
    for values, r in zip(per_unit, owner, strict=True):
        totals[r] = [t + v for t, v in zip(totals[r], values, strict=True)]
    return totals


def unit_holdings(unit: Any) -> tuple[int, int]:
    """What a `WorkUnit`'s owner holds for it: its statistics (bytes) until the solve, and its
    results (int8 codes, a byte a weight) until the exchange."""
    return unit.statistics_bytes, unit.rows * unit.columns


def largest_holdings(units: list, owners: list[int], world: int) -> tuple[int, int]:
    """The most any rank holds of each kind (`unit_holdings`) under `owners`."""
    held = _rank_totals(owners, [unit_holdings(u) for u in units], world)
    return max(h[0] for h in held), max(h[1] for h in held)


def modelled_assignment(units: list, world: int, device_type: str, tokens: int) -> list[int]:
    """The cost model's assignment of `WorkUnit`s (`assign` on `WorkUnit.seconds`)."""
    from streamq.schemes.base import device_costs

    costs = device_costs(device_type)
    return assign([u.seconds(costs, tokens) for u in units], world)


def holdings_cap(units: list, owners: list[int], world: int) -> tuple[int, int]:
    """The most any rank may hold of each kind (`unit_holdings`): the largest share under
    the model's assignment `owners` (`modelled_assignment`) and room for the largest unit of
    each kind more, so the run's balancing (`assign_units`) can move a unit onto the rank
    the model loaded most. The plan sizes each process's statistics and results from it;
    the run's assignments never exceed it."""
    held = largest_holdings(units, owners, world)
    if world == 1:
        return held
    largest = [max(kind) for kind in zip(*(unit_holdings(u) for u in units), strict=True)] if units else [0, 0]
    everything = largest_holdings(units, [0] * len(units), 1)
    return min(held[0] + largest[0], everything[0]), min(held[1] + largest[1], everything[1])


def assign_units(units: list, world: int, device_type: str, tokens: int,
                 solves: list[float | None] | None = None) -> list[int]:
    """Rank of each `WorkUnit`: the assignment with the shortest layer (`span`) that holds
    no more on any rank than `holdings_cap` (which the plan sizes).
    A layer's time is its statistics phase plus its solve phase: each unit's statistics are
    modelled (Hessian updates, `WorkUnit.seconds` per token), plus the work shared by a
    group (`WorkUnit.shared`: every owner of a unit of the group does it once); its solve is
    `solves[i]`, as measured on earlier layers (`UnitTimes`), or modelled where None.
    The model's assignment and that `rebalance`d seed a bounded `search`, which returns the
    shortest it found: the shortest of all where the layer has few units."""
    from streamq.schemes.base import device_costs

    costs = device_costs(device_type)
    modelled = modelled_assignment(units, world, device_type, tokens)
    if world == 1 or not units:
        return modelled
    solve = expected_solves(units, device_type, solves or [None] * len(units))
    statistics = [u.seconds(costs, tokens) - u.seconds(costs) for u in units]
    shared = [(u.shared, u.shared_token_flops * tokens / costs.token_flops_per_s) if u.shared else None
              for u in units]
    sizes = [unit_holdings(u) for u in units]
    cap = holdings_cap(units, modelled, world)
    phases = [statistics, solve]
    start = assign([a + b for a, b in zip(solve, statistics, strict=True)], world, sizes, cap) or modelled
    seed = min([modelled, rebalance(start, phases, world, sizes, cap)],
               key=lambda owner: span(owner, phases, world, shared))
    return search(phases, world, sizes, cap, shared, seed)


def expected_solves(units: list, device_type: str, solves: list[float | None]) -> list[float]:
    """Each unit's solve seconds: as measured on earlier layers (`solves[i]`), else modelled."""
    from streamq.schemes.base import device_costs

    costs = device_costs(device_type)
    return [u.seconds(costs) if s is None else s for u, s in zip(units, solves, strict=True)]


Shared = list[tuple[str, float] | None]  # per unit: (group, seconds each owner of the group spends once)


def span(owner: list[int], phases: list[list[float]], world: int, shared: Shared | None = None) -> float:
    """A layer's time under `owner`: the sum over `phases` (seconds per unit in each) of the
    slowest rank's time, since each phase ends in a collective that waits for the slowest
    (the statistics in the replay's exchanges, the solves at the exchange of the results).
    `shared` adds to the first phase, once per rank, the work of each group it owns a unit of."""
    loads = _rank_totals(owner, list(zip(*phases, strict=True)), world)
    for r, extra in enumerate(_shared_per_rank(owner, shared, world)):
        loads[r][0] += extra
    return sum(max(rank[p] for rank in loads) for p in range(len(phases)))


def _shared_per_rank(owner: list[int], shared: Shared | None, world: int) -> list[float]:
    groups: list[dict[str, float]] = [{} for _ in range(world)]
    for r, item in zip(owner, shared or [None] * len(owner), strict=True):
        if item is not None:
            groups[r][item[0]] = item[1]
    return [sum(g.values()) for g in groups]


# A bound on `search`'s work: about 20 us of Python a node, on rank 0, once a layer, while
# every process waits (`Dist.agree`). Qwen3-235B-A22B's ten units are searched through in 2-7
# ms for 2 to 8 ranks; a simulated layer of 43 units stopped at the bound after 45-85 ms.
SEARCH_NODES = 2_000


def search(phases: list[list[float]], world: int, sizes: list[tuple[int, ...]], cap: tuple[int, ...],
           shared: Shared | None = None, seed: list[int] | None = None,
           nodes: int = SEARCH_NODES) -> list[int] | None:
    """The assignment with the shortest `span` within `cap` that branch and bound finds in
    `nodes` steps: units largest first, each to a rank already in use (least loaded first)
    or the first unused one (ranks are alike, so the others would repeat an assignment), a
    branch cut where its span so far, or each phase's even share, cannot beat the best found.
    `seed` (within `cap`) is the best until a shorter one is found: what is returned when the
    bound stops the search early, which is then not the shortest of all. None only without
    a seed when no assignment fits or none was reached."""
    n, kinds = len(sizes), len(cap)
    shared = shared or [None] * n
    order = sorted(range(n), key=lambda i: (-sum(p[i] for p in phases), i))
    # Each phase's even share is a bound no assignment beats (shared work aside).
    even = [sum(p) / world for p in phases]
    loads = [[0.0] * world for _ in phases]  # [phase][rank]
    held = [[0] * kinds for _ in range(world)]
    owned: list[dict[str, int]] = [{} for _ in range(world)]  # rank -> shared group -> units owned
    owner = [0] * n
    best: list = [math.inf, None] if seed is None else [span(seed, phases, world, shared), list(seed)]
    visited = 0

    def bound() -> float:
        return sum(max(max(load), e) for load, e in zip(loads, even, strict=True))

    def place(depth: int, used: int) -> bool:
        """False once the search is out of nodes."""
        nonlocal visited
        visited += 1
        if visited > nodes:
            return False
        if depth == n:
            total = sum(max(load) for load in loads)
            if total < best[0] - 1e-12:
                best[0], best[1] = total, list(owner)
            return True
        i = order[depth]
        group = shared[i]
        ranks = sorted(range(min(used + 1, world)), key=lambda r: (sum(load[r] for load in loads), r))
        for r in ranks:
            if not _fits(held[r], sizes[i], cap):
                continue
            extra = group[1] if group is not None and not owned[r].get(group[0]) else 0.0
            for p, load in enumerate(loads):
                load[r] += phases[p][i] + (extra if p == 0 else 0.0)
            held[r] = [h + k for h, k in zip(held[r], sizes[i], strict=True)]
            if group is not None:
                owned[r][group[0]] = owned[r].get(group[0], 0) + 1
            owner[i] = r
            more = bound() >= best[0] - 1e-12 or place(depth + 1, max(used, r + 1))
            for p, load in enumerate(loads):
                load[r] -= phases[p][i] + (extra if p == 0 else 0.0)
            held[r] = [h - k for h, k in zip(held[r], sizes[i], strict=True)]
            if group is not None:
                owned[r][group[0]] -= 1
            if not more:
                return False
        return True

    place(0, 0)
    return best[1]


def rebalance(owner: list[int], phases: list[list[float]], world: int, sizes: list[tuple[int, ...]],
              cap: tuple[int, ...]) -> list[int]:
    """Improve an assignment by moving one unit to another rank or swapping two, the best
    such step at a time, while it shortens the layer (`span`). Only a step that takes a unit
    off a rank that is the slowest of some phase can shorten it, so only those are tried. No
    rank may hold more than `cap` (`assign`). Deterministic: ties keep the earlier step."""
    owner = list(owner)
    n = len(owner)
    per_rank = _rank_totals(owner, list(zip(*phases, strict=True)), world)
    loads = [[rank[p] for rank in per_rank] for p in range(len(phases))]  # [phase][rank]
    held = _rank_totals(owner, sizes, world)

    def span_after(moves: list[tuple[int, int, int]]) -> float:
        """The layer's time if each (unit, from, to) of `moves` (between two ranks) were made."""
        total = 0.0
        for load, cost, top in zip(loads, phases, tops, strict=True):
            changed = dict.fromkeys((r for _, a, b in moves for r in (a, b)), 0.0)
            for i, a, b in moves:
                changed[a] -= cost[i]
                changed[b] += cost[i]
            others = next((load[r] for r in top if r not in changed), 0.0)  # the slowest rank not changed
            total += max([others] + [load[r] + d for r, d in changed.items()])
        return total

    def fits(moves: list[tuple[int, int, int]]) -> bool:
        change = {r: [0] * len(cap) for _, a, b in moves for r in (a, b)}
        for i, a, b in moves:
            change[a] = [d - k for d, k in zip(change[a], sizes[i], strict=True)]
            change[b] = [d + k for d, k in zip(change[b], sizes[i], strict=True)]
        return all(_fits(held[r], d, cap) for r, d in change.items())

    for _ in range(4 * n + 4):  # each step shortens the span; bounded all the same
        # Per phase, the three slowest ranks: a step changes two, so the slowest of the rest is among them.
        tops = [sorted(range(world), key=lambda r, load=load: -load[r])[:3] for load in loads]
        best, step = sum(max(load) for load in loads) - 1e-9, None
        slow = {r for load in loads for r in range(world) if load[r] >= max(load) - 1e-12}
        for i in (i for i in range(n) if owner[i] in slow):
            for r in range(world):
                if r != owner[i]:
                    moves = [(i, owner[i], r)]
                    s = span_after(moves)
                    if s < best and fits(moves):
                        best, step = s, moves
            for j in range(n):
                if owner[j] != owner[i]:
                    moves = [(i, owner[i], owner[j]), (j, owner[j], owner[i])]
                    s = span_after(moves)
                    if s < best and fits(moves):
                        best, step = s, moves
        if step is None:
            break
        for i, a, b in step:
            owner[i] = b
            held[a] = [h - k for h, k in zip(held[a], sizes[i], strict=True)]
            held[b] = [h + k for h, k in zip(held[b], sizes[i], strict=True)]
            for load, cost in zip(loads, phases, strict=True):
                load[a] -= cost[i]
                load[b] += cost[i]
    return owner


class UnitTimes:
    """Measured seconds of work units' solves, by the unit's signature (its modules' names
    within the layer and its size), averaged over the layers that ran it, the first left
    out once there is a second (it carries one-time costs: library set-up, lazy loading).

    A model's decoder layers repeat, so what a unit took on one layer predicts it on the
    next better than the cost model does: measured on two H200s, the model was off by up to
    40% for some units before GPTQ's column loop ran as CUDA graphs (o_proj 1.3-1.8 s against
    1.13 modelled), and solves vary from run to run (10-40% eager, far less graphed). Every
    process records every process's measurements (they are gathered), so all agree; the
    assignment still comes from rank 0 (`Dist.agree`)."""

    def __init__(self) -> None:
        self.samples: dict[tuple, list[float]] = {}

    @staticmethod
    def signature(unit: Any, prefix: str) -> tuple:
        """`unit`'s modules without their layer's `prefix` ("model.layers.7."), and its size:
        the same unit of every layer of one shape, and no two units of one layer."""
        return tuple(m.removeprefix(prefix) for m in unit.modules), unit.columns, unit.rows

    def solve_seconds(self, signature: tuple) -> float | None:
        samples = self.samples.get(signature, [])[1:] or self.samples.get(signature)
        return sum(samples) / len(samples) if samples else None

    def record(self, seconds: dict[tuple, float]) -> None:
        for sig, s in seconds.items():
            self.samples.setdefault(sig, []).append(s)


def timed_units(results: Any, unit_of: dict[str, tuple], device: Any) -> tuple[list, dict[tuple, float]]:
    """Run a scheme's (module, result) iterator to its end; returns the pairs and the seconds
    each work unit took (`unit_of`: module -> its unit's signature), the time between one
    yielded module and the next going to the later one's unit. On CUDA the times are the
    device's: events on the current stream, which the device reaches after the work queued
    before them (the replay's last kernels count as no unit's), and one host
    synchronization, on the last event, to read them."""
    import time

    import torch

    cuda = device.type == "cuda"

    def mark() -> Any:
        if not cuda:
            return time.monotonic()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    start, pairs, marks = mark(), [], []
    for module, result in results:
        pairs.append((module, result))
        marks.append((unit_of.get(module), mark()))
    if cuda and marks:
        marks[-1][1].synchronize()
    seconds: dict[tuple, float] = {}
    before = start
    for unit, at in marks:
        if unit is not None:
            seconds[unit] = seconds.get(unit, 0.0) + (before.elapsed_time(at) / 1e3 if cuda else at - before)
        before = at
    return pairs, seconds


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def device(self, configured: str) -> str:
        """One GPU per process: cuda / auto become cuda:LOCAL_RANK; cpu stays cpu."""
        import torch

        if configured == "cpu" or (configured == "auto" and not torch.cuda.is_available()):
            return "cpu"
        return f"cuda:{self.local_rank}"

    def mine(self, items: list) -> list:
        """This rank's share of `items`, round robin (layer i to rank i mod world)."""
        return items[self.rank::self.world]

    def batches(self, count: int, allow_none: bool = False) -> list[int]:
        """This rank's calibration batches, round robin: rank r replays batches r, r + world,
        ..., so the batches of one step (one per rank) in rank order are in batch order
        (`_Calibrator._inputs`). `allow_none`: a process may get none (it still adds every
        batch to its work units' statistics)."""
        if count < self.world and not allow_none:
            raise ConfigError(f"{count} calibration batch(es) cannot be split across {self.world} processes; "
                              "use more samples (dataset.num_samples) or a smaller dataset.batch_size, "
                              "or fewer processes")
        return list(range(self.rank, count, self.world))

    def broadcast(self, tensor: Any, src: int) -> None:
        """`tensor` of rank `src` into `tensor` on every rank, in place (same shape and dtype)."""
        import torch.distributed as td

        td.broadcast(tensor, src=src)

    def max_(self, tensors: list) -> None:
        """Element-wise max across ranks, in place (exact: the order does not matter)."""
        import torch.distributed as td

        for t in tensors:
            td.all_reduce(t, op=td.ReduceOp.MAX)

    def exchange(self, mine: dict, device: Any) -> dict:
        """Every rank's tensors to every rank: `mine` (name -> tensor) from this rank; returns
        the union over ranks. One broadcast of one byte buffer per rank."""
        import torch
        import torch.distributed as td

        meta = self.gather({k: (tuple(t.shape), t.dtype) for k, t in mine.items()})
        out = dict(mine)
        for r, entries in enumerate(meta):
            sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in entries.values()]
            if not sizes:
                continue
            # Each tensor starts 16-byte aligned in the buffer, so it can be viewed in its dtype.
            spans = [-(-n // 16) * 16 for n in sizes]
            if r == self.rank:
                buf = torch.zeros(sum(spans), dtype=torch.uint8, device=device)
                at = 0
                for t, size, span in zip(mine.values(), sizes, spans, strict=True):
                    buf[at:at + size].copy_(t.contiguous().reshape(-1).view(torch.uint8))
                    at += span
            else:
                buf = torch.empty(sum(spans), dtype=torch.uint8, device=device)
            td.broadcast(buf, src=r)
            if r == self.rank:
                continue
            at = 0
            for (name, (shape, dtype)), size, span in zip(entries.items(), sizes, spans, strict=True):
                out[name] = buf[at:at + size].view(dtype).view(shape)
                at += span
        return out

    def node_group(self) -> Any:
        """The processes of this machine as a `streamq.engine.prefetch.NodeGroup` (a process
        group of the job's backend), or None when this machine runs one process or torchrun's
        ranks are not laid out as LOCAL_WORLD_SIZE consecutive ranks per machine.
        Collective: every rank calls it."""
        import torch.distributed as td

        from streamq.engine.prefetch import NodeGroup

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        views = self.gather((local, local > 1 and self.world % local == 0
                             and self.rank - self.local_rank == self.rank // local * local))
        if len({v[0] for v in views}) != 1 or not all(v[1] for v in views):  # machines differ: no groups
            return None
        if local == self.world:  # one machine: the job's own group
            return NodeGroup(None, 0, self.local_rank, local)
        group, _ = td.new_subgroups(group_size=local, timeout=timeout())
        return NodeGroup(group, self.rank - self.local_rank, self.local_rank, local)

    def writers(self, node: Any) -> list[int]:
        """The ranks that write layers when every rank takes every layer (calibrated schemes;
        each layer's shard by one, in turn): every rank but the machines' readers (`node`,
        from `node_group`), whose host already moves every layer once (the read, then the
        copy to the device and the broadcast); every rank where machines run one process
        each, or `node` is None. On two H200s, the layers the reading process also wrote took
        0.1-0.4 s longer than the others."""
        if node is None or node.size < 2:
            return list(range(self.world))
        return [r for r in range(self.world) if r % node.size != 0]

    def check_same(self, facts: dict[str, Any]) -> None:
        """Refuse on every rank, before anything is written, if any rank's `facts` (the job's
        hash, the source checkpoint's fingerprint) differ from rank 0's."""
        views = self.gather(facts)
        for r, view in enumerate(views[1:], start=1):
            differ = [k for k in facts if view.get(k) != views[0].get(k)]
            if differ:
                raise ConfigError(f"rank {r} has a different {' and '.join(differ)} than rank 0: every process of "
                                  "a torchrun job must run the same config on the same checkpoint; nothing was "
                                  "written")

    def gather(self, obj: Any) -> list:
        import torch.distributed as td

        out: list = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def share_failure(self, error: BaseException | None) -> None:
        """Every rank tells every rank whether a step failed (`error`, None where it did not
        or where the rank took no part: rank 0 alone opens the output; every rank plans its
        own share); if any did, every rank raises the first failing rank's error (its own
        where it failed), so none waits on a collective the failed one never reaches."""
        views = self.gather(None if error is None else (type(error).__name__, str(error),
                                                        getattr(error, "exit_code", 1)))
        failed = next((r for r, v in enumerate(views) if v is not None), None)
        if failed is None:
            return
        if error is not None:
            raise error
        raise _Remote(failed, *views[failed])

    def agree(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (a decision taken from rank 0's clock, say)."""
        import torch.distributed as td

        box = [value]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as td

        td.barrier()

    def close(self) -> None:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


class _Remote(StreamqError):
    """The error another rank hit, as the other ranks report it."""

    def __init__(self, rank: int, kind: str, message: str, exit_code: int):
        super().__init__(f"rank {rank} stopped the job ({kind}): {message}")
        self.exit_code = exit_code


def from_env(device: str = "auto") -> Dist | None:
    """A process group when torchrun started this process with WORLD_SIZE > 1, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as td

    use_nccl = device != "cpu" and torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_nccl:
        torch.cuda.set_device(local_rank)
    td.init_process_group("nccl" if use_nccl else "gloo", timeout=timeout())
    return Dist(td.get_rank(), td.get_world_size(), local_rank)


def timeout() -> timedelta:
    """How long a collective waits (STREAMQ_DIST_TIMEOUT_MINUTES, default 30)."""
    return timedelta(minutes=float(os.environ.get("STREAMQ_DIST_TIMEOUT_MINUTES", "30")))
