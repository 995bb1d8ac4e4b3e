"""`streamq eval` beyond per-tensor FP8: W8A8 INT8, block FP8 and W4A16 checkpoints.

Each quantized Linear is checked against a float64 reference written here from the format's
definition (not from the module's code); the INT4 unpacking against the `compressed-tensors`
package; the MoE experts module against the per-token definition of top-k routing; and the
whole path end to end on the trained fixtures: quantized by streamq (int8_dynamic as
compressed-tensors int-quantized, fp8_blockwise as vLLM fp8 and compressed-tensors block,
int4_rtn as pack-quantized, GPTQ and AWQ layouts), and packed by the compressed-tensors
package (W4A16, evaluated against the same weights dequantized into a plain bf16 checkpoint).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_config, run_job
from safetensors.torch import load_file, save_file

from streamq.errors import CheckpointError
from streamq.eval import dequant
from streamq.eval import fp8_linear as F
from streamq.eval import quant_linear as Q
from streamq.eval.runner import EvalOptions, evaluate

TRAINED = Path(__file__).resolve().parent / "fixtures" / "trained"
EVAL = TRAINED / "eval.jsonl"
SAMPLES, SEQ = 6, 128


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ INT8


def _int8_reference(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, per_token: bool) -> torch.Tensor:
    """W8A8 INT8 by definition, in float64: symmetric scale absmax / 127, round half to even, clamp."""
    x64 = x.double()
    absmax = x64.abs().amax(dim=-1, keepdim=True) if per_token else x64.abs().amax()
    # The scale itself is a float32 value (computed in float32 by every implementation).
    sx = (absmax.float() / 127).double()
    xq = torch.round(x64 / sx).clamp(-127, 127)
    return (xq * sx) @ (wq.double() * w_scale.double().reshape(-1, 1)).t()


def _int8_linear(w: torch.Tensor, mode: str, bias: torch.Tensor | None = None) -> Q.Int8Linear:
    scale = (w.abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=1e-12)
    lin = Q.Int8Linear(w.shape[1], w.shape[0], tuple(scale.shape), mode,
                       bias_dtype=bias.dtype if bias is not None else None)
    lin.weight.copy_(torch.round(w.float() / scale).clamp(-127, 127).to(torch.int8))
    lin.weight_scale.copy_(scale)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


@pytest.mark.parametrize("mode", [F.DYNAMIC_TOKEN, F.DYNAMIC_TENSOR])
def test_int8_linear_matches_float64_reference(mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 96, generator=g) * torch.linspace(0.1, 4, 96)  # some columns larger
    w = torch.randn(40, 96, generator=g) * 0.05
    lin = _int8_linear(w, mode)
    expected = _int8_reference(x.reshape(-1, 96), lin.weight, lin.weight_scale, mode == F.DYNAMIC_TOKEN)
    out = lin(x)
    assert out.shape == (2, 19, 40) and out.dtype == torch.float32
    # Exact integer accumulation: only the float32 scales and epilogue round (a few ulps).
    torch.testing.assert_close(out.reshape(-1, 40).double(), expected, rtol=1e-6, atol=1e-9)
    # bf16 in and out: one more rounding of the same values.
    lin_b = _int8_linear(w, mode, bias=torch.randn(40, generator=g).bfloat16())
    out_b = lin_b(x.bfloat16()).double().reshape(-1, 40)
    expected_b = _int8_reference(x.bfloat16().reshape(-1, 96), lin_b.weight, lin_b.weight_scale,
                                 mode == F.DYNAMIC_TOKEN) + lin_b.bias.double()
    torch.testing.assert_close(out_b, expected_b, rtol=2**-7, atol=1e-2)


def test_int8_activation_rounds_half_to_even_and_clamps():
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -126.5], [0.0, 0.0, 0.0, 0.0, 0.0]])
    xq, sx = Q.quantize_int8_activation(x, F.DYNAMIC_TOKEN, None)
    assert xq.tolist() == [[127, 2, -4, 0, -126], [0, 0, 0, 0, 0]]
    assert sx[0, 0] == 1.0 and 0 < sx[1, 0] < 1e-9  # an all-zero token gets a tiny positive scale


@pytest.mark.parametrize("k", [64, 1040, 1048, 4096])
def test_int8_product_is_exact(k):
    """The simulation (float32 while exact, float64 beyond) equals int32 accumulation bit for bit,
    at the worst case (every product 127 * 127 or -127 * 127)."""
    g = torch.Generator().manual_seed(k)
    xq = torch.randint(-127, 128, (24, k), generator=g, dtype=torch.int8)
    xq[0] = 127
    wq = torch.randint(-127, 128, (16, k), generator=g, dtype=torch.int8)
    wq[0], wq[1] = 127, -127
    exact = xq.long() @ wq.long().t()
    sim = Q.int8_product(xq, wq, use_int_mm=False)
    assert sim.dtype == (torch.float32 if k * 127**2 <= 2**24 else torch.float64)
    assert torch.equal(sim.long(), exact)
    assert exact[0, 0] == k * 127**2
    if hasattr(torch, "_int_mm"):
        try:
            real = torch._int_mm(xq, wq.t())
        except RuntimeError:  # no CPU kernel in this torch build
            return
        assert torch.equal(real.long(), exact)


# ------------------------------------------------------------------ block FP8


def _block_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight in blocks (reference for the test, float64 block absmax)."""
    r, c = block
    out_f, in_f = w.shape
    rb, cb = -(-out_f // r), -(-in_f // c)
    scale = torch.empty(rb, cb)
    for i in range(rb):
        for j in range(cb):
            scale[i, j] = w[i * r:(i + 1) * r, j * c:(j + 1) * c].abs().amax().float() / 448
    full = scale.repeat_interleave(r, 0).repeat_interleave(c, 1)[:out_f, :in_f]
    return (w.float() / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def _block_fp8_reference(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
                         ) -> torch.Tensor:
    """Inputs per token in groups of `cols` (scale = group absmax / 448), weights per block; float64."""
    r, c = block
    m, k = x.shape
    xd = torch.empty(m, k, dtype=torch.float64)
    for j in range(0, k, c):
        part = x[:, j:j + c].float()
        s = part.abs().amax(dim=1, keepdim=True).clamp(min=1e-10) / 448
        xd[:, j:j + c] = (part / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s.double()
    wd = wq.double() * scale.double().repeat_interleave(r, 0).repeat_interleave(c, 1)[: wq.shape[0], :k]
    return xd @ wd.t()


@pytest.mark.parametrize("shape,block,scale_name", [((150, 200), (128, 128), "weight_scale_inv"),
                                                    ((64, 96), (32, 32), "weight_scale")])
def test_block_fp8_linear_matches_float64_reference(shape, block, scale_name):
    g = torch.Generator().manual_seed(1)
    out_f, in_f = shape
    x = torch.randn(37, in_f, generator=g) * torch.linspace(0.1, 8, in_f)
    x[3] = 0.0  # an all-zero token
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    w[:, :16] *= 20  # one block much larger than the others
    wq, scale = _block_fp8(w, block)
    lin = Q.BlockFP8Linear(in_f, out_f, block, Q.DYNAMIC_GROUP, scale_name)
    assert dict(lin.named_buffers()).keys() == {"weight", scale_name}
    lin.weight.copy_(wq)
    getattr(lin, scale_name).copy_(scale)
    expected = _block_fp8_reference(x, wq, scale, block)
    out = lin(x)
    # Products of FP8 values are exact in float32; only the float32 accumulation rounds.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert (out[3] == 0).all()
    # Weight-only (no activation quantization): the dequantized weight, float32 matmul.
    lin_w = Q.BlockFP8Linear(in_f, out_f, block, F.WEIGHT_ONLY, scale_name)
    lin_w.load_state_dict(lin.state_dict())
    torch.testing.assert_close(lin_w(x).double(), x.double() @ dequant.dequantize_fp8_blocks(wq, scale, *block)
                               .double().t(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ W4A16


def test_int4_unpacking_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    g = torch.Generator().manual_seed(2)
    out_f, in_f, gs = 20, 72, 24  # out not a multiple of 8 (zero points pad), in not of 32
    codes = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    codes[0, :8] = torch.tensor([-8, 7, -1, 0, 1, -8, 7, 7], dtype=torch.int8)  # extremes, sign bit of a word
    zp = torch.randint(-8, 8, (out_f, in_f // gs), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, in_f // gs, generator=g) * 0.1 + 0.01).bfloat16()
    packed, packed_zp = pack_to_int32(codes, 4), pack_to_int32(zp, 4, packed_dim=0)
    assert packed.shape == (out_f, 9) and packed_zp.shape == (3, in_f // gs)
    assert torch.equal(dequant.unpack_int4(packed, in_f), codes)
    assert torch.equal(dequant.unpack_int4_rows(packed_zp, out_f), zp)
    # Element i of a row in word i // 8 at bits 4 * (i % 8), stored as code + 8.
    assert int(packed[0, 0]) & 0xF == 0 and (int(packed[0, 0]) >> 4) & 0xF == 15
    for symmetric in (True, False):
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=gs))
        tensors = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([out_f, in_f])}
        if not symmetric:
            tensors["weight_zero_point"] = packed_zp
        theirs = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
        ours = dequant.dequantize_int4(packed, scale, in_f, gs, None if symmetric else packed_zp)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        assert torch.equal(ours, theirs), (ct.__version__, symmetric)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_w4a16_linear_matches_float64_reference(asymmetric):
    g = torch.Generator().manual_seed(3)
    out_f, in_f, gs = 24, 64, 16
    codes = torch.randint(-8, 8, (out_f, in_f), generator=g)
    zp = torch.randint(-8, 8, (out_f, in_f // gs), generator=g) if asymmetric else torch.zeros(out_f, in_f // gs)
    scale = torch.rand(out_f, in_f // gs, generator=g) * 0.1 + 0.01
    # Pack by the format's definition, independently of the code under test.
    nib = (codes + 8).long()
    words = sum(nib[:, i::8] << (4 * i) for i in range(8))
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zp_nib = (zp.long() + 8).t()
    zp_words = sum(zp_nib[:, i::8] << (4 * i) for i in range(8)).t()
    lin = Q.W4A16Linear(in_f, out_f, gs, torch.float32, asymmetric)
    lin.weight_packed.copy_(packed)
    lin.weight_scale.copy_(scale)
    lin.weight_shape.copy_(torch.tensor([out_f, in_f]))
    if asymmetric:
        lin.weight_zero_point.copy_(torch.where(zp_words >= 2**31, zp_words - 2**32, zp_words).to(torch.int32))
    w = (codes.double() - zp.double().repeat_interleave(gs, 1)) * scale.double().repeat_interleave(gs, 1)
    x = torch.randn(2, 11, in_f, generator=g)
    torch.testing.assert_close(lin(x).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)
    lin.weight_shape.copy_(torch.tensor([out_f, in_f + 1]))
    lin._shape_checked = False
    with pytest.raises(ValueError, match="weight_shape"):
        lin(x)


# ------------------------------------------------------------------ MoE experts


def _experts(kind: str, num_experts: int, hidden: int, inter: int, g) -> F.FP8Experts:
    def linear(out_f, in_f):
        w = torch.randn(out_f, in_f, generator=g) * 0.1
        if kind == "int8":
            return _int8_linear(w, F.DYNAMIC_TOKEN)
        wq, scale = _block_fp8(w, (32, 32))
        lin = Q.BlockFP8Linear(in_f, out_f, (32, 32), Q.DYNAMIC_GROUP)
        lin.weight.copy_(wq)
        lin.weight_scale_inv.copy_(scale)
        return lin

    experts = [F.Expert(linear(inter, hidden), linear(inter, hidden), linear(hidden, inter))
               for _ in range(num_experts)]
    mode = F.DYNAMIC_TOKEN if kind == "int8" else Q.DYNAMIC_GROUP
    return F.FP8Experts(experts, torch.nn.SiLU(), mode)


@pytest.mark.parametrize("kind", ["int8", "fp8-block"])
def test_experts_route_every_token_through_its_experts(kind):
    """Top-k routing by definition: each token alone through each of its experts, weighted and summed."""
    g = torch.Generator().manual_seed(4)
    num_experts, hidden, inter, tokens, top_k = 6, 64, 48, 29, 2
    module = _experts(kind, num_experts, hidden, inter, g)
    x = torch.randn(tokens, hidden, generator=g)
    index = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    index[0] = torch.tensor([0, 5])
    weights = torch.rand(tokens, top_k, generator=g)
    out = module(x, index, weights)
    expected = torch.zeros(tokens, hidden, dtype=torch.float64)
    for t in range(tokens):
        for j in range(top_k):
            ex = module.expert(int(index[t, j]))
            row = x[t:t + 1]
            y = ex.down_proj(torch.nn.functional.silu(ex.gate_proj(row)) * ex.up_proj(row))
            expected[t] += weights[t, j].double() * y[0].double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ end to end


def _quantize(tmp_path: Path, arch: str, algorithm: str, save_name: str) -> Path:
    out = tmp_path / f"{arch}-{algorithm}-{save_name}"
    cfg = make_config(TRAINED / arch, out, algorithm=algorithm, save_name=save_name)
    q = cfg["compression"]["quantization"]
    if algorithm == "int8_dynamic":
        q["quant_method"] = {}
        del q["save_name"]  # its default: compressed-tensors int-quantized
    else:
        q["quant_method"] = {"weight": "per-block", "activation": "per-token"}
    run_job(cfg)
    return out


def _eval(arch: str, quantized: Path):
    return evaluate(EvalOptions(str(TRAINED / arch), str(quantized), str(EVAL), num_samples=SAMPLES,
                                max_seq_length=SEQ, device="cpu"))


@pytest.mark.parametrize("arch,algorithm,save_name,described", [
    ("dense", "int8_dynamic", None, "compressed-tensors, INT8 weights, activations dynamic-token"),
    ("moe", "int8_dynamic", None, "compressed-tensors, INT8 weights, activations dynamic-token"),
    ("dense", "fp8_blockwise", "fp8", "fp8, FP8 weights in 128x128 blocks, activations dynamic-token-group"),
    ("moe", "fp8_blockwise", "compressed-tensors",
     "compressed-tensors, FP8 weights in 128x128 blocks, activations dynamic-token-group"),
])
def test_streamq_checkpoints_evaluate(tmp_path, arch, algorithm, save_name, described):
    out = _quantize(tmp_path, arch, algorithm, save_name)
    report = _eval(arch, out)
    assert report.quant_format == described, report.table()
    assert not report.scaled_mm
    assert report.matmul in ("simulated INT8 matmuls (exact)", "simulated block-FP8 matmuls"), report.matmul
    assert abs(report.ppl_change) < 0.01 and 0 < report.kl < 0.005 and report.top1_agreement > 0.93, report.table()
    assert not report.outliers and all(0 < r.rel_error < 0.05 for r in report.layers), report.table()
    if algorithm == "int8_dynamic":
        return
    # A block scale 16x too large in one layer is found and named.
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    scale = "weight_scale_inv" if save_name == "fp8" else "weight_scale"
    file = out / index[f"model.layers.1.self_attn.o_proj.{scale}"]
    tensors = load_file(file)
    tensors = {n: t * 16 if n.startswith("model.layers.1.") and n.endswith(scale) else t for n, t in tensors.items()}
    save_file(tensors, file, metadata={"format": "pt"})
    broken = _eval(arch, out)
    assert [o.layer for o in broken.outliers] == [1], broken.table()


@pytest.fixture(scope="module")
def int8_dense(tmp_path_factory) -> Path:
    return _quantize(tmp_path_factory.mktemp("int8"), "dense", "int8_dynamic", None)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(path: Path, fn) -> None:
    """Rewrite the shard holding layer 0's q_proj with `fn(tensors)`, and the index to match."""
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    old = load_file(path / name)
    tensors = fn(old)
    save_file(tensors, path / name, metadata={"format": "pt"})
    for n in set(old) - set(tensors):
        del index["weight_map"][n]
    index_path.write_text(json.dumps(index))


def test_malformed_int8_checkpoints_are_named(int8_dense, tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    bad = _copy(int8_dense, tmp_path / "no-scale")
    _edit(bad, lambda t: {n: v for n, v in t.items() if n != f"{q}.weight_scale"})
    with pytest.raises(CheckpointError, match=f"'{q}.weight' is I8 but '{q}.weight_scale' is missing"):
        _eval("dense", bad)
    bad = _copy(int8_dense, tmp_path / "scale-shape")
    _edit(bad, lambda t: t | {f"{q}.weight_scale": t[f"{q}.weight_scale"][:1]})
    with pytest.raises(CheckpointError, match=rf"'{q}.weight_scale' has shape \[1, 1\], expected \[128, 1\]"):
        _eval("dense", bad)
    bad = _copy(int8_dense, tmp_path / "bad-config")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["format"] = "mystery-quantized"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: quantization_config.format is 'mystery-quantized'"):
        _eval("dense", bad)
    del config["quantization_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has quantized tensors .* no quantization_config"):
        _eval("dense", bad)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [8, 300])
def test_int_mm_equals_the_simulation_bit_for_bit(m):
    """INT8 on CUDA (torch._int_mm where the shape allows it) gives the same bits as on the CPU."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(m, 512, generator=g) * 3).bfloat16()
    w = torch.randn(256, 512, generator=g) * 0.05
    cpu = _int8_linear(w, F.DYNAMIC_TOKEN, bias=torch.randn(256, generator=g).bfloat16())
    gpu = _int8_linear(w, F.DYNAMIC_TOKEN, bias=cpu.bias).to("cuda")
    Q.enable_fast_matmuls(gpu, torch.device("cuda"))
    assert gpu.use_int_mm
    assert torch.equal(gpu(x.cuda()).cpu(), cpu(x))
    xq, sx = Q.quantize_int8_activation(x.cuda(), F.DYNAMIC_TOKEN, None)
    assert torch.equal(Q.int8_product(xq, gpu.weight, True).cpu().long(),
                       Q.int8_product(xq.cpu(), cpu.weight, False).long())


# ------------------------------------------------------------------ W4A16 end to end

W4_GROUP = 32
W4_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _w4_config(symmetric: bool) -> dict:
    args = {"num_bits": 4, "type": "int", "symmetric": symmetric, "dynamic": False, "strategy": "group",
            "group_size": W4_GROUP, "block_structure": None, "actorder": None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": args, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}, "global_compression_ratio": None}


def _w4_rtn(w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest int4 in groups (test data only): codes [-8, 7], scale [out, G] bf16, zero points."""
    g = w.float().reshape(w.shape[0], -1, W4_GROUP)
    if symmetric:
        scale = (g.abs().amax(-1, keepdim=True) / 7.5).clamp(min=1e-8).bfloat16().float()
        codes, zp = torch.round(g / scale).clamp(-8, 7), None
    else:
        lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).bfloat16().float()
        zp = (torch.round(-lo / scale) - 8).clamp(-8, 7)
        codes = (torch.round(g / scale) + zp).clamp(-8, 7)
    return (codes.reshape(w.shape).to(torch.int8), scale[..., 0].bfloat16(),
            None if zp is None else zp[..., 0].to(torch.int8))


def _write_w4(src: Path, dst: Path, symmetric: bool, dequantized: bool) -> Path:
    """The trained model as compressed-tensors pack-quantized W4A16 (packed by the compressed-tensors
    package), or (`dequantized`) as a plain bf16 checkpoint holding the dequantized weights."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if not (name.startswith("model.layers.") and module.rsplit(".", 1)[-1] in W4_MODULES):
            out[name] = t
            continue
        codes, scale, zp = _w4_rtn(t, symmetric)
        if dequantized:
            z = 0 if zp is None else zp.float().repeat_interleave(W4_GROUP, 1)
            out[name] = ((codes.float() - z) * scale.float().repeat_interleave(W4_GROUP, 1)).bfloat16()
            continue
        out[f"{module}.weight_packed"] = pack_to_int32(codes, 4)
        out[f"{module}.weight_scale"] = scale
        out[f"{module}.weight_shape"] = torch.tensor(list(t.shape), dtype=torch.int64)
        if zp is not None:
            out[f"{module}.weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    if not dequantized:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = _w4_config(symmetric)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("arch,symmetric", [("moe", False)])  # symmetric dense: test_streamq_int4_rtn_...
def test_w4a16_checkpoint_evaluates_as_its_dequantized_weights(tmp_path, arch, symmetric):
    pytest.importorskip("compressed_tensors")
    packed = _write_w4(TRAINED / arch, tmp_path / "w4", symmetric, dequantized=False)
    plain = _write_w4(TRAINED / arch, tmp_path / "w4-dequantized", symmetric, dequantized=True)
    report, reference = _eval(arch, packed), _eval(arch, plain)
    kind = f"INT4 weights ({'symmetric' if symmetric else 'asymmetric'}, groups of {W4_GROUP})"
    assert report.quant_format == f"compressed-tensors, {kind}, activations none", report.quant_format
    assert report.matmul == "dequantized INT4 weights, matmul in the model dtype"
    # The same bf16 weights through the same matmul: the same model.
    assert report.ppl_quantized == pytest.approx(reference.ppl_quantized, rel=1e-6)
    assert report.kl == pytest.approx(reference.kl, rel=1e-3, abs=1e-7)
    assert [r.rel_error for r in report.layers] == pytest.approx([r.rel_error for r in reference.layers], rel=1e-3)
    assert 0 < report.kl < 0.1 and abs(report.ppl_change) < 0.05, report.table()


@pytest.mark.parametrize("arch", ["dense", "moe"])
def test_streamq_int4_rtn_checkpoint_evaluates(tmp_path, arch):
    out = tmp_path / f"{arch}-int4"
    cfg = make_config(TRAINED / arch, out, algorithm="int4_rtn")
    q = cfg["compression"]["quantization"]
    q.update(bits=4, quant_method={"weight": "per-group", "group_size": 64}, sym=arch == "dense")
    del q["save_name"]  # its default: compressed-tensors pack-quantized
    run_job(cfg)
    report = _eval(arch, out)
    kind = f"INT4 weights ({'symmetric' if arch == 'dense' else 'asymmetric'}, groups of 64)"
    assert report.quant_format == f"compressed-tensors, {kind}, activations none", report.quant_format
    assert 0 < report.kl < 0.1 and abs(report.ppl_change) < 0.05 and report.top1_agreement > 0.8, report.table()
    assert not report.outliers and all(0 < r.rel_error < 0.2 for r in report.layers), report.table()


def test_gptq_linear_matches_float64_reference():
    """GPTQ v1 by definition: q packed along the input, zero - 1 packed along the output, g_idx."""
    g = torch.Generator().manual_seed(6)
    out_f, in_f, groups = 16, 48, 3
    q = torch.randint(0, 16, (out_f, in_f), generator=g)
    zero = torch.randint(1, 16, (groups, out_f), generator=g)  # asymmetric too: v1 stores zero - 1
    scales = (torch.rand(groups, out_f, generator=g) * 0.1 + 0.01).half()
    g_idx = torch.randperm(in_f, generator=g) % groups  # act-order style: groups not in column order
    qweight = sum(q.t()[i::8] << (4 * i) for i in range(8))  # [in/8, out]
    qzeros = sum((zero - 1)[:, i::8] << (4 * i) for i in range(8))  # [G, out/8]
    lin = Q.GPTQLinear(in_f, out_f, groups, torch.float16)
    for name, value in (("qweight", qweight), ("qzeros", qzeros)):
        getattr(lin, name).copy_(torch.where(value >= 2**31, value - 2**32, value).to(torch.int32))
    lin.scales.copy_(scales)
    lin.g_idx.copy_(g_idx.to(torch.int32))
    w = (q.double() - zero.t().double()[:, g_idx]) * scales.t().double()[:, g_idx]
    x = torch.randn(5, in_f, generator=g)
    torch.testing.assert_close(lin(x).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)


def test_streamq_gptq_layout_evaluates(tmp_path):
    out = tmp_path / "dense-gptq"
    cfg = make_config(TRAINED / "dense", out, algorithm="int4_rtn", save_name="gptq")
    cfg["compression"]["quantization"].update(bits=4, quant_method={"weight": "per-group", "group_size": 64})
    run_job(cfg)
    report = _eval("dense", out)
    assert report.quant_format == "gptq, INT4 weights (symmetric, groups of 64), activations none", \
        report.quant_format
    assert 0 < report.kl < 0.1 and abs(report.ppl_change) < 0.05 and report.top1_agreement > 0.8, report.table()


def test_awq_linear_matches_float64_reference():
    """AutoAWQ GEMM by definition: packed along the output, output 8j + (0,2,4,6,1,3,5,7)[k] in nibble k."""
    g = torch.Generator().manual_seed(7)
    out_f, in_f, groups = 24, 32, 2
    q = torch.randint(0, 16, (in_f, out_f), generator=g)
    zero = torch.randint(0, 16, (groups, out_f), generator=g)
    scales = (torch.rand(groups, out_f, generator=g) * 0.1 + 0.01).half()
    order = (0, 2, 4, 6, 1, 3, 5, 7)

    def pack(v):
        words = sum(v.reshape(v.shape[0], -1, 8)[:, :, order[k]] << (4 * k) for k in range(8))
        return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)

    lin = Q.AWQLinear(in_f, out_f, groups, torch.float16)
    lin.qweight.copy_(pack(q))
    lin.qzeros.copy_(pack(zero))
    lin.scales.copy_(scales)
    rows = torch.arange(in_f) // (in_f // groups)
    w = ((q.double() - zero.double()[rows]) * scales.double()[rows]).t()  # [out, in]
    x = torch.randn(5, in_f, generator=g)
    torch.testing.assert_close(lin(x).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)


def test_streamq_awq_layout_evaluates(tmp_path):
    out = tmp_path / "moe-awq"
    cfg = make_config(TRAINED / "moe", out, algorithm="int4_rtn", save_name="awq")
    cfg["compression"]["quantization"].update(bits=4, quant_method={"weight": "per-group", "group_size": 64},
                                              sym=False)
    run_job(cfg)
    report = _eval("moe", out)
    assert report.quant_format == "awq, INT4 weights (asymmetric, groups of 64), activations none", \
        report.quant_format
    assert 0 < report.kl < 0.1 and abs(report.ppl_change) < 0.05 and report.top1_agreement > 0.8, report.table()
