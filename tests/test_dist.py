"""Several processes under torchrun (gloo on CPU): the output is byte-identical to one
process (calibration-free, samples split, work units split), a rank killed mid-run stops
the job, and one process resumes it to the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_config, write_yaml
from test_gptq_streaming import gptq_config

from streamq.errors import StreamqError
from streamq.testing.tiny_models import CALIB_FILE

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cfg_path: Path, nproc: int, env_extra: dict | None = None, entry: Path | None = None
         ) -> subprocess.CompletedProcess:
    """`streamq quantize -c cfg_path` in `nproc` processes; `entry`: a script that wraps the
    CLI (tests/arenas_on_cpu.py, tests/inplace_inputs.py) instead of `-m streamq`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("WORLD_SIZE", None)
    program = [str(entry)] if entry is not None else ["-m", "streamq"]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(_free_port())]
    cmd = launcher + program + ["quantize", "-c", str(cfg_path), "-q"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _digests(out: Path) -> dict[str, str]:
    files = sorted(out.glob("*.safetensors")) + [out / "config.json", out / "model.safetensors.index.json"]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def single(tiny_models, tmp_path_factory):
    """One-process fp8_dynamic outputs of the tiny dense and MoE models."""
    root = tmp_path_factory.mktemp("dist_single")
    outs = {}
    for arch in ("qwen3", "qwen3_moe"):
        out = root / arch
        r = _run(write_yaml(root / f"{arch}.yaml", make_config(tiny_models[arch], out)), 1)
        assert r.returncode == 0, r.stderr
        outs[arch] = out
    return outs


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_two_processes_write_the_same_bytes(tiny_models, single, tmp_path, arch):
    out = tmp_path / "out"
    r = _run(write_yaml(tmp_path / "job.yaml", make_config(tiny_models[arch], out)), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single[arch])
    assert not list(out.glob("streamq_run.rank*.json"))  # merged into streamq_run.json by rank 0
    assert sum(line.startswith("wrote /") for line in r.stdout.splitlines()) == 1  # rank 0 reports


def test_killed_rank_stops_the_job_and_one_process_resumes(tiny_models, single, tmp_path):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", make_config(tiny_models["qwen3_moe"], out))
    r = _run(cfg, 2, {"STREAMQ_KILL_AT": "layer-recorded:1", "STREAMQ_KILL_RANK": "1"})
    assert r.returncode != 0
    assert not (out / "config.json").exists()  # nothing looks finished
    r = _run(cfg, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single["qwen3_moe"])


def _calibrated(scheme: str, model: Path, out: Path) -> dict:
    # int4: 5 batches of 2 (some padded), 3 for rank 0 and 2 for rank 1, so the last step has one
    # batch and every sum has more than two terms: their order shows in the bytes (a + b == b + a).
    # Every rank replays its batches and solves (or searches) its share of the layer.
    dataset = {"name": "TextDataset", "data_path": str(CALIB_FILE), "max_seq_length": 96, "num_samples": 10,
               "batch_size": 2}
    if scheme.startswith("int4_gptq"):
        return gptq_config(model, out, propagate="original" if scheme.endswith("original") else "quantized",
                           dataset=dataset)
    if scheme.startswith("int4_awq"):
        cfg = gptq_config(model, out, dataset=dataset)
        q = cfg["compression"]["quantization"]
        q.pop("propagate")
        q.update(name="int4_awq", n_grid=4, quant_method={"weight": "per-group", "group_size": 32, "zero_point": True,
                                                          "mse_range": scheme.endswith("mse")})
        return cfg
    # 4 batches of 2, 1 with padding: each rank replays 2; ranges are max-reduced
    return make_config(model, out, algorithm="fp8_static", num_samples=8, batch_size=2, max_seq_length=48)


@pytest.fixture(scope="module")
def single_calibrated(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_single_calibrated")
    outs = {}

    def get(scheme: str, arch: str) -> Path:
        if (scheme, arch) not in outs:
            out = root / f"{scheme}-{arch}"
            r = _run(write_yaml(root / f"{scheme}-{arch}.yaml", _calibrated(scheme, tiny_models[arch], out)), 1)
            assert r.returncode == 0, r.stderr[-3000:]
            outs[scheme, arch] = out
        return outs[scheme, arch]

    return get


@pytest.mark.parametrize("scheme", ["fp8_static", "int4_gptq", "int4_gptq+original", "int4_awq", "int4_awq+mse"])
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_calibrated_two_processes_write_the_same_bytes(tiny_models, single_calibrated, tmp_path, scheme, arch):
    out = tmp_path / "out"
    r = _run(write_yaml(tmp_path / "job.yaml", _calibrated(scheme, tiny_models[arch], out)), 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single_calibrated(scheme, arch))
    report = (out / "streamq_report.json").read_text()
    assert '"2 processes (torchrun)' in report
    if scheme.startswith("int4_gptq"):  # each layer's solves per process, as assigned and as measured
        split = json.loads(report)["report"]["work_split"]
        layers = json.loads((tiny_models[arch] / "config.json").read_text())["num_hidden_layers"]
        assert [row["layer"] for row in split] == list(range(layers)), split
        assert all(len(row["predicted_solve_s"]) == len(row["measured_solve_s"]) == 2 for row in split)
        assert all(sum(row["measured_solve_s"]) > 0 for row in split), split
        # GPTQ's replay for the statistics is split: each batch's forward ran on its holder only.
        assert all(row["statistics_forward"] == "own batches" for row in split), split
    # One read per machine: rank 0 reads every layer and broadcasts it; rank 1 reads none,
    # only the model stem it embeds its calibration tokens with.
    from streamq.checkpoint.reader import CheckpointReader
    from streamq.engine.progress import fmt_bytes

    reader = CheckpointReader(tiny_models[arch])
    stem = sum(reader.tensors[n].nbytes for n in reader.other if n.startswith("model.")
               and not n.startswith("model.layers."))
    rank1 = re.search(r"rank 1: done[^\n]*", r.stdout)  # the processes' lines may interleave
    assert rank1 and f", read {fmt_bytes(stem)}," in rank1.group(), r.stdout


def test_the_writer_packing_beside_the_propagation_writes_the_same_bytes(tiny_models, single_calibrated, tmp_path):
    """The GPU path of a split GPTQ layer, run on the CPU (tests/arenas_on_cpu.py forces the
    output arenas): the writing process packs the exchanged layer in a thread beside the
    propagation and takes its output arena there; the bytes are one process's. The reading
    process writes none."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", _calibrated("int4_gptq", tiny_models["qwen3_moe"], out))
    r = _run(cfg, 2, entry=REPO / "tests" / "arenas_on_cpu.py")
    assert r.returncode == 0, r.stderr[-3000:]
    layers = json.loads((tiny_models["qwen3_moe"] / "config.json").read_text())["num_hidden_layers"]
    packed = [int(n) for n in re.findall(r"packed beside: (\d+)", r.stdout)]
    # The machine's reader (rank 0) writes no layer: rank 1 writes every one (`Dist.writers`).
    assert packed == [0, layers] or packed == [layers, 0], r.stdout
    assert _digests(out) == _digests(single_calibrated("int4_gptq", "qwen3_moe"))


def test_a_module_input_changed_in_place_after_its_call_is_refused_by_the_split_replay(tiny_models, tmp_path):
    """The split replay sends a Linear's input after the rest of the layer ran: one the
    forward changed in place since (tests/inplace_inputs.py) is refused with a clear error
    and the run is not marked complete, instead of sending other values than the Linear saw."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", _calibrated("int4_gptq", tiny_models["qwen3"], out))
    r = _run(cfg, 2, entry=REPO / "tests" / "inplace_inputs.py")
    assert r.returncode != 0
    assert "was changed in place later in the layer's forward" in r.stderr + r.stdout, r.stderr[-3000:]
    assert not (out / "config.json").exists()  # the run is not marked complete


@pytest.mark.skipif(not __import__("torch").cuda.is_available() or __import__("torch").cuda.device_count() < 2,
                    reason="needs 2 GPUs")
@pytest.mark.parametrize("scheme", ["fp8_dynamic", "fp8_static", "int4_gptq", "int4_awq"])
def test_two_gpus_write_the_same_bytes(tiny_models, tmp_path, scheme):
    """NCCL, one GPU per process, against one process on one GPU."""
    outs = {}
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        cfg = _calibrated(scheme, tiny_models["qwen3_moe"], out) if scheme != "fp8_dynamic" else \
            make_config(tiny_models["qwen3_moe"], out)
        cfg["global"]["device"] = "cuda"
        r = _run(write_yaml(tmp_path / f"job{n}.yaml", cfg), n)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[n] = _digests(out)
    assert outs[1] == outs[2]


# Rank 1 dies recording its layer, or in layer 1's statistics pass while rank 0 waits in the
# broadcast of a batch (rank 1 reaches 5 batches of that pass and 2 of propagation per layer).
@pytest.mark.parametrize("kill_at", ["layer-recorded:1", "calibrate-batch:9"])
def test_calibrated_killed_rank_then_one_process_resumes(tiny_models, single_calibrated, tmp_path, kill_at):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", _calibrated("int4_gptq", tiny_models["qwen3_moe"], out))
    began = time.monotonic()
    r = _run(cfg, 2, {"STREAMQ_KILL_AT": kill_at, "STREAMQ_KILL_RANK": "1"})
    assert r.returncode != 0
    assert time.monotonic() - began < 120  # torchrun stops rank 0, no wait for a collective's timeout
    assert not (out / "config.json").exists()
    r = _run(cfg, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    if kill_at.startswith("layer-recorded"):
        assert "already done" in r.stderr + r.stdout
    assert _digests(out) == _digests(single_calibrated("int4_gptq", "qwen3_moe"))


def test_how_schemes_split_across_processes():
    """Exact merges split the samples, declared work units split the work; a scheme with
    neither is refused, naming it, before anything runs."""
    from streamq.config import parse_config
    from streamq.engine.dist import MODULES, SAMPLES, calibration_split
    from streamq.errors import ConfigError
    from streamq.schemes.base import Scheme

    def scheme(cfg: dict):
        return parse_config(cfg, "test").scheme

    base = _calibrated("fp8_static", Path("m"), Path("o"))
    assert calibration_split(scheme(base)) == SAMPLES
    assert calibration_split(scheme(_calibrated("int4_gptq", Path("m"), Path("o")))) == MODULES
    assert calibration_split(scheme(_calibrated("int4_awq", Path("m"), Path("o")))) == MODULES

    class Summing(Scheme):  # a sum statistic and no work units
        name = "summing"

        def observer_kind(self):
            return "channel_absmean"

    with pytest.raises(ConfigError, match="summing under several processes"):
        calibration_split(Summing())


class _FakeDist:
    """A Dist whose gather returns what the other ranks would have sent."""

    def __new__(cls, views: list):
        from streamq.engine.dist import Dist

        class D(Dist):
            def gather(self, obj):
                return [obj] + views[1:]

        return D(0, len(views), 0)


def test_ranks_with_different_configs_are_refused():
    from streamq.errors import ConfigError

    facts = {"config": "abc", "source checkpoint": {"a.safetensors": 10}}
    _FakeDist([facts, dict(facts)]).check_same(facts)  # the same: no error
    other = dict(facts, **{"source checkpoint": {"a.safetensors": 11}})
    with pytest.raises(ConfigError, match="rank 1 has a different source checkpoint than rank 0"):
        _FakeDist([facts, other]).check_same(facts)


def test_a_plan_that_fails_on_one_process_stops_every_process():
    """Each process plans its own share (rank 0 alone holds the read buffers and the non-layer
    shard), so a budget can refuse one process's plan only: every process then stops with that
    error, before rank 0 opens the output, instead of waiting for one that has left."""
    from streamq.errors import BudgetError

    _FakeDist([None, None]).share_failure(None)  # none failed: all go on
    with pytest.raises(StreamqError, match=r"rank 1 stopped the job \(BudgetError\): too big") as e:
        _FakeDist([None, ("BudgetError", "too big", 3)]).share_failure(None)
    assert e.value.exit_code == 3  # the failing process's exit code, on every process
    own = BudgetError("mine")
    with pytest.raises(BudgetError, match="mine"):  # a failing process raises its own error
        _FakeDist([None, ("BudgetError", "too big", 3)]).share_failure(own)


def test_work_units_go_largest_first_to_the_least_loaded_rank():
    from streamq.engine.dist import assign

    assert assign([5.0, 1.0, 4.0, 3.0, 3.0], 2) == [0, 1, 1, 1, 0]  # loads 8 and 8
    assert assign([1.0, 1.0, 1.0], 1) == [0, 0, 0]
    assert assign([2.0, 2.0], 3) == [0, 1]
    # With a cap on what each rank holds, a unit goes to the least loaded rank with room.
    assert assign([5.0, 4.0, 3.0, 1.0], 2) == [0, 1, 1, 0]
    assert assign([5.0, 4.0, 3.0, 1.0], 2, sizes=[(1, 0), (2, 0), (2, 0), (0, 0)], cap=(3, 9)) == [0, 1, 0, 1]
    assert assign([5.0, 4.0, 3.0, 1.0], 2, sizes=[(0, 1), (0, 2), (0, 2), (0, 0)], cap=(9, 3)) == [0, 1, 0, 1]
    assert assign([5.0, 4.0, 3.0], 2, sizes=[(3,), (3,), (3,)], cap=(3,)) is None  # the third fits nowhere


def test_measured_solves_rebalance_within_the_planned_statistics():
    """The next layer's assignment takes the solves measured on earlier layers in place of
    the model's, and keeps each rank's statistics within the modelled assignment's largest
    share (what the plan sizes); the measurements are keyed by the unit within its layer."""
    from streamq.engine.dist import UnitTimes, assign_units
    from streamq.schemes.base import WorkUnit, device_costs

    def units(layer, sizes=(8, 4, 4, 4)):
        p = f"model.layers.{layer}."
        modules = [(p + "self_attn.o_proj",), (p + "mlp.experts.0.down_proj", p + "mlp.experts.1.down_proj"),
                   (p + "mlp.experts.2.down_proj", p + "mlp.experts.3.down_proj"), (p + "self_attn.q_proj",)]
        return [WorkUnit(m, 8, f, statistics_bytes=n) for m, f, n in zip(modules, (8e9, 8e9, 8e9, 4e9), sizes,
                                                                         strict=True)]

    def held(assignment, rank, sizes=(8, 4, 4, 4)):
        return sum(n for n, r in zip(sizes, assignment, strict=True) if r == rank)

    costs = device_costs("cpu")
    first = units(0)
    modelled = assign_units(first, 2, "cpu", 0)
    assert modelled == [0, 1, 0, 1]  # the model's costs: three equal units and a half one
    times = UnitTimes()
    sigs = [UnitTimes.signature(u, "model.layers.0.") for u in first]
    assert len(set(sigs)) == 4 and sigs == [UnitTimes.signature(u, "model.layers.5.") for u in units(5)]
    # Measured: o_proj takes three times the model's; the others as modelled, after a first
    # layer that carried one-time costs (left out of the mean once a second layer is measured).
    times.record({sigs[1]: 10 * first[1].seconds(costs)})
    assert times.solve_seconds(sigs[1]) == pytest.approx(10 * first[1].seconds(costs))
    times.record({sigs[0]: 3 * first[0].seconds(costs), sigs[3]: first[3].seconds(costs)})
    times.record({sigs[1]: first[1].seconds(costs), sigs[2]: first[2].seconds(costs)})
    times.record({sigs[0]: 3 * first[0].seconds(costs)})
    assert times.solve_seconds(sigs[0]) == pytest.approx(3 * first[0].seconds(costs))
    assert times.solve_seconds(sigs[1]) == pytest.approx(first[1].seconds(costs))
    solves = [times.solve_seconds(UnitTimes.signature(u, "model.layers.5.")) for u in units(5)]
    balanced = assign_units(units(5), 2, "cpu", 0, solves)
    assert balanced == [0, 1, 1, 1]  # o_proj alone on one rank
    # Within the planned share: the model's largest and the largest unit more.
    assert max(held(balanced, 0), held(balanced, 1)) <= max(held(modelled, 0), held(modelled, 1)) + 8
    # Where the fastest assignment would hold more than that, the fastest within it stands:
    # unit 0's solve measured at 100 s would be alone on one rank, the four others (5 bytes
    # of statistics each) together on the other, 20 bytes against the cap's 16.
    from streamq.engine.dist import holdings_cap, largest_holdings, modelled_assignment

    five = [WorkUnit((f"m{k}",), 8, 8e9, statistics_bytes=1 if k == 0 else 5) for k in range(5)]
    cap = holdings_cap(five, modelled_assignment(five, 2, "cpu", 0), 2)
    assert cap[0] == 16
    owners = assign_units(five, 2, "cpu", 0, [100.0, 1.0, 1.0, 1.0, 1.0])
    assert all(h <= c for h, c in zip(largest_holdings(five, owners, 2), cap, strict=True))
    assert sorted(owners.count(r) for r in (0, 1)) == [2, 3] and owners.count(owners[0]) == 2


def test_assignments_are_the_shortest_within_the_cap():
    """`search` finds the assignment with the shortest layer (statistics phase plus solve
    phase, the work shared by a group counted once per rank owning any of it), as trying
    every assignment does, within the most a rank may hold; `assign_units` never holds more
    than `holdings_cap`, the share the plan sizes."""
    import itertools
    import random

    from streamq.engine.dist import assign_units, holdings_cap, largest_holdings, modelled_assignment, search, span
    from streamq.schemes.base import WorkUnit

    rng = random.Random(0)
    for world in (2, 3):
        for _ in range(12):
            n = rng.randint(3, 7)
            phases = [[rng.uniform(0, 1) for _ in range(n)], [rng.uniform(0, 4) for _ in range(n)]]
            sizes = [(rng.randint(1, 4), rng.randint(1, 4)) for _ in range(n)]
            cap = (sum(s[0] for s in sizes) * 2 // world, sum(s[1] for s in sizes) * 2 // world)
            shared = [("down", 0.7) if rng.random() < 0.4 else None for _ in range(n)]
            fits = [o for o in itertools.product(range(world), repeat=n)
                    if all(sum(s[k] for s, r in zip(sizes, o, strict=True) if r == rank) <= cap[k]
                           for rank in range(world) for k in (0, 1))]
            best = min(span(list(o), phases, world, shared) for o in fits)
            found = search(phases, world, sizes, cap, shared)
            assert found in [list(o) for o in fits]
            assert span(found, phases, world, shared) == pytest.approx(best)
    # Too many to try: the bound stops the search, which returns the shortest it reached, the
    # seed where it reached none shorter.
    many = [[rng.uniform(0, 1) for _ in range(16)] for _ in range(2)]
    seed = [0] * 16
    found = search(many, 4, [(0,)] * 16, (0,), seed=seed, nodes=100)
    assert span(found, many, 4) < span(seed, many, 4)
    assert search(many, 4, [(0,)] * 16, (0,), seed=seed, nodes=1) == seed
    assert search(many, 4, [(0,)] * 16, (0,), nodes=1) is None

    # Two down chunks whose owners each run the routed rows' gate/up GEMM, as long as o_proj's
    # Hessian: one rank takes both, o_proj goes to the other. Counted per unit instead (no
    # `shared`), the balance would split them and the statistics phase would take twice as long.
    def unit(name, token_flops, shared=""):
        return WorkUnit((name,), 1, 2e9, token_flops=token_flops, statistics_bytes=1,
                        shared=shared, shared_token_flops=4e6 if shared else 0.0)

    units = [unit("o_proj", 4e6), unit("down.0", 1e4, "down"), unit("down.1", 1e4, "down"),
             unit("gate_up.0", 1e4), unit("gate_up.1", 1e4), unit("qkv", 1e4)]
    owners = assign_units(units, 2, "cpu", 1000)
    assert owners[1] == owners[2] != owners[0]
    cap = holdings_cap(units, modelled_assignment(units, 2, "cpu", 1000), 2)
    assert all(h <= c for h, c in zip(largest_holdings(units, owners, 2), cap, strict=True))


def test_rebalance_shortens_the_slowest_rank_of_each_phase_within_the_cap():
    from streamq.engine.dist import rebalance

    statistics, solves = [2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 2.0]

    def span(owner):
        return sum(max(sum(c for c, o in zip(phase, owner, strict=True) if o == r) for r in (0, 1))
                   for phase in (statistics, solves))

    # Start: statistics 2 | 0, solves 1 | 3: the layer takes 2 + 3; the best is 2 + 2.
    assert span([0, 0, 1, 1]) == 5
    assert span(rebalance([0, 0, 1, 1], [statistics, solves], 2, [(0,)] * 4, (0,))) == 4
    # Each rank may hold 2: unit 2 cannot join unit 1 (2 + 1), and no swap shortens the layer.
    assert rebalance([0, 0, 1, 1], [statistics, solves], 2, [(0,), (2,), (1,), (1,)], (2,)) == [0, 0, 1, 1]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU")
def test_timed_units_on_cuda_time_the_device():
    import torch

    from streamq.engine.dist import timed_units

    x = torch.randn(2048, 2048, device="cuda")

    def solves():
        for _ in range(20):
            y = x @ x  # unit a: twenty matmuls, queued without a synchronization
        yield "a1", y
        yield "b1", x @ x  # unit b: one

    pairs, seconds = timed_units(solves(), {"a1": ("a",), "b1": ("b",)}, torch.device("cuda"))
    assert [m for m, _ in pairs] == ["a1", "b1"]
    assert seconds[("a",)] > 5 * seconds[("b",)] > 0, seconds


def test_timed_units_give_each_unit_the_time_up_to_its_modules():
    import time

    import torch

    from streamq.engine.dist import timed_units

    def solves():
        time.sleep(0.05)  # unit a solves its two modules at once
        yield "a1", 1
        yield "a2", 2
        time.sleep(0.01)
        yield "b1", 3

    pairs, seconds = timed_units(solves(), {"a1": ("a",), "a2": ("a",), "b1": ("b",)}, torch.device("cpu"))
    assert pairs == [("a1", 1), ("a2", 2), ("b1", 3)]
    assert set(seconds) == {("a",), ("b",)}
    assert 0.05 <= seconds[("a",)] < 0.5 and 0.01 <= seconds[("b",)] < seconds[("a",)]


@pytest.mark.parametrize("scheme", ["fp8_static", "int4_gptq"])
def test_cache_checkpoint_of_two_processes_resumes_with_one(tiny_models, single_calibrated, tmp_path, scheme):
    """Two processes checkpoint the hidden states after layer 0 (each its own batches); rank 1,
    which writes every layer (rank 0 reads them), dies writing layer 1, its second; one process
    resumes from the checkpoint."""
    out = tmp_path / "out"
    cfg = _calibrated(scheme, tiny_models["qwen3_moe"], out)
    cfg["global"]["cache_checkpoint_layers"] = 1
    path = write_yaml(tmp_path / "job.yaml", cfg)
    r = _run(path, 2, {"STREAMQ_KILL_AT": "layer-recorded:2", "STREAMQ_KILL_RANK": "1"})
    assert r.returncode != 0
    checkpoint = out / ".streamq_cache" / "checkpoint-layer-00001"
    batches = {"fp8_static": 4, "int4_gptq": 5}[scheme]  # every batch, whoever held it
    assert len(list(checkpoint.glob("batch-*.safetensors"))) == batches
    r = _run(path, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibration resumes at layer 1 from its hidden-state checkpoint" in r.stderr
    assert _digests(out) == _digests(single_calibrated(scheme, "qwen3_moe"))


def test_cache_checkpoint_of_one_process_resumes_with_two(tiny_models, single_calibrated, tmp_path):
    """One process checkpoints the hidden states after layer 0 and dies calibrating layer 1; two
    processes resume from the checkpoint, each loading its own batches of it (5 batches: 3 and
    2), and redo layer 0's quantized replay (GPTQ) from the checkpoint's layer 1 inputs on."""
    out = tmp_path / "out"
    cfg = _calibrated("int4_gptq", tiny_models["qwen3_moe"], out)
    cfg["global"]["cache_checkpoint_layers"] = 1
    path = write_yaml(tmp_path / "job.yaml", cfg)
    r = _run(path, 1, {"STREAMQ_KILL_AT": "calibrate-batch:12"})  # layer 0: 5 batches twice (GPTQ)
    assert r.returncode != 0
    assert len(list((out / ".streamq_cache" / "checkpoint-layer-00001").glob("batch-*.safetensors"))) == 5
    r = _run(path, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "calibration resumes at layer 1 from its hidden-state checkpoint" in r.stderr
    assert _digests(out) == _digests(single_calibrated("int4_gptq", "qwen3_moe"))


@pytest.mark.parametrize("scheme", ["int4_gptq", "int4_awq"])
def test_three_processes_write_the_same_bytes(tiny_models, single_calibrated, tmp_path, scheme):
    """5 batches over 3 processes (2, 2, 1: the last step has two), work units over 3."""
    out = tmp_path / "out"
    r = _run(write_yaml(tmp_path / "job.yaml", _calibrated(scheme, tiny_models["qwen3_moe"], out)), 3)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(out) == _digests(single_calibrated(scheme, "qwen3_moe"))


def test_fewer_batches_than_processes_split_the_work_units(tiny_models, tmp_path):
    """int4_gptq with one calibration batch on two processes: rank 1 holds no hidden states,
    still replays the batch rank 0 sends for the Hessians of its work units, and the output
    is one process's. (Ranges, fp8_static, need a batch on every process: refused.)"""
    outs = {}
    for n in (1, 2):
        outs[n] = tmp_path / f"out{n}"
        cfg = _calibrated("int4_gptq", tiny_models["qwen3_moe"], outs[n])
        cfg["dataset"].update(num_samples=2, batch_size=2)
        r = _run(write_yaml(tmp_path / f"job{n}.yaml", cfg), n)
        assert r.returncode == 0, r.stderr[-3000:]
    assert _digests(outs[2]) == _digests(outs[1])
    cfg = make_config(tiny_models["qwen3"], tmp_path / "static", algorithm="fp8_static", num_samples=2, batch_size=2)
    r = _run(write_yaml(tmp_path / "static.yaml", cfg), 2)
    assert r.returncode != 0 and "1 calibration batch(es) cannot be split across 2 processes" in r.stderr


def test_a_share_of_the_experts_solves_to_the_full_layers_bytes(tiny_models, tmp_path, monkeypatch):
    """In one process, no torchrun: the MoE layer's experts are cut into several chunks (a
    small solve budget), the work units split over 2 ranks, and rank 1 quantizes its units
    from Hessians of only its experts (what `ExpertHessianAccumulator(owned=...)` holds, with
    the '.experts' index). Every module it solves is bit-identical to the full layer's."""
    import torch

    import streamq.schemes.int4 as int4
    from streamq.config import parse_config
    from streamq.engine.dist import assign
    from streamq.engine.job import prepare
    from streamq.model.fused import fused_group_key
    from streamq.schemes.base import LayerStats, device_costs

    job = prepare(parse_config(gptq_config(tiny_models["qwen3_moe"], tmp_path / "out"), "test"))
    layout, scheme, infos = job.layouts[0], job.config.scheme, job.reader.tensors
    shapes = {m: tuple(infos[n].shape) for m, n in layout.quantized.items()}
    per_expert = max(int4.solve_bytes(1, *shapes[m], 1) for m in layout.experts)
    monkeypatch.setattr(int4, "EXPERT_SOLVE_BYTES", 3 * per_expert)  # chunks of at most 3 of the 12 experts
    gen = torch.Generator().manual_seed(0)

    def psd(*lead, n):
        x = torch.randn(*lead, 4 * n, n, generator=gen)
        return x.transpose(-1, -2) @ x / (4 * n)

    weights = {m: torch.randn(*shapes[m], generator=gen).to(torch.bfloat16) for m in layout.quantized}
    values, by_input = {}, {}
    for m in layout.quantized:
        if m not in layout.experts:  # modules reading one input share one Hessian object
            values[m] = by_input.setdefault(fused_group_key(m), psd(n=shapes[m][1]))
    nums, cols = {}, {}
    for m, ref in layout.experts.items():
        nums[ref.parent] = max(nums.get(ref.parent, 0), ref.index + 1)
        cols[ref.parent, ref.kind] = shapes[m][1]
    for (parent, kind), n in cols.items():
        values[f"{layout.prefix}{parent}.{kind}"] = psd(nums[parent], n=n)
        values[f"{layout.prefix}{parent}.{kind}.count"] = torch.full((nums[parent],), 10, dtype=torch.int64)
    full = dict(scheme.quantize(weights, LayerStats(values, {}, []), layout))

    units = scheme.work_units(shapes, layout.experts)
    assert sum(1 for u in units if set(u.modules) <= set(layout.experts)) > 4  # several expert chunks
    owners = assign([u.seconds(device_costs("cpu"), 1000) for u in units], 2)
    owned = {m for u, r in zip(units, owners, strict=True) if r == 1 for m in u.modules}
    part_values = dict(values)
    for (parent, kind) in cols:
        key = f"{layout.prefix}{parent}.{kind}"
        held = sorted({layout.experts[m].index for m in owned if m in layout.experts
                       and layout.experts[m].parent == parent and layout.experts[m].kind == kind})
        part_values[key] = values[key][held]
        part_values[f"{key}.experts"] = torch.tensor(held, dtype=torch.int64)
    # Some chunk sits elsewhere in the held Hessians than in the full stack (held is not 0, 1, 2, ...).
    assert any(v.tolist() != list(range(len(v))) for k, v in part_values.items() if k.endswith(".experts"))
    part = dict(scheme.quantize({m: weights[m] for m in owned}, LayerStats(part_values, {}, []), layout))
    assert set(part) == owned
    for m, q in part.items():
        assert torch.equal(q.weight, full[m].weight) and torch.equal(q.weight_scale, full[m].weight_scale), m


def test_an_awq_search_no_process_ran_stops_the_layer():
    """Processes that disagree on the split would leave a group unsearched; a missing result
    that nobody marked "no tokens" raises instead of quantizing with scale 1."""
    import torch

    from streamq.errors import CheckpointError
    from streamq.schemes.awq import _searched

    _searched({"mlp.experts.3.up_proj|none": torch.zeros(())}, "mlp.experts.3.up_proj", "group")  # marked: fine
    with pytest.raises(CheckpointError, match="group 'x' was run by no process"):
        _searched({"mlp.experts.3.up_proj|none": torch.zeros(())}, "input_layernorm", "group 'x'")


def test_the_readers_of_the_machines_write_no_layer():
    """Processes that all take every layer: each machine's first process reads the layers,
    the others take turns writing them; machines of one process each (or no machine group)
    all write."""
    from types import SimpleNamespace

    from streamq.engine.dist import Dist

    assert Dist(0, 2, 0).writers(SimpleNamespace(size=2)) == [1]
    assert Dist(5, 8, 1).writers(SimpleNamespace(size=4)) == [1, 2, 3, 5, 6, 7]
    assert Dist(1, 2, 0).writers(SimpleNamespace(size=1)) == [0, 1]
    assert Dist(0, 2, 0).writers(None) == [0, 1]
