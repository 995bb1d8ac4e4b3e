"""Modules an inference engine fuses into one kernel, so they must share a weight scale.

vLLM fuses q/k/v into one matmul and gate/up into another (MLA models also fuse
`q_a_proj` with `kv_a_proj_with_mqa`), and requantizes every member of a group to the
group's largest per-tensor scale; sharing it up front avoids that second rounding.
"""

from __future__ import annotations

FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))


def fused_group_key(module_name: str) -> str:
    """Modules vLLM fuses into one kernel share a key (parent + group); others are alone."""
    parent, _, leaf = module_name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return f"{parent}.{'+'.join(group)}"
    return module_name
