"""The reproduction's report: ``results.md`` (the findings over seeds, then each finding's per-seed
numbers) and one plot per finding (mean over seeds, shaded +- one standard error), from the
summary :func:`megatron_grow.experiments.repro.run_repro` builds."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _arch(m: dict) -> str:
    return f"{m['layers']}L {m['experts']}E top-{m['topk']}"


def _pm(stat: dict | None, digits: int = 4, sign: str = "+") -> str:
    """``mean ± SE`` (``sign`` "+" for differences, "" for values)."""
    if stat is None:
        return "-"
    if stat["se"] is None:
        return f"{stat['mean']:{sign}.{digits}f}"
    return f"{stat['mean']:{sign}.{digits}f} ± {stat['se']:.{digits}f}"


def _ci(stat: dict, digits: int = 4) -> str:
    return "-" if stat["ci95"] is None else f"[{stat['ci95'][0]:+.{digits}f}, {stat['ci95'][1]:+.{digits}f}]"


# ------------------------------------------------------------------------------------------------
# Markdown


SECTIONS = ("a_grown_vs_scratch", "b_interposition_vs_stack", "c_width_alpha", "d_sunk_cost")


def format_markdown(r: dict) -> str:
    present = r["per_seed"][0]["findings"]
    per_finding = [md(r) for key, md in zip(SECTIONS, (_md_a, _md_b, _md_c, _md_d)) if key in present]
    sections = [_md_header(r), _md_findings(r), *per_finding, _md_timings(r)]
    return "\n".join(line for section in sections for line in section)


def _md_header(r: dict) -> list:
    s, s0 = r["size"], r["per_seed"][0]
    bm, base = s0["runs"]["base"]["model"], s0["base"]
    saves = ", ".join(f"{ck['iteration']} ({ck['sunk_over_fc']:.2f} F_c)" for ck in base["saves"])
    return [
        f"# Reproduction results: size `{s['name']}`, {len(r['seeds'])} seeds {r['seeds']}",
        "",
        f"Base: {_arch(bm)}, H {s['hidden_size']}, {bm['params']['total']:,} parameters "
        f"({base['activated_params']:,} activated), {s['base_iters']} steps of {s['global_batch_size']} x "
        f"{s['seq_length']} tokens at a constant LR {s['lr']:g}; saved at iterations {saves}. "
        f"F_c = 6 N_a (20 N_a) = {base['chinchilla_flops']:.3e} FLOPs. Every later run: {s['grown_iters']} steps, "
        "same batch and LR.",
        f"Validation loss in nats/token on the same {s['eval_iters']} x {s['global_batch_size']} x {s['seq_length']} "
        f"tokens for every run of every seed (token ids SHA-256 {r['validation']['tokens_sha256'][:12]}..., checked "
        f"equal). Cloze accuracy: lm-eval `{r['downstream']['task']}` (4 choices, chance 0.25) on the final "
        f"checkpoints ({_downstream_scope(r)}). {r['ranks']} process(es) per seed, {r['jobs']} seed(s) at a time; "
        f"wall time {r['timings_s']['total']:.0f} s.",
    ]


def _downstream_scope(r: dict) -> str:
    d = r["downstream"]
    if d["runs"] == "none":
        return "not scored in this run"
    scope = {"all": "every run", "a": "finding (a)'s runs"}[d["runs"]]
    return scope + (f", first {d['limit']} questions" if d["limit"] else ", all 200 questions")


def _md_findings(r: dict) -> list:
    agg = r["aggregate"]
    lines = ["", f"## The findings over {agg['n_seeds']} seeds (mean ± standard error of the paired difference)",
             "", "| finding | quantity | paper | mean ± SE | 95% interval | per seed | verdict |",
             "|---|---|---|---|---|---|---|"]
    for row in agg["findings"]:
        digits = 3 if "accuracy" in row["quantity"] or "Spearman" in row["quantity"] else 4
        per = ", ".join(f"{v:+.{digits}f}" for v in row["values"])
        lines.append(f"| ({row['finding']}) | {row['quantity']} | {row['paper']} | {_pm(row, digits)} | "
                     f"{_ci(row, digits)} | {per} | {row['verdict']} |")
    return lines


def _run_table(r: dict, names: list, labels: list) -> list:
    runs = r["aggregate"]["runs"]
    lines = ["| run | starts from | architecture | loss after growth | final loss | cloze accuracy |",
             "|---|---|---|---|---|---|"]
    for name, label in zip(names, labels):
        st = runs[name]
        model = r["per_seed"][0]["runs"][name]["model"]
        lines.append(f"| `{name}` | {label} | {_arch(model)} | {_pm(st['start_loss'], sign='')} | "
                     f"{_pm(st['final_loss'], sign='')} | {_pm(st['acc'], 3, sign='')} |")
    return lines


def _md_a(r: dict) -> list:
    pairs = r["per_seed"][0]["findings"]["a_grown_vs_scratch"]
    names, labels = [], []
    for p in pairs:
        names += [p["grown"], p["scratch"]]
        labels += [p["label"], "random init"]
    extra = ", ".join(f"{p['additional_flops']:.3e}" for p in pairs)
    return ["", "## (a) Grown vs scratch at equal additional FLOPs", "",
            f"Additional FLOPs per pair: {extra} (sunk cost not counted). Values: mean ± SE over seeds.", ""] \
        + _run_table(r, names, labels)


def _md_b(r: dict) -> list:
    b = r["per_seed"][0]["findings"]["b_interposition_vs_stack"]
    names, labels = [], []
    for row in b:
        it = row["base_iteration"]
        names += [f"interposition_at_{it}", f"stack_at_{it}"]
        labels += [f"base it {it} ({row['sunk_over_fc']:.2f} F_c), interposition",
                   f"base it {it} ({row['sunk_over_fc']:.2f} F_c), stack"]
    return ["", "## (b) Interposition vs stack, from a base below and above 1x F_c", "",
            "Depth x2: interposition l1 l1 l2 l2, stack l1 l2 l1 l2. Same additional FLOPs within each pair.", ""] \
        + _run_table(r, names, labels)


def _md_c(r: dict) -> list:
    c = r["per_seed"][0]["findings"]["c_width_alpha"]
    names = [row["run"] for row in c["rows"]]
    labels = [f"last save, width x2, alpha {row['alpha']:g}" for row in c["rows"]]
    base = r["aggregate"]["runs"]["base"]
    return ["", "## (c) Width growth (experts x2, top-k x2) vs the noise scale alpha", "",
            f"The base's final loss: {_pm(base['final_loss'], sign='')}; its cloze accuracy "
            f"{_pm(base['acc'], 3, sign='')}.", ""] \
        + _run_table(r, names, labels)


def _md_d(r: dict) -> list:
    agg = r["aggregate"]
    names = [lvl["run"] for lvl in agg["d_levels"]]
    labels = [f"{lvl['sunk_over_fc']:.2f} F_c sunk" if lvl["sunk_over_fc"] else "random init (sunk 0)"
              for lvl in agg["d_levels"]]
    return ["", "## (d) Final loss vs sunk cost (depth interposition x2, same additional budget)", "",
            f"Final loss strictly decreasing in the sunk cost in {agg['monotone_seeds']} of {agg['n_seeds']} seeds.",
            ""] + _run_table(r, names, labels)


def _md_timings(r: dict) -> list:
    t = r["timings_s"]
    per = "; ".join(f"seed {s['seed']}: " + ", ".join(f"{n} {run['seconds']:g}" for n, run in s["runs"].items())
                    for s in r["per_seed"])
    return ["", "## Timings (s)", "", ", ".join(f"{k} {v:g}" for k, v in t.items()), "",
            f"Per run (growth and training; scoring not included): {per}", "",
            f"Load average at start {r['load_average_start']}, at end {r['load_average_end']}."]


# ------------------------------------------------------------------------------------------------
# Plots: mean over seeds, +- one standard error shaded


def _band(ax, stat: dict, label: str, **kw) -> None:
    xs, ys, se = stat["curve"]["x"], stat["curve"]["mean"], stat["curve"]["se"]
    line = ax.plot(xs, ys, label=label, **kw)[0]
    if all(e is not None for e in se):
        ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def _finish(ax, title: str, xlabel: str = "additional FLOPs after growth (sunk cost not counted)",
            ylabel: str = "validation loss (nats/token)", legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _zoom_tail(ax, stats: list) -> None:
    """Start the y axis near the runs' second evaluation: the first (random init) would squash the rest."""
    tails = [y for st in stats for y in st["curve"]["mean"][1:]]
    if tails:
        ax.set_ylim(min(tails) - 0.05, max(tails) + 0.05)


