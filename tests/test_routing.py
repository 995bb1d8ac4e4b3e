"""Routed sum statistics (streamq.calib.routing), in one process: the Hessian a process keeps
from every process's batches, routed and replayed, is bit-identical to one process's."""

from __future__ import annotations

import pytest
import torch

from streamq.calib.hessian import ExpertHessianAccumulator, HessianAccumulator
from streamq.calib.observers import LayerObserver
from streamq.calib.routing import Router, skip
from streamq.errors import CheckpointError

WORLD, BATCHES, IN, EXPERTS = 3, 8, 16, 4


def _batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(BATCHES):
        # Magnitudes spread over decades: a float32 sum of these depends on its order.
        x = torch.randn(5 + b, IN, generator=g) * 10.0 ** torch.randint(-3, 4, (5 + b, 1), generator=g)
        mask = torch.rand(5 + b, generator=g) > 0.2
        ids = torch.randint(0, EXPERTS, (5 + b, 2), generator=g)
        out.append((x, mask, ids))
    return out


def _routed(order=lambda ranks: ranks):
    """What the process keeping the sums holds after routing every process's batches (round
    robin: process r of WORLD replays batches r, r + WORLD, ...); the same on any process."""
    dense, experts = HessianAccumulator(), ExpertHessianAccumulator(EXPERTS, IN, owned={1, 3})
    batches = _batches()
    for step in range(-(-BATCHES // WORLD)):
        packed = []  # every process's (note, tensors) of this step, in rank order
        routers = []
        for r in range(WORLD):
            router = Router(lambda tensors, note, _packed=packed: _packed.append((note, tensors)) or [])
            obs = LayerObserver()
            obs.router = router
            b = step * WORLD + r
            if b < BATCHES:
                x, mask, ids = batches[b]  # recorded only: the keeper below applies every process's
                obs.add("dense", skip, x, mask)
                obs.add("experts", skip, x, ids, {"mask": mask})  # nested arguments travel too
            routers.append(router)
        for router in routers:
            router.flush()  # packs its records (the fake exchange returns nothing to apply)
        keeper_router = Router(lambda tensors, note, _packed=packed: order(_packed))
        keeper_router.fns = {"dense": dense.update, "experts": lambda x, ids, kw: experts.update(x, ids, kw["mask"])}
        keeper_router.flush()
    return dense, experts


def test_routed_sums_are_one_processs_bytes():
    dense, experts = HessianAccumulator(), ExpertHessianAccumulator(EXPERTS, IN, owned={1, 3})
    for x, mask, ids in _batches():
        dense.update(x, mask)
        experts.update(x, ids, mask)
    routed_dense, routed_experts = _routed()
    assert torch.equal(routed_dense.result(), dense.result())
    assert torch.equal(routed_experts.result(), experts.result())
    assert torch.equal(routed_experts.count, experts.count)
    # The check can fail: replayed in reverse rank order (not batch order), the sums differ.
    reversed_dense, _ = _routed(order=lambda ranks: list(reversed(ranks)))
    assert not torch.equal(reversed_dense.result(), dense.result())


def test_a_label_no_process_here_registered_stops():
    router = Router(lambda tensors, note: [([("self_attn.q_proj", ())], {})])
    with pytest.raises(CheckpointError, match="'self_attn.q_proj' was recorded by another process"):
        router.flush()
