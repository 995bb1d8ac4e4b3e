"""The eval loop: both models, one decoder layer of each in memory, on the same inputs.

For every layer, the original's hidden states (cached for all samples, as the quantize
engine caches calibration activations) go through the original layer and the quantized
layer: the relative difference of their outputs is that layer's own error, free of what
earlier layers did. Both streams are also propagated on their own (original -> original,
quantized -> quantized), so after the last layer the final norm and `lm_head` (materialized
only then) give the two models' real next-token distributions.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from streamq.calib.cache import HiddenStateCache
from streamq.checkpoint.reader import CheckpointReader
from streamq.config import DatasetConfig, ModelConfig, check_device
from streamq.errors import CheckpointError, DatasetError
from streamq.eval.pair import CheckpointPair, open_pair, swap_in_quantized
from streamq.eval.quant_linear import enable_fast_matmuls
from streamq.eval.report import DEFAULT_OUTLIER_FACTOR, DEFAULT_OUTLIER_FLOOR, EvalReport, LayerResult
from streamq.model import capture as capture_mod
from streamq.model.layer import materialize_layer, release_layer
from streamq.model.layout import LayerLayout
from streamq.model.skeleton import (
    build_skeleton,
    compute_dtype,
    decoder_layers,
    load_model_config,
    materialize_outside_layers,
)

log = logging.getLogger("streamq")
# The shipped calibration set: the default eval text when running from a checkout.
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "data" / "calib" / "tiny_chat.jsonl"
LOGITS_CHUNK = 2048  # positions per lm_head call: bounds the [chunk, vocab] float32 logits


@dataclass
class EvalOptions:
    original: str
    quantized: str
    data: str | None = None
    num_samples: int = 32
    max_seq_length: int = 512
    # 1 = each sample alone: no padding, and dynamic per-tensor scales come from one
    # request's tokens, as when an engine serves it alone.
    batch_size: int = 1
    device: str = "auto"
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR
    outlier_floor: float = DEFAULT_OUTLIER_FLOOR


class _RelError:
    """sqrt(sum ||q - o||^2 / sum ||o||^2) over real tokens, accumulated on the device."""

    def __init__(self) -> None:
        self.diff: torch.Tensor | float = 0.0
        self.ref: torch.Tensor | float = 0.0

    def add(self, q: torch.Tensor, o: torch.Tensor, mask: torch.Tensor) -> None:
        o32 = o.float()[mask]
        self.diff = self.diff + (q.float()[mask] - o32).pow(2).sum(dtype=torch.float64)
        self.ref = self.ref + o32.pow(2).sum(dtype=torch.float64)

    def value(self) -> float:
        ref = float(self.ref)
        return math.sqrt(float(self.diff) / ref) if ref > 0 else math.nan


def _tensor(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _load_batches(opts: EvalOptions, path: Path, hf_config) -> list:
    """Tokenized, padded eval batches: the quantize engine's own calibration loader."""
    from streamq.engine.job import load_calibration

    data = Path(opts.data) if opts.data else DEFAULT_DATA
    if not data.is_file():
        raise DatasetError(f"eval data not found: {data}" + ("" if opts.data else " (pass --data JSONL)"))
    # load_calibration reads only `dataset` and `model.trust_remote_code` from its job.
    job = SimpleNamespace(model=ModelConfig(model_path=str(path)),
                          dataset=DatasetConfig(name="TextDataset", data_path=str(data),
                                                max_seq_length=opts.max_seq_length, num_samples=opts.num_samples,
                                                batch_size=opts.batch_size))
    return load_calibration(job, path, hf_config)


def _capture_stem(skel: nn.Module, reader: CheckpointReader, batches: list, cache: HiddenStateCache,
                  device: torch.device) -> None:
    """Each model's own embedding gives its stream's layer-0 inputs; the embedding is freed after."""
    names = [n for n in reader.other if n.startswith("model.embed_tokens.")]
    materialize_outside_layers(skel, reader.read(names), device)
    capture_mod.capture_batches(skel, batches, cache, device)
    skel.model.embed_tokens.to("meta")


def _materialize_head(skel: nn.Module, reader: CheckpointReader, tied: bool, device: torch.device) -> None:
    """Final norm and lm_head (the embedding's weight when tied and not stored)."""
    materialize_outside_layers(skel, reader.read([n for n in reader.other if n.startswith("model.norm.")]), device)
    names = [n for n in reader.other if n.startswith("lm_head.")]
    if names:
        tensors = reader.read(names)
    elif tied:
        tensors = {"lm_head.weight": reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]}
    else:
        raise CheckpointError(f"{reader.path}: no lm_head.weight and tie_word_embeddings is false")
    materialize_layer(skel.lm_head, LayerLayout(index=-1, prefix="lm_head."), tensors, device)
    enable_fast_matmuls(skel.lm_head, device)


