"""Tensor-parallel splits that vLLM refuses for block-quantized (fp8_blockwise) weights.

vLLM splits column-parallel Linears (q/k/v, gate/up, and MoE experts' gate/up) along their
output and row-parallel ones (o_proj, down_proj) along their input. With weight blocks of
`[block_n, block_k]` it requires every per-rank output size to be a multiple of block_n and
every per-rank input size a multiple of block_k, and refuses to load otherwise. Qwen3-235B-A22B's
experts (moe_intermediate_size 1536) give 1536 / 8 = 192 per rank at tensor-parallel 8: refused;
at 4, 384 = 3 x 128: fine. Expert parallelism keeps experts whole and avoids the split.

k/v projections: when the tensor-parallel size reaches the number of KV heads, vLLM replicates
them and each rank holds one head, so the per-rank size is `head_dim`, not `out / tp`.

Shapes only (names, out, in), no torch: `plan` calls it on the safetensors headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
KV_LEAVES = ("k_proj", "v_proj")
# The tensor-parallel sizes vLLM users commonly pick on one node.
COMMON_TP_SIZES = (2, 4, 8)


@dataclass(frozen=True)
class SplitIssue:
    tp: int
    module: str  # name pattern inside a layer, indices as '*': "mlp.experts.*.gate_proj"
    dim: str  # "out" (column-parallel) | "in" (row-parallel)
    size: int  # the full dimension
    per_rank: str  # "192" or "1536/7" when it does not even divide
    multiple: int  # what per_rank must be a multiple of

    def describe(self) -> str:
        return f"{self.module} {self.dim} {self.size}/{self.tp} = {self.per_rank}"


def _pattern(module: str) -> str:
    """'model.layers.3.mlp.experts.17.gate_proj' -> 'mlp.experts.*.gate_proj'."""
    inner = re.sub(r"^.*?\.layers\.\d+\.", "", module)
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", inner)


def split_issues(linears: Iterable[tuple[str, int, int]], block: tuple[int, int],
                 tp_sizes: Iterable[int] = COMMON_TP_SIZES, kv_heads: int | None = None,
                 head_dim: int | None = None) -> list[SplitIssue]:
    """Every (tp, module pattern, dim) whose per-rank size vLLM would refuse.

    linears: (module name, out_features, in_features) of each block-quantized Linear.
    block: [block_n, block_k] = (rows, cols) of a weight block.
    """
    block_n, block_k = block
    shapes: dict[tuple[str, str, int], None] = {}
    for module, out_f, in_f in linears:
        leaf = module.rpartition(".")[2]
        if leaf in COLUMN_PARALLEL:
            shapes[(_pattern(module), "out", out_f)] = None
        elif leaf in ROW_PARALLEL:
            shapes[(_pattern(module), "in", in_f)] = None
    issues = []
    for tp in tp_sizes:
        for pattern, dim, size in shapes:
            multiple = block_n if dim == "out" else block_k
            if dim == "out" and pattern.rpartition(".")[2] in KV_LEAVES and kv_heads and head_dim \
                    and size == kv_heads * head_dim and tp >= kv_heads:
                per_rank, divides = head_dim, True  # replicated: one KV head per rank
            else:
                per_rank, divides = size // tp, size % tp == 0
            if not divides or per_rank % multiple:
                issues.append(SplitIssue(tp, pattern, dim, size, str(per_rank) if divides else f"{size}/{tp}",
                                         multiple))
    return issues


def split_warnings(linears: Iterable[tuple[str, int, int]], block: tuple[int, int],
                   tp_sizes: Iterable[int] = COMMON_TP_SIZES, kv_heads: int | None = None,
                   head_dim: int | None = None) -> list[str]:
    """One line per refused tensor-parallel size, naming the modules and what works instead."""
    tp_sizes = tuple(tp_sizes)
    issues = split_issues(linears, block, tp_sizes, kv_heads, head_dim)
    bad = sorted({i.tp for i in issues})
    good = [tp for tp in tp_sizes if tp not in bad]
    lines = []
    for tp in bad:
        these = [i for i in issues if i.tp == tp]
        multiples = sorted({i.multiple for i in these})
        alternative = f"tensor-parallel {', '.join(map(str, good))} works" if good else \
            f"none of tensor-parallel {', '.join(map(str, tp_sizes))} works"
        if any(".experts." in i.module for i in these):
            alternative += "; expert parallelism keeps experts whole"
        lines.append(f"vLLM refuses tensor-parallel {tp} for these {block[0]}x{block[1]} FP8 blocks: per-rank "
                     + ", ".join(i.describe() for i in these)
                     + f" not a multiple of {' / '.join(map(str, multiples))} ({alternative})")
    return lines


def plan_warnings(job) -> list[str]:
    """`split_warnings` for a prepared job (`streamq.engine.job.Job`); [] unless its weights are blocks."""
    from streamq.quant.granularity import PerBlock

    block = job.config.scheme.spec.weight
    if not isinstance(block, PerBlock):
        return []
    linears = [(module, *job.reader.tensors[name].shape[:2]) for lay in job.layouts
               for module, name in lay.quantized.items()]
    cfg = job.hf_config
    heads = getattr(cfg, "num_attention_heads", None)
    head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
    return split_warnings(linears, (block.rows, block.cols), kv_heads=getattr(cfg, "num_key_value_heads", None),
                          head_dim=head_dim)
