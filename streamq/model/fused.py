"""Modules vLLM fuses into one kernel for an architecture, so they share one weight scale.

vLLM loads q/k/v into one `qkv_proj`, gate/up into one `gate_up_proj` (Mixtral experts:
`w1`/`w3` into `w13`), and MLA's `q_a_proj` with `kv_a_proj_with_mqa` into
`fused_qkv_a_proj` (DeepSeek-V2/V3 with a q LoRA rank). It requantizes every member of a
fused group to the group's largest per-tensor scale; writing that shared scale up front
avoids the second rounding. One table, by the leaf names on disk (the names vLLM loads).
"""

from __future__ import annotations

FUSED_GROUPS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)


def fused_group_key(module_name: str) -> str:
    """Modules vLLM fuses into one kernel share a key (parent + group); others are alone."""
    parent, _, leaf = module_name.rpartition(".")
    for group in FUSED_GROUPS:
        if leaf in group:
            return f"{parent}.{'+'.join(group)}"
    return module_name