class _SideBySide:
    """Both streams' hidden-state caches and the layer kwargs (shared: same config, same masks)."""

    def __init__(self, pair: CheckpointPair, skel_o: nn.Module, skel_q: nn.Module, batches: list,
                 device: torch.device, dtype: torch.dtype, hidden_size: int):
        self.pair, self.skel_o, self.skel_q, self.batches, self.device = pair, skel_o, skel_q, batches, device
        location = "device" if device.type == "cpu" else "host"
        self.orig, self.quant = HiddenStateCache(location, device), HiddenStateCache(location, device)
        _capture_stem(skel_o, pair.original, batches, self.orig, device)
        _capture_stem(skel_q, pair.quantized, batches, self.quant, device)
        self.kwargs = capture_mod.LayerKwargs(skel_o, hidden_size, dtype, device)

    @torch.no_grad()
    def run_layer(self, i: int) -> LayerResult:
        prefix = f"{self.pair.original.layer_prefix}.{i}."
        lo, lq = decoder_layers(self.skel_o)[i], decoder_layers(self.skel_q)[i]
        materialize_layer(lo, LayerLayout(i, prefix), self.pair.original.read_layer(i, "cpu"), self.device)
        materialize_layer(lq, LayerLayout(i, prefix), self.pair.quantized.read_layer(i, "cpu"), self.device)
        enable_fast_matmuls(lq, self.device)
        layer_err, stream_err = _RelError(), _RelError()
        try:
            for b, batch in enumerate(self.batches):
                real = batch.attention_mask.to(self.device).bool()
                kwargs = self.kwargs.for_batch(b, batch.attention_mask)[i]
                h = self.orig.get(b)
                out_o = _tensor(lo(h, **kwargs))
                layer_err.add(_tensor(lq(h, **kwargs)), out_o, real)
                out_q = _tensor(lq(self.quant.get(b), **kwargs))
                stream_err.add(out_q, out_o, real)
                self.orig.put(b, out_o)
                self.quant.put(b, out_q)
        finally:
            release_layer(lo)
            release_layer(lq)
            self.orig.sync()
            self.quant.sync()
        return LayerResult(i, layer_err.value(), stream_err.value())

    @torch.no_grad()
    def logits_metrics(self, report: EvalReport) -> None:
        """Next-token NLL of both models, KL(original || quantized), top-1 agreement."""
        tied = bool(self.pair.config.get("tie_word_embeddings", False))
        _materialize_head(self.skel_o, self.pair.original, tied, self.device)
        _materialize_head(self.skel_q, self.pair.quantized, tied, self.device)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nll_o, nll_q, kl, agree
        count = 0
        for b, batch in enumerate(self.batches):
            mask = batch.attention_mask.to(self.device).bool()
            sel = mask[:, :-1] & mask[:, 1:]  # positions whose next token is real
            targets = batch.input_ids.to(self.device)[:, 1:][sel]
            ho, hq = self.orig.get(b)[:, :-1][sel], self.quant.get(b)[:, :-1][sel]
            for c in range(0, targets.numel(), LOGITS_CHUNK):
                rows = slice(c, c + LOGITS_CHUNK)
                lp_o = self._log_probs(self.skel_o, ho[rows])
                lp_q = self._log_probs(self.skel_q, hq[rows])
                t = targets[rows, None]
                sums += torch.stack([-lp_o.gather(1, t).sum(), -lp_q.gather(1, t).sum(),
                                     (lp_o.exp() * (lp_o - lp_q)).sum(),
                                     (lp_o.argmax(-1) == lp_q.argmax(-1)).sum()]).to(torch.float64)
            count += targets.numel()
        if count == 0:
            raise DatasetError("eval data gave no predicted tokens (every sample is a single token?)")
        nll_o, nll_q, kl, agree = (float(x) / count for x in sums)
        report.tokens, report.ppl_original, report.ppl_quantized = count, math.exp(nll_o), math.exp(nll_q)
        report.kl, report.top1_agreement = kl, agree

    @staticmethod
    def _log_probs(skel: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        # lm_head runs in the model's dtype, as when serving; the softmax in float32.
        return skel.lm_head(skel.model.norm(hidden)).float().log_softmax(dim=-1)

    def close(self) -> None:
        self.orig.close()
        self.quant.close()
        for skel in (self.skel_o, self.skel_q):
            skel.to("meta")


def evaluate(opts: EvalOptions) -> EvalReport:
    """Run the side-by-side evaluation; see the module docstring."""
    start = time.monotonic()
    pair = open_pair(opts.original, opts.quantized)
    check_device(opts.device, "--device")
    from streamq.engine.job import resolve_device

    device = resolve_device(opts.device)
    hf_config = load_model_config(pair.original.path)
    dtype = compute_dtype(hf_config, "auto")
    skel_o, skel_q = build_skeleton(hf_config, dtype), build_skeleton(hf_config, dtype)
    if len(decoder_layers(skel_o)) != pair.num_layers:
        raise CheckpointError(f"{pair.original.path}: config.json declares {len(decoder_layers(skel_o))} decoder "
                              f"layers, the safetensors hold {pair.num_layers}")
    swapped = swap_in_quantized(skel_q, "", pair)
    if swapped != len(pair.quantized_modules):
        raise CheckpointError(f"{pair.quantized.path}: {len(pair.quantized_modules)} quantized weights but only "
                              f"{swapped} belong to Linear layers or MoE experts eval can run")
    kind = pair.fmt.kind
    matmul = kind.matmul(device) if kind is not None and swapped else "no quantized Linears"
    batches = _load_batches(opts, pair.original.path, hf_config)
    report = EvalReport(original=str(pair.original.path), quantized=str(pair.quantized.path),
                        quant_format=pair.fmt.describe(), device=str(device),
                        scaled_mm=matmul in ("torch._scaled_mm", "torch._int_mm"), matmul=matmul,
                        samples=sum(b.input_ids.shape[0] for b in batches), tokens=0,
                        outlier_factor=opts.outlier_factor, outlier_floor=opts.outlier_floor)
    run = _SideBySide(pair, skel_o, skel_q, batches, device, dtype, hf_config.hidden_size)
    try:
        for i in range(pair.num_layers):
            t0 = time.monotonic()
            report.layers.append(run.run_layer(i))
            r = report.layers[-1]
            log.info("layer %d/%d: error %.4f, stream %.4f (%.1fs)", i + 1, pair.num_layers, r.rel_error,
                     r.stream_error, time.monotonic() - t0)
        run.logits_metrics(report)
    finally:
        run.close()
    report.wall_s = time.monotonic() - start
    return report
