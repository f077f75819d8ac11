"""The paper's layer-wise weight-norm profile (arXiv 2510.08008, Fig. 2; docs/paper.md §1.3).

For every decoder layer: each expert weight matrix (SwiGLU gate, up and down projection) gives
``||W||_F / sqrt(numel(W))`` (the RMS of its entries); the layer's value is the mean over the
three projections and over all experts. A second series does the same for attention
(``linear_qkv`` and ``linear_proj``). Converged models have a profile that rises with depth;
stacking copies (``l1..ln, l1..ln``) puts the high-norm last layer before the low-norm first
layer (a "cliff" at the seam), interposition (``l1, l1, l2, l2, ...``) keeps it smooth.

Tensors are read region by region (``tools.reader``), never the model: one layer's experts at a
time, split further if that is more than ``max_bytes``. Storage keys (stacked over layers L,
experts E; F = expert FFN, H = hidden, q = heads x head dim)::

    decoder.layers.mlp.experts.experts.linear_fc1.weight   [L, E, 2F, H]  gate rows [0:F], up rows [F:2F]
    decoder.layers.mlp.experts.experts.linear_fc2.weight   [L, E, H, F]   down
    decoder.layers.self_attention.linear_qkv.weight        [L, q + 2 g d, H]
    decoder.layers.self_attention.linear_proj.weight       [L, H, q]

Suffix ``_LE`` below: indexed by layer, expert.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_grow.checkpoint import keys
from megatron_grow.checkpoint.manifest import read_checkpoint_info
from megatron_grow.checkpoint.reader import DEFAULT_MAX_BYTES, CheckpointReader, checkpoint_name
from megatron_grow.config.schema import DepthMode
from megatron_grow.errors import CheckpointError

EXPERT_FC1_SUFFIX = keys.FC1_NAME
EXPERT_FC2_SUFFIX = keys.FC2_NAME
QKV_KEY = keys.QKV
PROJ_KEY = keys.PROJ


def rms(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``||W||_F / sqrt(numel)`` over ``dims`` (float64 accumulation)."""
    n = math.prod(t.shape[d] for d in dims)
    return torch.linalg.vector_norm(t, dim=tuple(dims), dtype=torch.float64) / math.sqrt(n)


