"""int4_awq: W4A16 with AWQ scaling (Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"), in the form AutoAWQ implements it.

Per decoder layer, from the calibration replay of the unquantized layer:

- statistics: the mean |x| of every input channel of each smoothing group over real tokens
  (observer "channel_absmean", sum and count, merged by adding); the inputs and outputs of
  each group's parent block on every batch (`recorded_blocks`), and the real-token masks;
- search, group by group (`streamq.model.smoothing.awq_groups`): for each of
  `n_grid` ratios r a candidate s = x_mean^r / w_mean^(1-r) (duo scaling, normalized by
  sqrt(max * min); `streamq.quant.smooth.awq_candidates`); the group's weights become
  Q(W * s) / s (4-bit round-to-nearest, scales rounded to the stored dtype), the parent block
  is re-run on its recorded inputs, and the loss is the squared error against the recorded
  unquantized output, summed over real tokens; the smallest loss wins (`pick`, ties to the lowest ratio);
- apply: the source (norm weight, or v_proj / up_proj rows) divided by s, the group's Linears
  (and the MoE router, which is not quantized) multiplied by s (`rescale_group`, shared with
  SmoothQuant). The layer then computes the same function before quantization, and routing
  logits are unchanged;
- quantize: round-to-nearest W4 of the rescaled weights (`Int4Rtn`), scales in the model dtype.

Order: every group is searched against the layer as it was calibrated (its modules keep the
original weights during every search; recorded inputs and outputs are the unquantized
layer's), then the scales are applied in layer order (q/k/v, o_proj, gate/up, down). No
group's targets are rescaled by an earlier group (an earlier group's targets only become a
later group's source, rescaled on their rows), so this is AutoAWQ's order: search all on the
original layer, then apply all.

MoE: post_attention_layernorm -> router + every expert's gate/up is one group whose parent
is the whole MoE block; up_proj -> down_proj is one group per expert, its parent that
expert's MLP, evaluated on the tokens the model routed to it (from the recorded experts
inputs and routing); the loss is down_proj's output error there (gate/up unquantized, as
AutoAWQ inspects down_proj). An expert no calibration token reached keeps s = 1 and is
quantized round-to-nearest like the others (reported in `fallbacks`).

Several processes (torchrun) split the searches: each keeps its share of the samples' hidden
states, but for the statistics every process replays every batch in batch order (the batches
broadcast by the processes holding them), so the means and recorded blocks of the groups it
searches (`work_units`) are one process's; the scales are exchanged before any is applied,
and the output is one process's, byte for byte.

`mse_range: true` adds AutoAWQ's clipping search (`_clip`) after the scales are applied: for
every Linear but q_proj / k_proj, per (row, group) the clip maximum r * absmax (r = 1, 0.95,
..., 0.55) with the smallest output error on up to 512 sampled real-token inputs (inputs
divided by the Linear's AWQ scale); the weight is clamped to it, then quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from streamq.errors import CheckpointError, ConfigError
from streamq.schemes.base import Q, Scheme, check_bits, register, setting
from streamq.schemes.int4 import Int4Rtn, _group_size, _scale_dtype


def _first(out: Any):
    return out[0] if isinstance(out, tuple) else out


@register
@dataclass(frozen=True)
class Int4Awq(Int4Rtn):
    n_grid: int = 20
    duo_scaling: bool = True
    mse_range: bool = False
    # Per layer, set by `transform`: the source dtype of each module's weight (scales are
    # stored in it), notes for the report, and the ratio each group chose (tests, logs).
    source_dtypes: dict = field(default_factory=dict, compare=False, repr=False)
    fallbacks: list = field(default_factory=list, compare=False, repr=False)
    chosen: dict = field(default_factory=dict, compare=False, repr=False)

    name = "int4_awq"
    keys = {"n_grid": (int,), "duo_scaling": (bool,)}
    method_keys = {"weight": (str,), "group_size": (int,), "zero_point": (bool,), "mse_range": (bool,)}

    @classmethod
    def from_yaml(cls, q: dict[str, Any], source: str) -> Scheme:
        check_bits(cls, q, source)
        method = q.get("quant_method") or {}
        n_grid = setting(q, "n_grid", 20)
        if n_grid < 1:
            raise ConfigError(f"{source}: '{Q}.n_grid' is {n_grid}; allowed: a positive integer, e.g. 20")
        return cls(_group_size(q, source), not bool(setting(method, "zero_point", True)), int(n_grid),
                   bool(setting(q, "duo_scaling", True)), bool(setting(method, "mse_range", False)))

    @property
    def needs_calibration(self) -> bool:
        return True

    def smoothing_kind(self) -> str | None:
        return "channel_absmean"

    def smoothing_inputs(self, layer, layout) -> list[str]:
        from streamq.model.smoothing import awq_groups

        return [g.observed for g in awq_groups(layer, layout) if g.observed is not None]

    def recorded_blocks(self, layer, layout, owned=None) -> list[str]:
        """The parent blocks of the groups searched here (all, or those of `owned` modules),
        and with `mse_range` the blocks whose inputs are the clipped Linears' inputs."""
        from streamq.model.smoothing import awq_groups

        blocks = [g.parent for g in awq_groups(layer, layout) if _searches(g, owned)]
        if self.mse_range:  # the clipping search needs every clipped Linear's input
            modules = dict(layer.named_modules())
            for m in layout.quantized:
                ref = layout.experts.get(m)
                block = ref.parent if ref is not None else CLIP_INPUTS.get(layout.rel(m))
                if block in modules and (owned is None or m in owned):
                    blocks.append(block)
        return list(dict.fromkeys(blocks))

    def statistics_bytes(self, linears: dict[str, tuple[int, int]], experts: dict[str, Any],
                         all_experts: bool = False, *, layer=None, layout=None, tokens: int = 0, elem: int = 2,
                         top_k: int = 1, owned: set[str] | None = None) -> tuple[dict[str, int], dict[str, int]]:
        """Device bytes one layer's search holds besides the layer and one batch's activations
        (for the planner), from the quantized Linears' [out, in] shapes and the (meta) layer.
        Returns (statistics, search working set), each by label.

        "AWQ recorded blocks": for every calibration token (`tokens`, all batches) the input
        and output of each block `recorded_blocks` names, kept on the device from the replay
        through the search: a Linear's in and out features, any other block's hidden size in
        and out, in the compute dtype (`elem` bytes); a fused experts block also keeps its
        routing (top_k int64 indices and weights per token).
        "AWQ search, then rescaled weights": the larger of the search's working set (the
        largest group's weights copied, restored after each search, plus one target's float32
        candidate and fake-quantized copy) and, once the scales are applied, every grouped
        target as a float32 copy (`rescale_group`) until the layer is quantized."""
        from streamq.model.smoothing import awq_groups

        modules = dict(layer.named_modules())
        norm = modules.get("input_layernorm", modules.get("post_attention_layernorm"))
        hidden = norm.weight.shape[0] if norm is not None and getattr(norm, "weight", None) is not None else 0
        per_token = 0
        for block in self.recorded_blocks(layer, layout, owned):
            module = modules[block]
            if hasattr(module, "in_features"):
                per_token += (module.in_features + module.out_features) * elem
            else:
                per_token += 2 * hidden * elem
            if hasattr(module, "gate_up_proj"):  # fused experts: their routing is recorded too
                per_token += top_k * (8 + elem)
        groups = awq_groups(layer, layout)
        numel = {m: linears[m][0] * linears[m][1] for g in groups for m in g.targets}
        search = max((sum(numel[m] for m in g.targets) * elem + 2 * 4 * max(numel[m] for m in g.targets)
                      for g in groups), default=0)
        # `rescale_group` gives every target a float32 copy, all alive until quantized.
        rescaled = 4 * sum(numel.values())
        return ({"AWQ recorded blocks": per_token * tokens},
                {"AWQ search, then rescaled weights (float32)": max(search, rescaled)})

    def _storage_dtype(self, name: str, w):
        import torch

        src = self.source_dtypes.get(name)
        return _scale_dtype(w if src is None else torch.empty(0, dtype=src))

    def _fake_quant(self, module: str):
        """W -> its 4-bit round trip (float32), as `quantize` will store it."""
        from streamq.quant import int4

        def fq(w):
            dtype = self._storage_dtype(module, w)
            codes, scale, zp = int4.quantize_rtn(w, self.group_size, self.sym, dtype)
            return int4.dequantize(codes, scale, zp, self.group_size, w.dtype)

        return fq

    work_stage = "transform"

    def work_units(self, linears: dict[str, tuple[int, int]], experts: dict[str, Any], all_experts: bool = False,
                   *, layer=None, layout=None, top_k: int = 1) -> list:
        """The independent searches of one layer, for several processes to split
        (`streamq.engine.dist`): one unit per AWQ group (its targets), and one per quantized
        Linear in no group (its clipping search, with `mse_range`). Every search runs on the
        layer as calibrated, so a process searching some groups finds the scales one process
        finds for them. Cost (`token_flops`): n_grid re-runs of the group's parent block, in
        multiply-adds per calibration token (routed experts weighted top_k / num_experts)."""
        from streamq.model.layout import experts_per_parent
        from streamq.model.smoothing import awq_groups
        from streamq.schemes.base import WorkUnit

        nums = experts_per_parent(experts.values())

        def macs(module: str) -> float:
            rows, cols = linears[module]
            ref = experts.get(module)
            share = 1.0 if ref is None or all_experts else min(1.0, top_k / nums[ref.parent])
            return rows * cols * share

        def under(parent: str) -> float:
            full = layout.prefix + parent
            return sum(macs(m) for m in linears if m == full or m.startswith(full + "."))

        units, grouped = [], set()
        for g in awq_groups(layer, layout):
            cost = sum(macs(m) for m in g.targets) if g.expert is not None else under(g.parent)
            units.append(WorkUnit(tuple(g.targets), 0, 0.0, token_flops=float(self.n_grid * cost)))
            grouped.update(g.targets)
        for m in linears:
            if m not in grouped:
                units.append(WorkUnit((m,), 0, 0.0, token_flops=float(self.n_grid * macs(m) if self.mse_range else 0)))
        return units

    def transform(self, ctx, stats):
        """Search every group's scale, then apply them in layer order (each search runs on
        the layer as calibrated, so the order of searches does not matter); with `mse_range`
        then the clipping search. Several processes: each searches its share (`ctx.owned`)
        and `ctx.share` gives every process every scale before any is applied."""
        import torch

        from streamq.model.layer import layer_weight_views
        from streamq.model.smoothing import awq_groups, rescale_group
        from streamq.quant.smooth import awq_candidates, awq_weight_mean, grid_losses, pick

        self.fallbacks.clear()
        self.chosen.clear()
        self.source_dtypes.clear()
        self.source_dtypes.update({m: ctx.tensors[n].dtype for m, n in ctx.layout.quantized.items()})
        changed: dict[str, torch.Tensor] = {}
        col_scale: dict[str, torch.Tensor] = {}  # module -> the AWQ scale its columns were multiplied by
        views = layer_weight_views(ctx.layer, ctx.layout)
        prefix = ctx.layout.prefix
        groups = awq_groups(ctx.layer, ctx.layout)
        found: dict[str, torch.Tensor] = {}  # "<source>|s" and "<source>|ratio" of the groups searched here
        with torch.no_grad():
            for group in groups:
                if not _searches(group, ctx.owned):
                    continue  # another process searches it
                for m in group.targets:
                    self._check_shape(m, ctx.weights[m])
                # The weights to search from: ctx.weights, unless they are the layer's own
                # parameters (views), which the search overwrites and restores.
                saved = {m: views[m].clone() for m in group.targets}
                base = {m: saved[m] if _aliases(ctx.weights[m], views[m]) else ctx.weights[m]
                        for m in group.targets}
                if group.expert is None:
                    x_mean = stats.values[prefix + group.observed]
                    loss_fn = self._block_loss(ctx, stats, group, base, views)
                else:
                    x_mean, loss_fn = self._expert_loss(ctx, stats, group, base, views)
                    if x_mean is None:
                        self.fallbacks.append(f"{prefix}{group.source}: no calibration token reached this expert; "
                                              "AWQ scale 1, quantized round-to-nearest")
                        found[f"{group.source}|none"] = torch.zeros(())  # searched: scale 1
                        continue
                w_mean = awq_weight_mean([base[m] for m in group.targets], self.group_size)
                ratios, candidates = awq_candidates(x_mean.to(w_mean.device), w_mean, self.n_grid,
                                                    self.duo_scaling)
                try:
                    losses = grid_losses(candidates, loss_fn)
                finally:
                    for m in group.targets:
                        views[m].copy_(saved[m])
                s, best = pick(losses, candidates)
                found[f"{group.source}|s"] = s
                found[f"{group.source}|ratio"] = ratios[best].reshape(())
                del saved, base
            found = ctx.share(found)
            for group in groups:
                s = found.get(f"{group.source}|s")
                if s is None:
                    _searched(found, group.source, f"AWQ group '{prefix}{group.source}'")
                    continue  # an expert no token reached: scale 1
                self.chosen[prefix + group.source] = float(found[f"{group.source}|ratio"])
                rescale_group(ctx, group.source, group.targets, s, changed, group.extras)
                for m in group.targets:
                    col_scale[m] = s
            if self.mse_range:
                self._clip(ctx, stats, col_scale)
        return changed

    def _clip(self, ctx, stats, col_scale) -> None:
        """AutoAWQ's clipping search (`mse_range: true`) on every quantized Linear but q_proj
        and k_proj (AutoAWQ skips them: their error is amplified by q k^T): per (row, group)
        the clip maximum r * absmax with the smallest output error on (up to 512 sampled)
        calibration inputs, divided by the AWQ scales applied to the Linear; the weight is
        clamped to it before round-to-nearest."""
        import torch

        from streamq.quant.smooth import clamp_to_clip, clip_search

        g = self.group_size
        clipped = [m for m in ctx.weights if ctx.layout.rel(m).rpartition(".")[2] not in ("q_proj", "k_proj")]
        clips: dict[str, torch.Tensor] = {}
        for m in clipped:
            if ctx.owned is not None and m not in ctx.owned:
                continue  # another process searches it
            x = self._linear_input(ctx, stats, m)
            if x is None:
                self.fallbacks.append(f"{m}: no calibration input, not clipped")
                clips[f"{m}|none"] = torch.zeros(())
                continue
            w = ctx.weights[m].to(torch.float32)
            if m in col_scale:
                x = x.to(torch.float32) / col_scale[m].to(x.device)
            fq = self._fake_quant(m)
            clips[m] = clip_search(w, x.to(torch.float32), g, lambda wr, c, _fq=fq: _fq(clamp_to_clip(wr, c, g)),
                                   n_grid=20)
        clips = ctx.share(clips)
        for m in clipped:
            if m not in clips:
                _searched(clips, m, f"the clipping search of '{m}'")
                continue
            w = ctx.weights[m].to(torch.float32)
            ctx.weights[m] = clamp_to_clip(w, clips[m].to(w.device, w.dtype), g)

    def _linear_input(self, ctx, stats, module):
        """The real-token inputs [n, in] of one quantized Linear over all batches, from the
        recorded blocks (as the unsmoothed layer saw them), or None."""
        import torch
        from torch.nn import functional as F

        ref = ctx.layout.experts.get(module)
        rel = ctx.layout.rel(module)
        if ref is None:
            block = CLIP_INPUTS.get(rel)
            if block is None or block not in stats.blocks:
                return None
            rows = []
            for b, (args, kwargs, _) in enumerate(stats.blocks[block]):
                x = args[0] if args else kwargs["hidden_states"]
                rows.append(x.reshape(-1, x.shape[-1])[stats.masks[b].reshape(-1).to(x.device)])
            return torch.cat(rows)
        if ref.parent not in stats.blocks:
            return None
        experts = ctx.layer.get_submodule(ref.parent)
        rows = []
        for b, (args, kwargs, _) in enumerate(stats.blocks[ref.parent]):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            sel = (index == ref.index).any(dim=-1) & stats.masks[b].reshape(-1).to(index.device)
            x = hidden[sel]
            if ref.proj == "down_proj":
                gate, up = F.linear(x, experts.gate_up_proj[ref.index]).chunk(2, dim=-1)
                x = experts.act_fn(gate) * up
            rows.append(x)
        x = torch.cat(rows)
        return x if x.shape[0] else None

    def _block_loss(self, ctx, stats, group, base, views):
        """loss(s): the parent block re-run with the targets' weights Q(W s)/s, squared error
        against its recorded unquantized output over real tokens (a float32 sum)."""
        import torch

        from streamq.quant.smooth import scaled_fake_quantize, sum_squared_error

        parent = ctx.layer.get_submodule(group.parent)
        records = stats.blocks[group.parent]

        def loss(s):
            for m in group.targets:
                views[m].copy_(scaled_fake_quantize(base[m], s, self._fake_quant(m)).to(views[m].dtype))
            total = torch.zeros((), dtype=torch.float32, device=s.device)
            for b, (args, kwargs, ref) in enumerate(records):
                out, ref = _first(parent(*args, **kwargs)), _first(ref)
                mask = stats.masks[b].to(out.device)
                total += sum_squared_error(ref[mask], out[mask]).to(total.device)
            return total

        return loss

    def _expert_loss(self, ctx, stats, group, base, views):
        """(x_mean of the expert's down_proj input over its routed real tokens, loss(s)) for
        one expert's up_proj -> down_proj group; (None, None) if no token reached it."""
        import torch
        from torch.nn import functional as F

        from streamq.quant.smooth import scaled_fake_quantize, sum_squared_error

        parent, e = group.expert
        experts = ctx.layer.get_submodule(parent)
        down = group.targets[0]
        inters, refs = [], []
        total = None
        count = 0
        for b, (args, kwargs, _out) in enumerate(stats.blocks[parent]):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            rows = (index == e).any(dim=-1) & stats.masks[b].reshape(-1).to(index.device)
            if not bool(rows.any()):
                continue
            gate, up = F.linear(hidden[rows], experts.gate_up_proj[e]).chunk(2, dim=-1)
            h = experts.act_fn(gate) * up
            inters.append(h)
            refs.append(F.linear(h, views[down]))
            a = h.abs().to(torch.float32).sum(dim=0)
            total = a if total is None else total + a
            count += h.shape[0]
        if total is None:
            return None, None
        fq = self._fake_quant(down)

        def loss(s):
            w = scaled_fake_quantize(base[down], s, fq).to(views[down].dtype)
            out = torch.zeros((), dtype=torch.float32, device=s.device)
            for h, ref in zip(inters, refs, strict=True):
                out += sum_squared_error(ref, F.linear(h, w)).to(out.device)
            return out

        return total / count, loss


# Quantized Linear (relative name) -> the recorded block whose input is its input.
CLIP_INPUTS = {"self_attn.v_proj": "self_attn", "self_attn.o_proj": "self_attn.o_proj", "mlp.gate_proj": "mlp",
               "mlp.up_proj": "mlp", "mlp.down_proj": "mlp.down_proj"}


def _searches(group, owned: set[str] | None) -> bool:
    """Whether this process searches `group`: a work unit holds a group's targets together."""
    return owned is None or group.targets[0] in owned


def _searched(found: dict, key: str, what: str) -> None:
    """A search without a result must have said so ("<key>|none"); otherwise no process ran it
    (several processes that disagree on the work split), and quantizing on would change bytes."""
    if f"{key}|none" not in found:
        raise CheckpointError(f"{what} was run by no process; the processes disagree on the layer's work split")


def _aliases(a, b) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
