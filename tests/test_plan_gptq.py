"""`streamq plan` for int4_gptq: Hessians and the solve in the peak, the second replay in the
time; the DESIGN.md numbers for Qwen3-235B-A22B on its synthetic geometry (headers only)."""

from __future__ import annotations

import math

import pytest
from test_plan import write_header_only

from streamq.config import parse_config
from streamq.engine.job import prepare
from streamq.engine.plan import make_plan
from streamq.model.fused import fused_group_key

GiB = 2**30
HESSIANS, SOLVE = "Hessians (float32)", "GPTQ solve"


@pytest.fixture(scope="module")
def big235(tmp_path_factory):
    return write_header_only(tmp_path_factory.mktemp("plan-gptq-235b") / "q235", "qwen3-235b-a22b", layers=2)


def _job(model, out, algorithm="int4_gptq", group_size=128, **quant):
    q = {"name": algorithm, "bits": 4 if algorithm.startswith("int4") else 8, "ignore_layers": ["lm_head"], **quant}
    if algorithm.startswith("int4"):
        q["quant_method"] = {"weight": "per-group", "group_size": group_size}
    cfg = {"global": {"save_path": str(out), "device": "cpu"}, "model": {"model_path": str(model)},
           "compression": {"name": "PTQ", "quantization": q},
           "dataset": {"name": "RandomTokens", "max_seq_length": 2048, "num_samples": 64, "batch_size": 4}}
    return prepare(parse_config(cfg))


def _plan(job):
    return make_plan(job, max_gpu_memory=200 * GiB, max_cpu_memory=10**13, device_type="cuda",
                     baseline_host_bytes=GiB)


def _layer_shapes(job):
    layout = job.layouts[0]
    return {m: tuple(job.reader.tensors[n].shape) for m, n in layout.quantized.items()}, layout.experts


def test_qwen3_235b_hessian_bytes(big235, tmp_path):
    """DESIGN.md: one Hessian per Linear 17.6 GiB, one per distinct input 9.4 GiB, with
    all-experts calibration 1.5 GiB."""
    job = _job(big235, tmp_path / "out")
    shapes, experts = _layer_shapes(job)
    per_linear = sum(4 * cols * cols for _, cols in shapes.values())
    assert round(per_linear / GiB, 1) == 17.6
    # One per distinct input: q/k/v share (the fused groups), each expert's gate/up share.
    distinct = {(fused_group_key(m) if m not in experts else (experts[m].index, experts[m].proj == "down_proj")):
                shape[1] for m, shape in shapes.items()}
    assert len(distinct) == 2 + 2 * 128
    stats, _ = job.config.scheme.statistics_bytes(shapes, experts, False)
    assert stats[HESSIANS] == sum(4 * c * c for c in distinct.values())
    assert round(stats[HESSIANS] / GiB, 1) == 9.4
    stats, _ = job.config.scheme.statistics_bytes(shapes, experts, True)
    assert round(stats[HESSIANS] / GiB, 1) == 1.5
    # 4096^2 (q/k/v) + 8192^2 (o) + 4096^2 (gate/up of every expert) + 128 x 1536^2 (down), float32
    assert stats[HESSIANS] == 4 * (2 * 4096**2 + 8192**2 + 128 * 1536**2)


def test_plan_counts_hessians_solve_and_the_second_replay(big235, tmp_path):
    gptq = _plan(_job(big235, tmp_path / "a"))
    original = _plan(_job(big235, tmp_path / "b", propagate="original"))
    shared = _plan(_job(big235, tmp_path / "c", moe_calibrate_all_experts=True))
    fp8 = _plan(_job(big235, tmp_path / "d", "fp8_static"))
    for plan in (gptq, original):
        assert round(plan.gpu_breakdown[HESSIANS] / GiB, 1) == 9.4
        # The peak is the solve: Hessians + the largest chunk of experts' working set.
        assert plan.gpu_breakdown[SOLVE] > 10 * GiB
        assert plan.predicted_peak_gpu_bytes > fp8.predicted_peak_gpu_bytes + 19 * GiB
    assert round(shared.gpu_breakdown[HESSIANS] / GiB, 1) == 1.5
    assert shared.predicted_peak_gpu_bytes < gptq.predicted_peak_gpu_bytes
    assert "GPTQ solve" in gptq.summary()