@dataclass
class NormProfile:
    """One checkpoint's per-layer profile. Per-projection values are averaged over experts."""

    name: str
    path: str
    iteration: int
    num_layers: int
    experts: list = field(default_factory=list)      # mean over gate/up/down and experts, per layer
    attention: list = field(default_factory=list)    # mean over qkv and proj, per layer
    per_projection: dict = field(default_factory=dict)  # gate/up/down/qkv/proj -> per-layer list
    seams: list = field(default_factory=list)        # layer boundaries where a stack growth joined copies
    bytes_read: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        def clean(v):  # JSON has no NaN (a checkpoint without attention tensors)
            if isinstance(v, float) and math.isnan(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v
        d = clean(dataclasses.asdict(self))
        d["experts_jump"] = largest_drop(self.experts)
        d["attention_jump"] = largest_drop(self.attention)
        return d


def expert_keys(reader: CheckpointReader) -> tuple[str, str]:
    """The stacked routed-expert fc1/fc2 keys (4-D, under ``mlp.experts``, not shared experts)."""
    def pick(suffix: str) -> str:
        # A training checkpoint also stores the optimizer's copies and moments of each weight under
        # optimizer.state.*; the profile is of the weights themselves.
        found = [k for k in reader.find(lambda k: k.endswith(suffix) and keys.ROUTED_EXPERTS_MARKER in k
                                        and "shared_experts" not in k
                                        and not k.startswith(keys.OPTIMIZER_STATE_PREFIX))
                 if len(reader.tensors[k].shape) == 4]
        if len(found) != 1:
            raise CheckpointError(f"{reader.ckpt_dir}: expected one stacked routed-expert tensor ending in "
                                  f"{suffix!r} with shape [layers, experts, ...], found {found or 'none'}")
        return found[0]
    return pick(EXPERT_FC1_SUFFIX), pick(EXPERT_FC2_SUFFIX)


def _stack_seams(info) -> list:
    """Layer indices where copies meet, for a checkpoint whose latest growth was a depth stack."""
    if not info.lineage:
        return []
    depth = info.lineage[-1].get("depth") or {}
    src = info.lineage[-1].get("source_model") or {}
    n = src.get("num_layers")
    if depth.get("mode") != DepthMode.STACK or not n or depth.get("ignore_first") or depth.get("ignore_last"):
        return []
    return [n * i for i in range(1, int(depth.get("factor", 2)))]


def norm_profile(path: str, *, gated: bool | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 progress: Callable[[str], None] | None = None, name: str | None = None) -> NormProfile:
    """Compute the profile of the checkpoint at ``path`` (a run root or an ``iter_N`` directory).

    ``gated``: whether fc1 holds gate and up (SwiGLU); by default from the checkpoint's manifest,
    else True when fc1 has twice fc2's FFN rows.
    """
    t0 = time.perf_counter()
    reader = CheckpointReader(path, progress=progress)
    info = read_checkpoint_info(reader.ckpt_dir, reader.iteration)
    fc1_key, fc2_key = expert_keys(reader)
    L, E, fc1_rows, H = reader.tensors[fc1_key].shape
    L2, E2, H2, F = reader.tensors[fc2_key].shape
    if (L2, E2, H2) != (L, E, H):
        raise CheckpointError(f"{reader.ckpt_dir}: {fc1_key} {reader.tensors[fc1_key].shape} and {fc2_key} "
                              f"{reader.tensors[fc2_key].shape} disagree")
    if gated is None:
        gated = info.model.gated_linear_unit if info.model is not None else fc1_rows == 2 * F
    if gated and fc1_rows != 2 * F:
        raise CheckpointError(f"{reader.ckpt_dir}: {fc1_key} has {fc1_rows} rows, a gated (SwiGLU) expert with "
                              f"FFN {F} needs {2 * F}")

    proj_names = ("gate", "up", "down") if gated else ("fc1", "down")
    per_LE = {p: torch.zeros(L, E, dtype=torch.float64) for p in proj_names}
    attn = {"qkv": [math.nan] * L, "proj": [math.nan] * L}
    has_attention = QKV_KEY in reader and PROJ_KEY in reader
    for layer in range(L):
        for key, is_fc1 in ((fc1_key, True), (fc2_key, False)):
            step = reader.slab_extent(key, 2, max_bytes)
            for e0 in range(0, E, step):
                n = min(step, E - e0)
                shape = reader.tensors[key].shape
                w_ERC = reader.read(key, (layer, e0, 0, 0), (1, n) + shape[2:])[0]
                if is_fc1 and gated:
                    per_LE["gate"][layer, e0:e0 + n] = rms(w_ERC[:, :F], (1, 2))
                    per_LE["up"][layer, e0:e0 + n] = rms(w_ERC[:, F:], (1, 2))
                else:
                    per_LE["fc1" if is_fc1 else "down"][layer, e0:e0 + n] = rms(w_ERC, (1, 2))
                del w_ERC
        if has_attention:
            for key, label in ((QKV_KEY, "qkv"), (PROJ_KEY, "proj")):
                shape = reader.tensors[key].shape
                w = reader.read(key, (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])[0]
                attn[label][layer] = float(rms(w, tuple(range(w.dim()))))
        if progress is not None:
            progress(f"{checkpoint_name(path)}: layer {layer + 1}/{L} ({reader.bytes_read / 2**20:.1f} MiB read, "
                     f"{time.perf_counter() - t0:.1f}s)")

    expert_L = torch.stack([per_LE[p] for p in proj_names]).mean(dim=(0, 2))
    per_projection = {p: per_LE[p].mean(dim=1).tolist() for p in proj_names}
    attention = [(q + p) / 2 for q, p in zip(attn["qkv"], attn["proj"])]
    per_projection.update(attn)
    return NormProfile(name=name or checkpoint_name(path), path=reader.ckpt_dir, iteration=reader.iteration,
                       num_layers=L, experts=expert_L.tolist(), attention=attention,
                       per_projection=per_projection, seams=_stack_seams(info),
                       bytes_read=reader.bytes_read, seconds=time.perf_counter() - t0)


def largest_drop(values: Sequence[float]) -> dict:
    """The largest decrease between neighbouring layers and how it compares with a typical step.

    ``ratio`` = that drop / the median absolute neighbour change (the paper's 3B stack seam is
    about 10x); ``None`` entries when there are fewer than two layers or no decrease.
    """
    vals = [v for v in values if not math.isnan(v)]
    if len(vals) < 2 or len(vals) != len(values):
        return {"layer": None, "drop": None, "ratio": None}
    diffs = [b - a for a, b in zip(vals, vals[1:])]
    worst = min(range(len(diffs)), key=lambda i: diffs[i])
    if diffs[worst] >= 0:
        return {"layer": None, "drop": 0.0, "ratio": 0.0}
    typical = sorted(abs(d) for d in diffs)[len(diffs) // 2]
    ratio = -diffs[worst] / typical if typical > 0 else math.inf
    return {"layer": worst, "drop": -diffs[worst], "ratio": ratio}


def depth_grown_profile(values: Sequence[float], mode: str, factor: int = 2) -> list:
    """The per-layer profile a depth growth by ``factor`` makes of ``values`` when it copies layers unchanged
    (zero noise): ``stack`` repeats the sequence (l1..ln, l1..ln), ``interposition`` each layer in place
    (l1, l1, l2, l2, ...). Either way the grown layers' norms are the copied layers' norms."""
    if mode == DepthMode.STACK:
        return list(values) * factor
    if mode == DepthMode.INTERPOSITION:
        return [v for v in values for _ in range(factor)]
    raise ValueError(f"unknown depth mode {mode!r}; expected one of {[m.value for m in DepthMode]}")


def save_profile_record(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """The weight-norm profile of one base save as a JSON-able dict, for testing finding (b)'s explanation.

    The paper explains stack's loss to interposition by the profile rising with depth: stacking then
    joins the high-norm last layer to the low-norm first (a cliff). So next to the per-layer norms
    (``experts``, ``attention``, ``per_projection``; :func:`norm_profile`) the record holds
    ``rise_first_to_last`` (last layer's value minus the first's) and ``depth_x2``: for each mode, the
    largest neighbour drop (:func:`largest_drop`) of the profile a x2 depth growth of this save makes
    (:func:`depth_grown_profile`). Only values that depend on the tensors are kept (no path or timing),
    so the same checkpoint gives the same record.
    """
    profile = norm_profile(path, max_bytes=max_bytes).as_dict()
    record = {key: profile[key] for key in ("iteration", "num_layers", "experts", "attention", "per_projection")}
    series = {name: values for name, values in (("experts", profile["experts"]), ("attention", profile["attention"]))
              if values and None not in values}
    record["rise_first_to_last"] = {name: values[-1] - values[0] for name, values in series.items()}
    record["depth_x2"] = {mode.value: {name: _finite(largest_drop(depth_grown_profile(values, mode)))
                                       for name, values in series.items()} for mode in DepthMode}
    return record


def _finite(drop: dict) -> dict:
    """``largest_drop`` with an infinite ratio (a drop over a median step of 0) as None: JSON has no infinity."""
    return {key: None if isinstance(v, float) and math.isinf(v) else v for key, v in drop.items()}


def format_profiles(profiles: Sequence[NormProfile]) -> str:
    """A per-layer table (one expert and one attention column per checkpoint) and the largest drops."""
    width = max(12, *(len(p.name) for p in profiles)) if profiles else 12
    header = f"{'layer':>5}  " + "  ".join(f"{p.name + ' exp':>{width + 4}}  {'attn':>9}" for p in profiles)
    lines = ["weight-norm profile: ||W||_F / sqrt(numel), experts = mean(gate, up, down) over experts, "
             "attn = mean(qkv, proj)", header]
    for layer in range(max(p.num_layers for p in profiles)):
        cells = []
        for p in profiles:
            if layer < p.num_layers:
                mark = "*" if layer in p.seams else " "
                cells.append(f"{p.experts[layer]:>{width + 4}.6f}{mark} {p.attention[layer]:>9.6f}")
            else:
                cells.append(f"{'':>{width + 4}}  {'':>9}")
        lines.append(f"{layer:>5}  " + "  ".join(cells))
    for p in profiles:
        j = largest_drop(p.experts)
        where = (f"largest drop {j['drop']:.6f} between layers {j['layer']} and {j['layer'] + 1} "
                 f"({j['ratio']:.1f}x the median neighbour change)") if j["layer"] is not None else \
            "no decrease between neighbouring layers (monotone non-decreasing)"
        seam = f"; stack seam(s) at layer(s) {p.seams} (marked *)" if p.seams else ""
        lines.append(f"{p.name} (iteration {p.iteration}, {p.num_layers} layers): experts {where}{seam}; "
                     f"read {p.bytes_read / 2**20:.1f} MiB in {p.seconds:.1f}s")
    return "\n".join(lines)


def plot_profiles(profiles: Sequence[NormProfile], out_png: str, title: str | None = None) -> str:
    """Two panels (experts, attention), one line per checkpoint; legend = checkpoint name."""
    import matplotlib  # lazy (cost): matplotlib takes 0.45 s, and only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_attention = any(not all(math.isnan(v) for v in p.attention) for p in profiles)
    fig, axes = plt.subplots(2 if has_attention else 1, 1, figsize=(8, 6.5 if has_attention else 4),
                             sharex=True, squeeze=False)
    panels = [("experts: mean RMS of gate/up/down", "experts")]
    if has_attention:
        panels.append(("attention: mean RMS of qkv/proj", "attention"))
    for ax, (label, attr) in zip(axes[:, 0], panels):
        n = len(profiles)
        for i, p in enumerate(profiles):
            # Earlier lines wider and dashed differently, so identical stretches (a stack's first copy
            # is the source itself) stay visible under later ones.
            line, = ax.plot(range(p.num_layers), getattr(p, attr), marker="o", markersize=3, label=p.name,
                            linewidth=1.5 + 3.0 * (n - 1 - i) / max(n - 1, 1), alpha=0.85,
                            linestyle=("-", "--", "-.", ":")[i % 4] if i else "-")
            for s in p.seams:
                ax.axvline(s - 0.5, color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_ylabel("||W||_F / sqrt(numel)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    axes[-1, 0].set_xlabel("layer")
    fig.suptitle(title or "layer-wise weight norms (arXiv 2510.08008, Fig. 2)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
