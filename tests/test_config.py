"""Config validation: every mistake is exit code 2 with one line naming the key and the
allowed values; CLI overrides win over the file; the shipped configs parse."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
from conftest import make_config, write_yaml

from streamq.cli import main as cli_main
from streamq.config import NOTED_KEYS, load_config, parse_config
from streamq.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(REPO.glob("configs/**/*.yaml"))


def _set(cfg: dict, path: str, value) -> dict:
    node = cfg
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return cfg


def _static(cfg: dict) -> dict:
    return make_config(cfg["model"]["model_path"], cfg["global"]["save_path"], algorithm="fp8_static",
                       activation=cfg["compression"]["quantization"]["quant_method"]["activation"])


# id -> (edit of a valid fp8_dynamic config, substrings the one error line must contain)
BAD = {
    "unknown-top-level": (lambda c: _set(c, "calibration", {"n": 1}),
                          ["unknown key 'calibration'", "compression", "dataset", "global", "model"]),
    "unknown-nested": (lambda c: _set(c, "compression.quantization.quant_method.weights", "per-tensor"),
                       ["'compression.quantization.quant_method.weights'", "activation", "weight"]),
    "unknown-in-global": (lambda c: _set(c, "global.save_dir", "/tmp/x"),
                          ["'global.save_dir'", "save_path", "device", "max_gpu_memory"]),
    "unknown-in-dataset": (lambda c: _set(_static(c), "dataset.shuffle", True),
                           ["'dataset.shuffle'", "num_samples", "max_seq_length"]),
    "bits-is-string": (lambda c: _set(c, "compression.quantization.bits", "8"),
                       ["'compression.quantization.bits'", "an integer", "'8'"]),
    "bits-is-bool": (lambda c: _set(c, "compression.quantization.bits", True),
                     ["'compression.quantization.bits'", "an integer"]),
    "ignore-not-a-list": (lambda c: _set(c, "compression.quantization.ignore_layers", "lm_head"),
                          ["'compression.quantization.ignore_layers'", "a list"]),
    "low-memory-not-bool": (lambda c: _set(c, "compression.quantization.low_memory", "yes please"),
                            ["'compression.quantization.low_memory'", "true/false"]),
    "int4-gptq-fp8-format": (lambda c: _set(_set(_set(c, "compression.quantization.name", "int4_gptq"),
                                                "compression.quantization.bits", 4),
                                           "compression.quantization.quant_method", {"weight": "per-group"}),
                             ["int4_gptq", "save_name 'fp8'", "compressed-tensors, gptq"]),
    "int4-awq-n-grid": (lambda c: _set(_set(_set(_set(c, "compression.quantization.name", "int4_awq"),
                                                "compression.quantization.bits", 4),
                                           "compression.quantization.quant_method",
                                           {"weight": "per-group", "group_size": 128}),
                                      "compression.quantization.n_grid", 0),
                        ["'compression.quantization.n_grid'", "positive integer"]),
    "unknown-algorithm": (lambda c: _set(c, "compression.quantization.name", "nvfp4"),
                          ["'compression.quantization.name'", "nvfp4", "fp8_blockwise, fp8_dynamic, fp8_static, "
                           "int4_awq, int4_gptq, int4_rtn, int8_dynamic"]),
    "bits-4-with-fp8": (lambda c: _set(c, "compression.quantization.bits", 4),
                        ["'compression.quantization.bits'", "fp8_dynamic", "bits: 8"]),
    "per-channel-with-fp8-format": (
        lambda c: _set(c, "compression.quantization.quant_method.weight", "per-channel"),
        ["per-channel", "compression.quantization.save_name", "compressed-tensors"]),
    "per-token-with-fp8-format": (
        lambda c: _set(c, "compression.quantization.quant_method.activation", "per-token"),
        ["per-token", "compression.quantization.save_name", "compressed-tensors"]),
    "per-token-with-static": (
        lambda c: _set(_set(_static(c), "compression.quantization.quant_method.activation", "per-token"),
                       "compression.quantization.save_name", "compressed-tensors"),
        ["'compression.quantization.quant_method.activation'", "per-token", "per-tensor"]),
    "unknown-weight-granularity": (
        lambda c: _set(c, "compression.quantization.quant_method.weight", "per-group"),
        ["'compression.quantization.quant_method.weight'", "per-group", "per-tensor, per-channel"]),
    "unknown-save-name": (lambda c: _set(c, "compression.quantization.save_name", "gguf"),
                          ["'compression.quantization.save_name'", "gguf", "compressed-tensors, fp8"]),
    "bad-device": (lambda c: _set(c, "global.device", "gpu0"),
                   ["'global.device'", "gpu0", "auto, cpu, cuda, cuda:N"]),
    "bad-size": (lambda c: _set(c, "global.max_gpu_memory", "8 gigs"),
                 ["global.max_gpu_memory", "8 gigs", "8GiB"]),
    "negative-size": (lambda c: _set(c, "global.max_cpu_memory", "-4GiB"),
                      ["global.max_cpu_memory", "-4GiB", "8GiB"]),
    "bad-hidden-cache": (lambda c: _set(c, "compression.quantization.hidden_cache", "ram"),
                         ["'compression.quantization.hidden_cache'", "auto, device, host, disk"]),
    "bad-regex": (lambda c: _set(c, "compression.quantization.ignore_layers", ["lm_head", "re:model.(layers"]),
                  ["'compression.quantization.ignore_layers'", "re:model.(layers", "regular expression"]),
    "bad-dataset-name": (lambda c: _set(_static(c), "dataset.name", "HFDataset"),
                         ["'dataset.name'", "HFDataset", "TextDataset, RandomTokens"]),
    "static-without-dataset": (lambda c: _set(c, "compression.quantization.name", "fp8_static"),
                               ["fp8_static", "'dataset'"]),
    "missing-model-path": (lambda c: c["model"].pop("model_path") and c, ["'model.model_path'", "missing"]),
    "bad-compression-name": (lambda c: _set(c, "compression.name", "QAT"),
                             ["'compression.name'", "QAT", "quantization, PTQ"]),
}


@pytest.fixture
def base(tmp_path) -> dict:
    # The model path need not exist: validation happens before anything is read.
    return make_config(tmp_path / "no-model-here", tmp_path / "out")


def _run_cli(capsys, args) -> tuple[int, list[str]]:
    rc = cli_main(args)
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exit_2_one_line(base, tmp_path, capsys, case):
    edit, needles = BAD[case]
    cfg = edit(copy.deepcopy(base))
    path = write_yaml(tmp_path / "job.yaml", cfg)
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(path), "-q"])
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("streamq: error: "), lines
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError) as info:  # the same through the API
        parse_config(edit(copy.deepcopy(base)), "api")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("flag,value,needles", [
    ("--device", "gpu", ["global.device", "auto, cpu, cuda, cuda:N"]),
    ("--device", "cuda:x", ["global.device", "auto, cpu, cuda, cuda:N"]),
    ("--max-gpu-memory", "lots", ["--max-gpu-memory", "lots", "8GiB"]),
    ("--max-cpu-memory", "12 parsecs", ["--max-cpu-memory", "8GiB"]),
])
def test_bad_cli_override_exit_2(base, tmp_path, capsys, flag, value, needles):
    path = write_yaml(tmp_path / "job.yaml", base)
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(path), "-q", flag, value])
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("streamq: error: "), lines
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def test_config_file_not_found(tmp_path, capsys):
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(tmp_path / "nope.yaml")])
    assert rc == 2 and len(lines) == 1 and "nope.yaml" in lines[0], lines


def test_invalid_yaml(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("global:\n  save_path: [unclosed\n")
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(path)])
    assert rc == 2 and lines and lines[0].startswith("streamq: error: ") and "broken.yaml" in lines[0], lines


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda(tiny_models, tmp_path, capsys):
    cfg = make_config(tiny_models["llama"], tmp_path / "out", device="cuda")
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(write_yaml(tmp_path / "j.yaml", cfg)), "-q"])
    assert rc == 2 and len(lines) == 1 and "global.device" in lines[0] and "CUDA" in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_cli_overrides_win(tiny_models, tmp_path, capsys):
    file_out = tmp_path / "from-file"
    cfg = make_config(tmp_path / "model-from-file", file_out, device="cuda:7")
    path = write_yaml(tmp_path / "job.yaml", cfg)
    cli_out = tmp_path / "from-cli"
    overrides = {"model_path": str(tiny_models["llama"]), "save_path": str(cli_out), "device": "cpu"}
    job = load_config(path, overrides)
    assert (job.model.model_path, job.save_path, job.device) == (overrides["model_path"], str(cli_out), "cpu")
    assert load_config(path, {"model_path": None}).device == "cuda:7"  # None means "not given"

    rc = cli_main(["quantize", "-c", str(path), "-q", "--model-path", str(tiny_models["llama"]),
                   "--save-path", str(cli_out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (cli_out / "config.json").is_file() and not file_out.exists()
    assert f"wrote {cli_out}" in captured.out


def test_shipped_configs_exist():
    names = {p.relative_to(REPO).as_posix() for p in SHIPPED}
    assert {"configs/examples/tiny_qwen3_moe_fp8_dynamic.yaml", "configs/examples/tiny_qwen3_moe_fp8_static.yaml",
            "configs/qwen3/fp8_static/qwen3-a22b_fp8_static_low_memory.yaml"} <= names, names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO).as_posix())
def test_shipped_config_parses(path):
    job = load_config(path)
    assert job.quant.bits == (4 if job.quant.name.startswith("int4") else 8)
    # (weight granularity, output format) each shipped algorithm is configured with
    expected = {"fp8_dynamic": ("per-tensor", "fp8"), "fp8_static": ("per-tensor", "fp8"),
                "int8_dynamic": ("per-channel", "compressed-tensors"), "fp8_blockwise": ("per-block", "fp8"),
                "int4_gptq": ("per-group", "compressed-tensors")}
    assert job.quant.name in expected, job.quant.name
    assert (job.quant.weight, job.format.save_name) == expected[job.quant.name]
    assert job.quant.ignore_layers[0] == "lm_head"
    assert (job.dataset is not None) == job.scheme.needs_calibration
    if job.quant.name == "fp8_blockwise":  # AngelSlim's shape: PTQWeightOnly, save_name fp8_blockwise, num_workers
        assert job.quant.save_name == "fp8_blockwise" and job.scheme.block_rows == job.scheme.block_cols == 128
        assert any(n.startswith("compression.quantization.quant_method.num_workers") for n in job.notes), job.notes
    raw = __import__("yaml").safe_load(path.read_text())
    noted = [k for k in NOTED_KEYS if k.split(".")[1] in raw.get(k.split(".")[0], {})]
    for key in noted:  # AngelSlim keys streamq has no use for: a note each, never an error
        assert any(note.startswith(key) for note in job.notes), (key, job.notes)
    if path.parts[-3] in ("qwen2_5", "qwen3"):
        assert {"model.device_map", "model.low_cpu_mem_usage", "model.use_cache"} <= set(noted)
        assert job.model.trust_remote_code is True


def test_a22b_config_values():
    job = load_config(REPO / "configs/qwen3/fp8_static/qwen3-a22b_fp8_static_low_memory.yaml")
    assert job.quant.name == "fp8_static" and job.quant.activation == "per-tensor"
    assert job.quant.ignore_layers == ["lm_head", "model.embed_tokens"]
    assert job.model.model_path == "Qwen/Qwen3-235B-A22B" and job.save_path == "./output"
    d = job.dataset
    assert (d.name, d.max_seq_length, d.num_samples, d.batch_size) == ("TextDataset", 4096, 256, 1)


def test_noted_keys_logged_not_errors(tmp_path, capsys, caplog):
    """A shipped AngelSlim config gets past validation (exit 1 for the missing model, not 2)."""
    path = REPO / "configs/qwen2_5/fp8_dynamic/qwen2_5-7b_instruct_fp8_dynamic.yaml"
    with caplog.at_level(logging.INFO, logger="streamq"):
        rc, lines = _run_cli(capsys, ["quantize", "-c", str(path), "-q", "--model-path", str(tmp_path / "absent"),
                                      "--save-path", str(tmp_path / "out")])
    assert rc == 1 and "absent" in lines[-1], lines
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("note: ")]
    for key in ("model.device_map", "model.low_cpu_mem_usage", "model.use_cache"):
        assert any(key in n for n in notes), notes
    assert not (tmp_path / "out").exists()


def test_example_config_runs(tiny_models, tmp_path, capsys, monkeypatch):
    """The shipped dynamic example end to end (the static one is `make demo`'s job; it parses above)."""
    monkeypatch.chdir(REPO)  # relative paths in a config are relative to where streamq runs
    out = tmp_path / "out"
    rc = cli_main(["quantize", "-c", "configs/examples/tiny_qwen3_moe_fp8_dynamic.yaml", "-q", "--device", "cpu",
                   "--model-path", str(tiny_models["qwen3_moe"]), "--save-path", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert (out / "config.json").is_file()


def test_ignore_entry_matching_nothing_warns(tiny_models, tmp_path, caplog):
    from streamq.engine.job import prepare

    cfg = make_config(tiny_models["qwen3"], tmp_path / "out",
                      ignore_layers=["lm_head", "model.embed_tokens", "self_attn.qq_proj", "re:.*nothing_here"])
    with caplog.at_level(logging.WARNING, logger="streamq"):
        prepare(parse_config(cfg))
    warned = [r.getMessage() for r in caplog.records if "matches no module" in r.getMessage()]
    assert len(warned) == 2, warned
    assert "self_attn.qq_proj" in warned[0] and "re:.*nothing_here" in warned[1]


def test_group_size_that_does_not_divide_a_weight_is_refused_before_output(tiny_models, tmp_path, capsys):
    cfg = make_config(tiny_models["qwen3"], tmp_path / "out")
    cfg["compression"]["quantization"] = {"name": "int4_rtn", "bits": 4,
                                          "quant_method": {"weight": "per-group", "group_size": 48}}
    rc, lines = _run_cli(capsys, ["quantize", "-c", str(write_yaml(tmp_path / "job.yaml", cfg)), "-q"])
    assert rc == 2, lines
    assert "group_size" in lines[-1] and "input columns" in lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("arch", "ignore", "refused"), [
    ("qwen3_moe", ["model.layers.0.mlp.experts.3.down_proj"], "the experts of 'model.layers.0.mlp.experts'"),
    ("qwen3_moe", ["re:model\\.layers\\.1\\.mlp\\.experts\\.\\d+\\.down_proj"],
     "the experts of 'model.layers.1.mlp.experts'"),
    ("qwen3", ["model.layers.0.self_attn.k_proj"], "'model.layers.0.self_attn.q_proj/k_proj/v_proj'"),
    ("qwen3", ["up_proj"], "entry 'up_proj' leaves 'model.layers.0.mlp.up_proj'"),  # a leaf: every layer
    ("qwen3_moe", ["re:model\\.layers\\.0\\.mlp\\.experts\\..*"], None),
    ("qwen3", ["re:model\\.layers\\.0\\.self_attn\\.[qkv]_proj", "model.layers.1.mlp"], None),
])
def test_ignore_layers_must_treat_what_vllm_fuses_alike(tiny_models, tmp_path, arch, ignore, refused):
    """vLLM loads q/k/v and gate/up as one Linear and a layer's experts as one module, each with
    one scheme, and refuses a checkpoint that quantizes only some of their members: such an
    ignore_layers is refused before anything is written (it crashed GPTQ's expert chunks with a
    KeyError), naming the key and both kinds of member; ignoring all of them, or none, runs."""
    from streamq.engine.job import prepare

    cfg = make_config(tiny_models[arch], tmp_path / "out", ignore_layers=["lm_head", *ignore])
    if refused is None:
        job = prepare(parse_config(cfg, "job.yaml"))
        ignored = {m for lay in job.layouts for m in lay.ignored}
        quantized = {m for lay in job.layouts for m in lay.quantized}
        whole = [r"model\.layers\.0\.mlp\.experts\..*"] if arch == "qwen3_moe" else \
            [r"model\.layers\.0\.self_attn\.[qkv]_proj", r"model\.layers\.1\.mlp\..*_proj"]
        for pattern in whole:  # each group ignored whole, and nothing beside it
            members = {m for m in ignored | quantized if re.fullmatch(pattern, m)}
            assert len(members) >= 2 and members <= ignored, (pattern, members - ignored)
        assert "model.layers.0.self_attn.o_proj" in quantized
        return
    with pytest.raises(ConfigError, match="compression.quantization.ignore_layers entry") as e:
        prepare(parse_config(cfg, "job.yaml"))
    assert refused in str(e.value) and "ignore all" in str(e.value), str(e.value)
