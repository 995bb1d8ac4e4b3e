"""Disk names -> parameters in memory through transformers' own conversion mapping."""

from __future__ import annotations

import pytest
import torch

from streamq.model.names import MemoryName, NameMap
from streamq.model.skeleton import build_skeleton
from streamq.testing.arch_matrix import matrix_config


@pytest.fixture(scope="module")
def mixtral():
    return build_skeleton(matrix_config("mixtral"), torch.bfloat16)


def test_mixtral_experts_renamed_and_stacked(mixtral):
    names = NameMap(mixtral)
    base = "model.layers.1.block_sparse_moe."
    assert names.to_memory(base + "experts.10.w1.weight") == MemoryName(
        "model.layers.1.mlp.experts.gate_up_proj", 10, "gate_proj")
    assert names.to_memory(base + "experts.10.w3.weight").role == "up_proj"
    assert names.to_memory(base + "experts.2.w2.weight") == MemoryName(
        "model.layers.1.mlp.experts.down_proj", 2, "down_proj")
    assert names.to_memory(base + "gate.weight") == MemoryName("model.layers.1.mlp.gate.weight")
    assert names.to_memory("model.layers.1.self_attn.q_proj.weight") == MemoryName(
        "model.layers.1.self_attn.q_proj.weight")


def test_pattern_fallback_matches_transformers(mixtral):
    """Where a transformers version lacks `rename_source_key`, the patterns give the same result."""
    names, fallback = NameMap(mixtral), NameMap(mixtral)

    class Bare:
        def __init__(self, t):
            self.source_patterns, self.target_patterns = t.source_patterns, t.target_patterns
            if hasattr(t, "operations"):
                self.operations = t.operations

    fallback.renamings = [Bare(t) for t in names.renamings]
    fallback.converters = [Bare(t) for t in names.converters]
    for e in (0, 3):
        for leaf in ("w1", "w2", "w3"):
            key = f"model.layers.0.block_sparse_moe.experts.{e}.{leaf}.weight"
            assert fallback.to_memory(key) == names.to_memory(key)


def test_unknown_conversion_is_a_problem_not_a_guess(mixtral):
    names = NameMap(mixtral)

    class Op:
        dim = 0

    for conv in names.converters:
        conv.operations = [Op()]
    got = names.to_memory("model.layers.0.block_sparse_moe.experts.1.w1.weight")
    assert got.problem and "cannot map" in got.problem and got.expert is None