def test_propagating_quantized_replays_twice(big235, tmp_path):
    """The quantized layer is replayed once more: a second forward of every calibration token."""
    from streamq.engine.plan import Assumptions, _active_params, _Choice, _layer_times, inputs_from_job

    a, choice = Assumptions(), _Choice("device", 4, 1)
    times = {}
    for propagate in ("quantized", "original"):
        inputs = inputs_from_job(_job(big235, tmp_path / propagate, propagate=propagate), "cuda")
        assert inputs.propagate_quantized == (propagate == "quantized")
        times[propagate] = _layer_times(inputs, a, choice).compute
    tokens = 64 * 2048
    replay = [2 * _active_params(inputs, lay) * tokens / a.gpu_flops for lay in inputs.layers]
    assert all(r > 0 for r in replay)
    for q, o, r in zip(times["quantized"], times["original"], replay, strict=True):
        assert q == pytest.approx(o + r)


def test_plan_on_cpu_counts_hessians_on_the_host(tiny_models, tmp_path):
    # groups of 32: the tiny experts' down_proj has 32 input columns (128 is refused up front)
    plan = make_plan(_job(tiny_models["qwen3_moe"], tmp_path / "out", group_size=32), max_cpu_memory=10**13,
                     baseline_host_bytes=GiB)
    # tiny MoE: 64^2 (q/k/v) + 64^2 (o) + 12 x 64^2 (gate/up) + 12 x 32^2 (down), float32
    assert plan.host_breakdown[HESSIANS] == 4 * (14 * 64**2 + 12 * 32**2)
    assert plan.host_breakdown[SOLVE] > 0 and plan.gpu_breakdown == {}


def test_time_counts_hessians_and_solves_as_measured_on_an_h200(tmp_path_factory):
    """4 layers of Qwen3-235B-A22B at 128 x 2048 tokens took 31.8 s in the layer loop on an
    H200, 29.7 s of it after the first read (docs/results/h200x2-dist-calibrated.md, sixth
    round: 6.0 s replay + Hessians, 21.5 s solves, 1.7 s propagation); the plan must count
    the solves, not only the replay."""
    src = write_header_only(tmp_path_factory.mktemp("plan-gptq-time") / "q235", "qwen3-235b-a22b", layers=4)
    cfg = {"global": {"save_path": str(src.parent / "out"), "device": "cpu"}, "model": {"model_path": str(src)},
           "compression": {"name": "PTQ", "quantization": {"name": "int4_gptq", "bits": 4}},
           "dataset": {"name": "RandomTokens", "num_samples": 128, "max_seq_length": 2048, "batch_size": 4}}
    plan = make_plan(prepare(parse_config(cfg)), max_gpu_memory=140 << 30, max_cpu_memory=10**13,
                     device_type="cuda", baseline_host_bytes=1 << 30)
    assert 0.8 * 29.7 < plan.time_breakdown["layers"] < 1.25 * 29.7, plan.time_breakdown
    # Two processes splitting the work units: 17.1 s after the first read on two H200s.
    job = prepare(parse_config(cfg))
    job.work_ranks = 2
    two = make_plan(job, max_gpu_memory=140 << 30, max_cpu_memory=10**13, device_type="cuda",
                    baseline_host_bytes=1 << 30)
    assert 0.8 * 17.1 < two.time_breakdown["layers"] < 1.25 * 17.1, two.time_breakdown


