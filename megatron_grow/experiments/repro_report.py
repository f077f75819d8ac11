"""The reproduction's report: the markdown tables (``results.md``) and the four plots, from the
summary :func:`megatron_grow.experiments.repro.summarize` returns."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)


def _arch(m: dict) -> str:
    return f"{m['layers']}L {m['experts']}E top-{m['topk']}"


# ------------------------------------------------------------------------------------------------
# Markdown


def format_markdown(r: dict) -> str:
    f = r["findings"]
    sections = [_md_header(r), _md_a(r, f["a_grown_vs_scratch"]), _md_b(f["b_interposition_vs_stack"]),
                _md_c(f["c_width_alpha"]), _md_d(f["d_sunk_cost"]), _md_timings(r)]
    return "\n".join(line for section in sections for line in section)


def _md_header(r: dict) -> list:
    s, bm = r["size"], r["runs"]["base"]["model"]
    return [
        f"# Reproduction results: size `{s['name']}`, seed {r['seed']}, {r['ranks']} rank(s)",
        "",
        f"Base: {_arch(bm)}, H {s['hidden_size']}, {bm['params']['total']:,} parameters "
        f"({r['base']['activated_params']:,} activated), {s['base_iters']} steps of {s['global_batch_size']} x "
        f"{s['seq_length']} tokens at a constant LR {s['lr']:g}; saved at iterations "
        f"{', '.join(map(str, r['checkpoint_iterations']))}. Every later run: {s['grown_iters']} steps, same batch. "
        f"Chinchilla reference F_c = 6 N_a (20 N_a) = {r['base']['chinchilla_flops']:.3e} FLOPs.",
        f"Validation loss in nats/token on the same {s['eval_iters']} x {s['global_batch_size']} x "
        f"{s['seq_length']} tokens for every run (token ids SHA-256 {r['validation']['tokens_sha256'][:12]}..., "
        f"checked equal across runs). Wall time {r['timings_s']['total']:.0f} s.",
    ]


def _md_a(r: dict, pairs: list) -> list:
    lines = [
        "",
        "## (a) Grown vs scratch at equal additional FLOPs",
        "",
        "| growth | architecture | additional FLOPs | grown start | grown final | scratch final | grown - scratch |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        g = r["runs"][p["grown"]]
        lines.append(f"| {p['label']} | {_arch(g['model'])} | {p['additional_flops']:.3e} | {g['start_loss']:.4f} | "
                     f"{p['grown_final']:.4f} | {p['scratch_final']:.4f} | {p['grown_minus_scratch']:+.4f} |")
    lines.append("")
    for p in pairs:
        reach = p["scratch_flops_to_reach_grown_final"]
        lines.append(f"- {p['label']}: " + (f"scratch reached the grown model's final loss after {reach:.3e} "
                                            "additional FLOPs." if reach is not None else
                                            "scratch did not reach the grown model's final loss within the "
                                            "same additional FLOPs."))
    return lines


def _md_b(b: dict) -> list:
    reached = ("**reached**." if b["reached_1x_fc"] else
               "**not reached** (the paper's regime where interposition wins starts at about 1x F_c).")
    lines = [
        "",
        "## (b) Interposition vs stack (depth x2, from the last base checkpoint)",
        "",
        f"Base sunk cost {b['base_sunk_flops']:.3e} FLOPs = **{b['sunk_over_fc']:.3f} F_c** "
        f"(N_a = {b['base_activated_params']:,}); 1x F_c " + reached,
        "",
        "| mode | loss right after growth | final loss |",
        "|---|---|---|",
    ]
    lines += [f"| {row['mode']} | {row['start_loss']:.4f} | {row['final_loss']:.4f} |" for row in b["rows"]]
    return lines + ["", f"Interposition - stack: {b['start_interposition_minus_stack']:+.4f} right after growth, "
                        f"{b['interposition_minus_stack']:+.4f} at the end ({b['additional_flops']:.3e} additional "
                        "FLOPs each)."]


def _md_c(c: dict) -> list:
    lines = [
        "",
        "## (c) Width growth (experts x2, top-k x2) vs the noise scale alpha",
        "",
        "| alpha | loss right after growth | final loss |",
        "|---|---|---|",
    ]
    lines += [f"| {row['alpha']:g} | {row['start_loss']:.4f} | {row['final_loss']:.4f} |" for row in c["rows"]]
    return lines + ["", f"Lowest final loss at alpha = {c['best_alpha']:g}; base's final loss "
                        f"{c['base_final_loss']:.4f}; {c['additional_flops']:.3e} additional FLOPs each."]


def _md_d(d: dict) -> list:
    lines = [
        "",
        "## (d) Final loss vs sunk cost (depth interposition x2, same additional budget)",
        "",
        "| grown from | sunk FLOPs | sunk / F_c | base loss there | loss right after growth | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for row in d["rows"]:
        src = f"base iteration {row['base_iteration']}" if row["base_iteration"] else "random init (scratch)"
        bl = f"{row['base_loss']:.4f}" if row["base_loss"] is not None else "-"
        lines.append(f"| {src} | {row['sunk_flops']:.3e} | {row['sunk_over_fc']:.3f} | {bl} | "
                     f"{row['start_loss']:.4f} | {row['final_loss']:.4f} |")
    return lines + ["", f"{d['additional_flops']:.3e} additional FLOPs each. Final loss strictly decreasing in "
                        f"sunk cost: {'yes' if d['final_loss_monotone_in_sunk'] else 'no'}; Spearman rank "
                        f"correlation (sunk, final loss) = {d['spearman_sunk_vs_final']:+.2f}."]


def _md_timings(r: dict) -> list:
    t = r["timings_s"]
    return ["", "## Timings (s)", "", ", ".join(f"{k} {v:g}" for k, v in t.items()),
            f"load average at start {r['load_average_start']}, at end {r['load_average_end']}"]


# ------------------------------------------------------------------------------------------------
# Plots


def _line(ax, run: dict, label: str, **kw) -> None:
    xs, ys = zip(*run["curve"])
    ax.plot(xs, ys, marker=".", label=label, **kw)


def _finish(ax, title: str, xlabel: str = "additional FLOPs after growth (sunk cost not counted)",
            ylabel: str = "validation loss (nats/token)", legend: bool = True) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _save(fig, workdir: str, name: str) -> str:
    fig.tight_layout()
    path = os.path.join(workdir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_a(r: dict, workdir: str) -> str:
    runs = r["runs"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, color in zip(r["findings"]["a_grown_vs_scratch"], ("tab:red", "tab:purple")):
        arch = _arch(runs[p["grown"]]["model"])
        _line(ax, runs[p["grown"]], f"grown: {p['label']} ({arch})", color=color)
        _line(ax, runs[p["scratch"]], f"scratch ({arch})", color=color, linestyle="--")
    ax.axhline(r["base"]["final_loss"], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    _finish(ax, "(a) grown vs scratch at equal additional FLOPs")
    return _save(fig, workdir, "a_grown_vs_scratch.png")


def _plot_b(r: dict, workdir: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _line(ax, r["runs"]["interposition"], "interposition (l1 l1 l2 l2 ...)", color="tab:red")
    _line(ax, r["runs"]["stack"], "stack (l1 l2 ... l1 l2 ...)", color="tab:green")
    _finish(ax, f"(b) depth x2 from a base at {r['findings']['b_interposition_vs_stack']['sunk_over_fc']:.2f} F_c")
    return _save(fig, workdir, "b_interposition_vs_stack.png")


def _plot_c(r: dict, workdir: str) -> str:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, color in zip(r["findings"]["c_width_alpha"]["rows"], ("tab:gray", "tab:red", "tab:orange")):
        _line(ax, r["runs"][row["run"]], f"alpha = {row['alpha']:g}", color=color)
    ax.axhline(r["base"]["final_loss"], color="tab:blue", linewidth=0.8, linestyle=":", label="base, final")
    _finish(ax, "(c) width growth (experts x2, top-k x2) vs noise alpha")
    return _save(fig, workdir, "c_width_alpha.png")


def _plot_d(r: dict, workdir: str) -> str:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    rows = r["findings"]["d_sunk_cost"]["rows"]
    for i, row in enumerate(rows):
        label = (f"from base it {row['base_iteration']} ({row['sunk_over_fc']:.2f} F_c)" if row["base_iteration"]
                 else "scratch (sunk 0)")
        _line(ax, r["runs"][row["run"]], label, color=cmap(i / max(1, len(rows) - 1)))
    _finish(ax, "(d) same additional budget from each base checkpoint")
    ax2.plot([row["sunk_flops"] for row in rows], [row["final_loss"] for row in rows], marker="o", color="tab:red")
    _finish(ax2, "(d) final loss vs sunk cost", xlabel="sunk FLOPs of the base checkpoint",
            ylabel="final validation loss after the additional budget", legend=False)
    return _save(fig, workdir, "d_sunk_cost.png")


def write_plots(r: dict, workdir: str) -> list:
    """The four findings' plots under ``workdir``; their paths."""
    return [plot(r, workdir) for plot in (_plot_a, _plot_b, _plot_c, _plot_d)]