def _save(fig, workdir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_a(r: dict, workdir: str) -> str:
    runs = r["aggregate"]["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, color in zip(r["per_seed"][0]["findings"]["a_grown_vs_scratch"], ("tab:red", "tab:purple")):
        arch = _arch(r["per_seed"][0]["runs"][p["grown"]]["model"])
        _band(ax, runs[p["grown"]], f"grown: {p['label']} ({arch})", color=color)
        _band(ax, runs[p["scratch"]], f"scratch ({arch})", color=color, linestyle="--")
    _finish(ax, f"(a) grown vs scratch at equal additional FLOPs ({r['aggregate']['n_seeds']} seeds, ± SE)")
    return _save(fig, workdir, "a_grown_vs_scratch.png")


def _plot_b(r: dict, workdir: str) -> str:
    runs = r["aggregate"]["runs"]
    b = r["per_seed"][0]["findings"]["b_interposition_vs_stack"]
    fig, axes = plt.subplots(1, len(b), figsize=(6 * len(b), 4.5))
    for ax, row in zip(axes, b):
        it = row["base_iteration"]
        picked = [runs[f"interposition_at_{it}"], runs[f"stack_at_{it}"]]
        _band(ax, picked[0], "interposition (l1 l1 l2 l2)", color="tab:red")
        _band(ax, picked[1], "stack (l1 l2 l1 l2)", color="tab:green")
        _zoom_tail(ax, picked)
        _finish(ax, f"(b) depth x2 from a base at {row['sunk_over_fc']:.2f} F_c")
    return _save(fig, workdir, "b_interposition_vs_stack.png")


def _plot_c(r: dict, workdir: str) -> str:
    runs = r["aggregate"]["runs"]
    rows = r["per_seed"][0]["findings"]["c_width_alpha"]["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, color in zip(rows, ("tab:gray", "tab:red", "tab:orange")):
        _band(ax, runs[row["run"]], f"alpha = {row['alpha']:g}", color=color)
    _zoom_tail(ax, [runs[row["run"]] for row in rows])
    _finish(ax, "(c) width growth (experts x2, top-k x2) vs noise alpha")
    return _save(fig, workdir, "c_width_alpha.png")


def _plot_d(r: dict, workdir: str) -> str:
    agg = r["aggregate"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    levels = agg["d_levels"]
    for i, lvl in enumerate(levels):
        label = f"grown from {lvl['sunk_over_fc']:.2f} F_c" if lvl["sunk_over_fc"] else "scratch (sunk 0)"
        _band(ax, agg["runs"][lvl["run"]], label, color=cmap(i / max(1, len(levels) - 1)))
    _finish(ax, "(d) same additional budget from each base save")
    finals = [agg["runs"][lvl["run"]]["final_loss"] for lvl in levels]
    ax2.errorbar([lvl["sunk_over_fc"] for lvl in levels], [f["mean"] for f in finals],
                 yerr=[f["se"] or 0.0 for f in finals], marker="o", capsize=4, color="tab:red")
    _finish(ax2, "(d) final loss vs sunk cost (± SE over seeds)", xlabel="sunk FLOPs of the base save / F_c",
            ylabel="final validation loss after the additional budget", legend=False)
    return _save(fig, workdir, "d_sunk_cost.png")


def write_plots(r: dict, workdir: str) -> list:
    """One plot per finding that ran, under ``workdir``; their paths."""
    present = r["per_seed"][0]["findings"]
    return [plot(r, workdir) for key, plot in zip(SECTIONS, (_plot_a, _plot_b, _plot_c, _plot_d)) if key in present]