def test_two_processes_plan_the_exchanged_quantized_layer(tmp_path_factory, monkeypatch):
    """With the solves split, each process ends the layer holding every process's int8 codes
    plus its own share twice; where that outweighs the solve (small expert chunks here; a
    DeepSeek-V3 layer's 11G weights at any chunk size), it sets the GPU peak. Each process
    holds the Hessians of its own work units only."""
    import streamq.schemes.int4 as int4

    monkeypatch.setattr(int4, "EXPERT_SOLVE_BYTES", 256 << 20)
    src = write_header_only(tmp_path_factory.mktemp("plan-exchange") / "q235", "qwen3-235b-a22b", layers=2)
    cfg = {"global": {"save_path": str(src.parent / "out"), "device": "cpu"}, "model": {"model_path": str(src)},
           "compression": {"name": "PTQ", "quantization": {"name": "int4_gptq", "bits": 4}},
           "dataset": {"name": "RandomTokens", "num_samples": 8, "max_seq_length": 256, "batch_size": 4}}
    plans = {}
    for ranks in (1, 2):
        job = prepare(parse_config(cfg))
        job.work_ranks = ranks
        plans[ranks] = make_plan(job, max_gpu_memory=140 << 30, max_cpu_memory=10**13, device_type="cuda",
                                 baseline_host_bytes=1 << 30)
    assert "exchanged quantized layer" not in plans[1].gpu_breakdown
    codes = sum(math.prod(job.reader.tensors[n].shape) for n in job.layouts[0].quantized.values())
    # Its own share: the most codes the modelled assignment gives one process and room for
    # the largest unit more, which the run's assignments balanced by measured solves never
    # exceed (`assign_units`); each code with its share of the bf16 group scales (symmetric:
    # no zero points).
    from streamq.engine.dist import holdings_cap, largest_holdings, modelled_assignment, unit_holdings

    layout = job.layouts[0]
    shapes = {m: tuple(job.reader.tensors[n].shape) for m, n in layout.quantized.items()}
    units = job.config.scheme.work_units(shapes, layout.experts, False, top_k=8)
    owners = modelled_assignment(units, 2, "cuda", 8 * 256)
    modelled, cap = largest_holdings(units, owners, 2), holdings_cap(units, owners, 2)
    largest = max(unit_holdings(u)[1] for u in units)
    own = cap[1]
    assert codes // 2 < modelled[1] < own == modelled[1] + largest < codes
    assert plans[2].gpu_breakdown["exchanged quantized layer"] == int((codes + 2 * own) * (1 + 2 / 128))
    # Each process holds only its own units' Hessians: about half of them (attention's stay
    # whole), and room for the largest unit's more.
    hessians = [plans[r].gpu_breakdown["Hessians (float32)"] for r in (1, 2)]
    assert 0.45 < hessians[1] / hessians[0] < 0.6, hessians
    room = plans[2].gpu_breakdown["statistics of a unit moved by balancing"]
    assert room == cap[0] - modelled[0] == max(u.statistics_bytes for u in units)
    # ... and only its own batches' hidden states (rank 1 of 2: batch 1 of the 2).
    job = prepare(parse_config(cfg))
    job.work_ranks, job.batch_ids = 2, [1]
    share = make_plan(job, max_gpu_memory=140 << 30, max_cpu_memory=10**13, device_type="cuda",
                      baseline_host_bytes=1 << 30)
    assert share.cache_bytes == plans[1].cache_bytes // 2, (share.cache_bytes, plans[1].cache_bytes)
    assert share.gpu_breakdown["Hessians (float32)"] == hessians[1]  # kept from every batch, not halved again


def test_a_split_replay_plans_the_module_inputs_of_one_step(tmp_path_factory):
    """Processes splitting GPTQ's replay (`dist.replay_split`) send each batch's observed
    module inputs to every process; one step (a batch from each process) is alive at once,
    each process's own batch twice (as captured and in its send buffer). AWQ records blocks,
    so every process replays every batch and receives one batch's hidden states at a time."""
    from streamq.engine.plan import _gathered_bytes, inputs_from_job

    src = write_header_only(tmp_path_factory.mktemp("plan-split") / "q235", "qwen3-235b-a22b", layers=2)
    for algo, split in (("int4_gptq", True), ("int4_awq", False)):
        cfg = {"global": {"save_path": str(src.parent / "out"), "device": "cpu"}, "model": {"model_path": str(src)},
               "compression": {"name": "PTQ", "quantization": {"name": algo, "bits": 4}},
               "dataset": {"name": "RandomTokens", "num_samples": 8, "max_seq_length": 256, "batch_size": 4}}
        job = prepare(parse_config(cfg))
        job.work_ranks, job.batch_ids = 2, [0]
        inputs = inputs_from_job(job, "cuda")
        lay = inputs.layers[0]
        assert inputs.split_replay is split
        tokens = 4 * 256
        if split:
            # q/k/v's shared input (4096), o_proj's (64 heads x 128), the experts' hidden states
            # (4096, bfloat16) and their top-8 expert ids (int64)
            assert lay.captured_per_token == (4096 + 64 * 128) * 2 + 4096 * 2 + 8 * 8
            assert sum(_gathered_bytes(inputs, lay).values()) == 3 * tokens * lay.captured_per_token
        else:
            assert _gathered_bytes(inputs, lay) == {"hidden states from another process (a batch)": tokens * 4096 * 2}


