"""`plan` warns when vLLM would refuse a tensor-parallel split of 128x128 FP8 blocks.

The rule (vLLM's block-FP8 checks): column-parallel Linears (q/k/v, gate/up, experts'
gate/up) split `out`, which must stay a multiple of block_n per rank; row-parallel ones
(o_proj, down_proj) split `in`, a multiple of block_k per rank; k/v are replicated (one head
per rank) once tp reaches the number of KV heads.
"""

from __future__ import annotations

from conftest import write_yaml
from test_plan import job_dict, write_header_only

from streamq.cli import main as cli_main
from streamq.config import parse_config
from streamq.engine.job import prepare
from streamq.engine.plan import GiB, make_plan
from streamq.engine.tp_check import split_issues, split_warnings

# One Qwen3-235B-A22B decoder layer: hidden 4096, 64 heads and 4 KV heads of 128, 128 experts of 1536.
P = "model.layers.7."
QWEN3_235B = [(P + "self_attn.q_proj", 8192, 4096), (P + "self_attn.k_proj", 512, 4096),
              (P + "self_attn.v_proj", 512, 4096), (P + "self_attn.o_proj", 4096, 8192)] + [
    (f"{P}mlp.experts.{e}.{proj}", *shape) for e in range(128)
    for proj, shape in (("gate_proj", (1536, 4096)), ("up_proj", (1536, 4096)), ("down_proj", (4096, 1536)))]


def test_qwen3_235b_experts_fail_at_tp8_only():
    issues = split_issues(QWEN3_235B, (128, 128), kv_heads=4, head_dim=128)
    assert {i.tp for i in issues} == {8}
    assert {(i.module, i.dim, i.size, i.per_rank) for i in issues} == {
        ("mlp.experts.*.gate_proj", "out", 1536, "192"), ("mlp.experts.*.up_proj", "out", 1536, "192"),
        ("mlp.experts.*.down_proj", "in", 1536, "192")}
    (line,) = split_warnings(QWEN3_235B, (128, 128), kv_heads=4, head_dim=128)
    assert "tensor-parallel 8" in line and "1536/8 = 192" in line and "multiple of 128" in line
    assert "tensor-parallel 2, 4 works" in line and "expert parallelism" in line


def test_kv_heads_are_replicated_not_split():
    # Without the head count, k_proj 512/8 = 64 would look like a failure; vLLM gives each rank one 128 head.
    naive = split_issues(QWEN3_235B[:4], (128, 128))
    assert {(i.tp, i.module) for i in naive} == {(8, "self_attn.k_proj"), (8, "self_attn.v_proj")}
    assert split_issues(QWEN3_235B[:4], (128, 128), kv_heads=4, head_dim=128) == []


def test_row_and_column_rules_and_non_divisible_sizes():
    linears = [("model.layers.0.mlp.gate_proj", 384, 200), ("model.layers.0.mlp.down_proj", 200, 384),
               ("model.layers.1.self_attn.o_proj", 64, 300)]
    issues = {(i.tp, i.module, i.dim, i.per_rank) for i in split_issues(linears, (128, 64))}
    # gate out 384: /2 = 192 (not x128), /4 = 96, /8 = 48; down in 384: /2 = 192 = 3 x 64 ok, /4 = 96, /8 = 48;
    # o_proj in 300: /2 = 150 (not x64), /4 = 75, /8 does not divide. The input of gate (200) is never split.
    assert issues == {
        (2, "mlp.gate_proj", "out", "192"), (4, "mlp.gate_proj", "out", "96"),
        (8, "mlp.gate_proj", "out", "48"), (4, "mlp.down_proj", "in", "96"),
        (8, "mlp.down_proj", "in", "48"), (2, "self_attn.o_proj", "in", "150"),
        (4, "self_attn.o_proj", "in", "75"), (8, "self_attn.o_proj", "in", "300/8")}
    assert all("none of tensor-parallel 2, 4, 8 works" in w for w in split_warnings(linears, (128, 64)))


def test_plan_warns_for_fp8_blockwise_on_qwen3_235b_geometry(tmp_path):
    model = write_header_only(tmp_path / "q235", "qwen3-235b-a22b", layers=2)
    cfg = job_dict(model, tmp_path / "out", "fp8_blockwise", quant_method={"block_size": [128, 128]})
    plan = make_plan(prepare(parse_config(cfg)), max_cpu_memory=10**13, device_type="cuda",
                     baseline_host_bytes=GiB)
    warnings = [n for n in plan.notes if "tensor-parallel" in n]
    assert len(warnings) == 1 and warnings[0].startswith("warning: vLLM refuses tensor-parallel 8"), plan.notes
    assert "mlp.experts.*.down_proj in 1536/8 = 192" in warnings[0]
    assert "note: warning: vLLM refuses tensor-parallel 8" in plan.summary()
    # Per-tensor FP8 has no blocks: no such warning.
    plain = make_plan(prepare(parse_config(job_dict(model, tmp_path / "out2", "fp8_dynamic"))),
                      max_cpu_memory=10**13, device_type="cuda", baseline_host_bytes=GiB)
    assert not any("tensor-parallel" in n for n in plain.notes)


def test_plan_cli_prints_the_warning_for_a_tiny_moe(tiny_models, tmp_path, capsys):
    # Tiny Qwen3-MoE: experts of 32, 2 KV heads of 16. With 8x8 blocks, TP 2 and 4 work, 8 does not (32/8 = 4).
    cfg = job_dict(tiny_models["qwen3_moe"], tmp_path / "out", "fp8_blockwise", quant_method={"block_size": [8, 8]})
    assert cli_main(["plan", "-c", str(write_yaml(tmp_path / "job.yaml", cfg))]) == 0
    out = capsys.readouterr().out
    assert "note: warning: vLLM refuses tensor-parallel 8" in out and "32/8 = 4" in out
    assert "tensor-parallel 2, 4 works" in out and "tensor-parallel 2 " not in out.replace("2, 4 works", "")
