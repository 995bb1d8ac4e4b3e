"""What eval found: per-layer errors, outlier layers, logits metrics; as a table, JSON or a plot."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from streamq.errors import ConfigError

DEFAULT_OUTLIER_FACTOR = 4.0
# Below this a layer is fine whatever its neighbours do: FP8 per-tensor layers sit around 0.01-0.05.
DEFAULT_OUTLIER_FLOOR = 0.05


@dataclass
class LayerResult:
    layer: int
    rel_error: float  # ||q(h) - o(h)|| / ||o(h)||, both layers fed the original's hidden states
    stream_error: float  # same ratio between the two propagated streams after this layer


@dataclass
class Outlier:
    layer: int
    rel_error: float
    ratio: float  # rel_error / median of the other layers' errors (inf if that median is 0)
    median: float

    def describe(self) -> str:
        if not math.isfinite(self.rel_error):
            return f"layer {self.layer}: relative error is {self.rel_error} (non-finite output)"
        times = "inf" if math.isinf(self.ratio) else f"{self.ratio:.0f}"
        return (f"layer {self.layer}: relative error {self.rel_error:.3g}, {times}x the median of the other "
                f"layers ({self.median:.3g})")


def find_outliers(errors: list[float], factor: float = DEFAULT_OUTLIER_FACTOR,
                  floor: float = DEFAULT_OUTLIER_FLOOR) -> list[Outlier]:
    """Layers whose error is non-finite, or above `floor` and `factor` x the median of the others.

    The median of the *other* layers is the reference, so one broken layer cannot raise
    its own bar (with two layers, the plain median would be half the broken one).
    """
    out = []
    for i, e in enumerate(errors):
        others = [x for j, x in enumerate(errors) if j != i and math.isfinite(x)]
        median = statistics.median(others) if others else 0.0
        if not math.isfinite(e):
            out.append(Outlier(i, e, math.inf, median))
        elif others and e > floor and e > factor * median:
            out.append(Outlier(i, e, e / median if median > 0 else math.inf, median))
    return out


@dataclass
class EvalReport:
    original: str
    quantized: str
    quant_format: str
    device: str
    scaled_mm: bool  # real low-precision matmuls (torch._scaled_mm, torch._int_mm), else a simulation
    samples: int
    tokens: int  # predicted positions (a real token followed by a real token)
    layers: list[LayerResult] = field(default_factory=list)
    ppl_original: float = math.nan
    ppl_quantized: float = math.nan
    kl: float = math.nan  # mean KL(original || quantized) of next-token distributions, nats
    top1_agreement: float = math.nan
    wall_s: float = 0.0
    outlier_factor: float = DEFAULT_OUTLIER_FACTOR
    outlier_floor: float = DEFAULT_OUTLIER_FLOOR
    matmul: str = ""  # how the quantized matmuls ran, e.g. "torch._int_mm", "simulated FP8 matmuls"

    @property
    def outliers(self) -> list[Outlier]:
        return find_outliers([r.rel_error for r in self.layers], self.outlier_factor, self.outlier_floor)

    @property
    def ppl_change(self) -> float:
        return self.ppl_quantized / self.ppl_original - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ppl_change"] = self.ppl_change
        d["outliers"] = [asdict(o) | {"message": o.describe()} for o in self.outliers]
        return d

    def write_json(self, path: str | Path) -> None:
        # json writes inf/nan as Infinity/NaN; acceptable for a diagnostic file.
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def table(self) -> str:
        flagged = {o.layer for o in self.outliers}
        errors = [r.rel_error for r in self.layers]
        lines = [f"original:  {self.original}", f"quantized: {self.quantized} ({self.quant_format})",
                 f"{self.samples} samples, {self.tokens} predicted tokens, device {self.device}, "
                 f"{self.matmul or ('torch._scaled_mm' if self.scaled_mm else 'simulated FP8 matmuls')}", "",
                 f"{'layer':>5}  {'rel_error':>10}  {'x others':>8}  {'stream_error':>12}"]
        for r in self.layers:
            # The same reference the outlier rule uses: the median of the other layers.
            others = [e for j, e in enumerate(errors) if j != r.layer and math.isfinite(e)]
            median = statistics.median(others) if others else 0.0
            ratio = f"{r.rel_error / median:8.1f}" if median > 0 else f"{'-':>8}"
            mark = "  <-- outlier" if r.layer in flagged else ""
            lines.append(f"{r.layer:>5}  {r.rel_error:>10.4f}  {ratio}  {r.stream_error:>12.4f}{mark}")
        lines += ["", f"perplexity: original {self.ppl_original:.4f}, quantized {self.ppl_quantized:.4f} "
                      f"({100 * self.ppl_change:+.2f}%)",
                  f"KL(original || quantized): {self.kl:.3e} nats/token; top-1 agreement "
                  f"{100 * self.top1_agreement:.2f}%"]
        outliers = self.outliers
        lines.append("outliers: none" if not outliers else "outliers:\n" + "\n".join(
            f"  {o.describe()}" for o in outliers))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Per-layer errors as a PNG; matplotlib is imported only here (an optional dependency)."""
        try:
            import matplotlib
        except ImportError:
            raise ConfigError("--plot needs matplotlib (pip install matplotlib)") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        idx = [r.layer for r in self.layers]
        flagged = {o.layer for o in self.outliers}
        fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(idx) + 4), 4))
        colors = ["tab:red" if i in flagged else "tab:blue" for i in idx]
        ax.bar(idx, [r.rel_error for r in self.layers], color=colors, label="layer error (original inputs)")
        ax.plot(idx, [r.stream_error for r in self.layers], color="tab:orange", marker=".",
                label="stream error (quantized model)")
        if all(r.rel_error > 0 for r in self.layers):
            ax.set_yscale("log")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("relative error ||q - o|| / ||o||")
        ax.set_title(f"{Path(self.quantized).name}: ppl {self.ppl_original:.3f} -> {self.ppl_quantized:.3f}, "
                     f"KL {self.kl:.2e}, top-1 {100 * self.top1_agreement:.1f}%", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
