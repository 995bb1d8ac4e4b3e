"""bench.md (Markdown tables) and bench.png (per-layer stage times, memory) from bench.json's dict."""

from __future__ import annotations

import math
from pathlib import Path

# Foreground stages of the layer loop, in order; `read` runs in a background thread.
STAGES = ("wait_read", "to_device", "calibrate", "quantize", "propagate", "wait_write")
STAGE_COLORS = {"wait_read": "#d62728", "to_device": "#ff7f0e", "calibrate": "#1f77b4", "quantize": "#2ca02c",
                "propagate": "#17becf", "wait_write": "#9467bd"}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    if n == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def stage_totals(stages: list[dict]) -> dict[str, float]:
    keys = ("read", *STAGES)
    return {k: sum(float(s.get(k, 0.0)) for s in stages) for k in keys}


def markdown(result: dict) -> str:
    m, src, ds = result["machine"], result["source"], result.get("dataset")
    io = result["io_floor"]
    lines = [f"# streamq benchmark: {result['geometry']}, {result['layers']} layers", ""]
    lines.append(f"- command: `{result['command']}`")
    gpu = m.get("gpu") or "none"
    lines.append(f"- machine: {m.get('cpu', '?')} ({m.get('cpu_count', '?')} CPUs, {fmt_bytes(m.get('ram_bytes'))} "
                 f"RAM), GPU: {gpu}; device `{m.get('device')}`; torch {m.get('torch')}, "
                 f"transformers {m.get('transformers', '?')}")
    lines.append(f"- source: synthetic {result['geometry']} checkpoint, {result['layers']} decoder layers, "
                 f"{src['files']} safetensors files, {fmt_bytes(src['bytes'])} (`{src['path']}`)")
    if ds:
        lines.append(f"- calibration (fp8_static): RandomTokens, {ds['num_samples']} samples x "
                     f"{ds['max_seq_length']} tokens, batch size {ds['batch_size']}")
    lines.append(f"- page cache: **{result['cache']['state']}**: {result['cache']['note']}")
    if result.get("repeat", 1) > 1:
        walls = "; ".join(f"{algo} " + ", ".join(_num(w) for w in a["all_wall_s"])
                          for algo, a in result["algos"].items())
        lines.append(f"- repeats: {result['repeat']}, interleaved; every number is the minimum over its repeats "
                     f"(walls: {walls})")
    lines.append(f"- I/O floor read: {fmt_bytes(io['bytes'])} in {_num(io['seconds'])} s = "
                 f"{_num(io['gbps'])} GB/s ({fmt_bytes(io['chunk_bytes'])} chunks)")
    cf = result.get("compute_floor")
    if cf:
        lines.append(f"- compute floor: {cf['batches']} batches, {cf['tokens']} tokens through {result['layers']} "
                     f"layers on `{cf['device']}`, hidden states on {cf['hidden_states_on']}, experts "
                     f"implementation {cf.get('experts_implementation') or 'n/a'}: {_num(cf['seconds'])} s")
    lines += ["", "| algo | wall s | I/O floor s (read + write) | compute floor s | floor s | wall / floor | "
              "streamq GB/s | floor read GB/s | floor write GB/s | peak GPU | peak host RSS | hidden cache |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for algo, a in result["algos"].items():
        lines.append(
            f"| {algo} | {_num(a['wall_s'])} | {_num(a['io_floor_s'])} ({_num(io['seconds'])} + "
            f"{_num(a['write_floor']['seconds'])}) | {_num(a['compute_floor_s']) if a['compute_floor_s'] else '-'} | "
            f"{_num(a['floor_s'])} | **{_num(a['ratio'])}** | {_num(a['gbps'])} | {_num(io['gbps'])} | "
            f"{_num(a['write_floor']['gbps'])} | {fmt_bytes(a['peak_gpu_bytes'])} | "
            f"{fmt_bytes(a['peak_host_rss_bytes'])} | {a['cache_location'] or '-'} |")
    lines += ["", "Time per stage, seconds summed over layers (`read` runs in a background thread and overlaps "
              "the others; `outside the loop` = wall minus the foreground stages: setup, input capture, "
              "the non-layer shard, index and config; `imports` = transformers' one-off lazy import of the modeling "
              "code, done before `quantize()` starts and not part of wall):", "",
              "| algo | read (background) | " + " | ".join(STAGES) + " | outside the loop | imports |",
              "|---|" + "---:|" * (len(STAGES) + 3)]
    for algo, a in result["algos"].items():
        t = a["stage_totals"]
        outside = a["wall_s"] - sum(t[k] for k in STAGES)
        lines.append(f"| {algo} | {_num(t['read'])} | " + " | ".join(_num(t[k]) for k in STAGES)
                     + f" | {_num(outside)} | {_num(a.get('import_s'))} |")
    for algo, a in result["algos"].items():
        plan = a.get("plan") or {}
        if plan.get("predicted_peak_host_bytes"):
            gpu = _vs(plan["predicted_peak_gpu_bytes"], a["peak_gpu_bytes"])
            host = _vs(plan["predicted_peak_host_bytes"], a["peak_host_rss_bytes"])
            lines.append(f"- plan vs measured, {algo}: peak GPU {gpu}, peak host {host}, "
                         f"time {_num(plan['estimated_seconds'])} s vs {_num(a['wall_s'])} s")
    phases = {algo: a.get("phases") or {} for algo, a in result["algos"].items()}
    names = list(dict.fromkeys(k for p in phases.values() for k in p))
    if names:
        lines += ["", "The whole run by phase, seconds (`report.phases`; `layers` is the loop above, "
                  "`last write` the wait for the final layer's shard):", "",
                  "| algo | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for algo, p in phases.items():
            lines.append(f"| {algo} | " + " | ".join(_num(p.get(k, 0.0)) for k in names) + " |")
    lines += ["", "Bytes: " + "; ".join(
        f"{algo} read {fmt_bytes(a['bytes_read'])}, wrote {fmt_bytes(a['bytes_written'])}"
        for algo, a in result["algos"].items()), ""]
    return "\n".join(lines)


def _vs(predicted: int, measured: int) -> str:
    change = f" ({100 * (predicted - measured) / measured:+.1f}%)" if measured else ""
    return f"{fmt_bytes(predicted)} predicted, {fmt_bytes(measured)} measured{change}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(result["algos"].items())
    cols = max(2, len(algos))
    fig, axes = plt.subplots(2, cols, figsize=(5.5 * cols, 8), squeeze=False)
    for col in range(cols):
        ax = axes[0][col]
        if col >= len(algos):
            ax.axis("off")
            continue
        algo, a = algos[col]
        stages = a["stages"]
        x = [int(s.get("layer", i)) for i, s in enumerate(stages)]
        bottom = [0.0] * len(stages)
        for k in STAGES:
            vals = [float(s.get(k, 0.0)) for s in stages]
            if any(vals):
                ax.bar(x, vals, bottom=bottom, label=k, color=STAGE_COLORS[k])
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.plot(x, [float(s.get("read", 0.0)) for s in stages], "k_", markersize=14, mew=2,
                label="read (background)")
        floor = (result.get("compute_floor") or {}).get("per_layer") if algo == "fp8_static" else None
        if floor and len(floor) == len(stages):
            ax.plot(x, floor, "x", color="black", markersize=9, mew=2, label="compute floor (forwards only)")
        ax.set_xticks(x)
        top = max([*bottom, *(float(s.get("read", 0.0)) for s in stages), *(floor or []), 1e-9])
        ax.set_ylim(0, top * 1.45)  # headroom for the legend
        ax.set_title(f"{algo}: time per layer (wall {a['wall_s']:.2f} s, {a['ratio']:.2f}x floor)")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("seconds")
        ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax = axes[1][0]
    for algo, a in algos:
        samples = a.get("rss_samples") or []
        if samples:
            ax.plot([t for t, _ in samples], [r / 2**30 for _, r in samples], label=algo)
    ax.set_title("host RSS over time (sampled in the quantize process)")
    ax.set_xlabel("seconds since quantize() started")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    any_gpu = False
    for algo, a in algos:
        per_layer = a.get("layer_gpu_bytes") or []
        if any(per_layer):
            any_gpu = True
            ax.plot(range(len(per_layer)), [b / 2**30 for b in per_layer], marker="o", label=algo)
    if any_gpu:
        ax.set_title("peak GPU memory allocated, cumulative after each layer")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("GiB")
        ax.legend(fontsize=8)
    else:
        ax.set_title("peak GPU memory per layer")
        ax.text(0.5, 0.5, "no CUDA device in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    for col in range(2, cols):
        axes[1][col].axis("off")
    fig.suptitle(f"streamq bench: {result['geometry']}, {result['layers']} layers, page cache "
                 f"{result['cache']['state']}, device {result['machine'].get('device')}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