def test_processes_taking_turns_writing_plan_one_output_arena():
    """One process alternates two page-locked output arenas, each grown to the largest layer
    it held; processes that take turns writing layers keep one each (`OutputArenas(count=1)`),
    reserved for the largest layer before the loop, and a torchrun job's sole writer two."""
    from types import SimpleNamespace

    from streamq.engine.plan import _arenas_in_use

    layers = [SimpleNamespace(arena_bytes=n) for n in (5, 3, 7, 2)]
    one = SimpleNamespace(layers=layers, write_turns=1, writes_layers=True, reserves_arenas=False)
    assert [_arenas_in_use(one, i) for i in range(4)] == [5, 8, 10, 10]
    turns = SimpleNamespace(layers=layers, write_turns=2, writes_layers=True, reserves_arenas=True)
    assert [_arenas_in_use(turns, i) for i in range(4)] == [7, 7, 7, 7]
    sole = SimpleNamespace(layers=layers, write_turns=1, writes_layers=True, reserves_arenas=True)
    assert [_arenas_in_use(sole, i) for i in range(4)] == [14, 14, 14, 14]  # torchrun's one writer: two, reserved
    none = SimpleNamespace(layers=layers, write_turns=1, writes_layers=False, reserves_arenas=False)
    assert [_arenas_in_use(none, i) for i in range(4)] == [0, 0, 0, 0]  # another process writes them


def test_a_process_that_receives_the_layers_plans_no_read_buffers(tmp_path_factory):
    """Under torchrun the machine's first process reads each layer and broadcasts it; the
    others hold no page-locked read buffers, and only rank 0 writes the non-layer shard. Their
    plan counts neither (it counted both: 12.6 GiB planned against 3.4 GiB measured on rank 1
    of two H200s). The others write the layers (`Dist.writers`): the reader holds no output
    arena; one writer alone alternates two, as one process does."""
    src = write_header_only(tmp_path_factory.mktemp("plan-reader") / "q235", "qwen3-235b-a22b", layers=2)
    cfg = {"global": {"save_path": str(src.parent / "out"), "device": "cpu"}, "model": {"model_path": str(src)},
           "compression": {"name": "PTQ", "quantization": {"name": "int4_gptq", "bits": 4}},
           "dataset": {"name": "RandomTokens", "num_samples": 8, "max_seq_length": 256, "batch_size": 4}}
    plans = []
    for rank in (0, 1):
        job = prepare(parse_config(cfg))
        job.work_ranks, job.batch_ids, job.received_layers, job.write_turns = 2, [rank], True, 1
        job.reads_layers = job.writes_rest = rank == 0
        job.writes_layers = job.reserves_arenas = rank == 1
        plans.append(make_plan(job, max_gpu_memory=140 << 30, max_cpu_memory=10**13, device_type="cuda",
                               baseline_host_bytes=1 << 30))
    layer = max(sum(job.reader.tensors[n].nbytes for n in names) for names in job.reader.layers.values())
    reader, receiver = (p.host_breakdown for p in plans)
    assert reader["layer (page-locked read buffer)"] >= layer and receiver["layer (page-locked read buffer)"] == 0
    assert reader["non-layer tensors (first shard, write pending)"] > 0
    assert "non-layer tensors (first shard, write pending)" not in receiver
    arenas = receiver["output arenas (page-locked)"]
    assert reader["output arenas (page-locked)"] == 0 and arenas > 0
    assert plans[1].predicted_peak_host_bytes < plans[0].predicted_peak_host_bytes - 2 * layer + arenas
    assert plans[1].gpu_breakdown == plans[0].gpu_breakdown  # the GPU holds the layer as received either way
