"""Benchmark offline growth: streaming grow (1/2/4 ranks) vs ``cp -r`` + sync vs a naive in-memory grow.

    python benchmarks/grow_bench.py [--target-gib 1.0] [--ranks 1 2 4] [--source-dtypes fp32 bf16]
                                    [--growth depth|width|depth_width] [--workdir DIR]

1. Builds a synthetic source checkpoint (random init, one process through
   ``run_in_processes``, saved with ``io.save_checkpoint`` + a manifest) of a paper-shaped
   MoE: the 17B family (GQA 16 heads / 4 groups, sigmoid router with expert bias, SwiGLU
   experts, 96 experts top-6) scaled by 1/4 in width (hidden 512, kv_channels 32, expert FFN
   ~256) with a small vocabulary (8192), so that routed experts dominate. The number of
   layers and then the expert FFN width are chosen so that the *grown* checkpoint is about
   ``--target-gib`` in fp32. One source per ``--source-dtypes`` entry: ``bf16`` stores the
   parameters in bf16, as real training checkpoints do (``grow --dtype auto`` grows it into bf16).
2. Grows each source with ``torchrun --standalone --nproc-per-node N -m megatron_grow grow ...
   --no-verify --quiet`` for each N in ``--ranks``, target layout EP=N when N divides the grown
   expert count (DP=N otherwise), polling every worker's RSS (psutil, every 50 ms) and parsing
   the summary the CLI prints.
3. Times ``cp -r`` of the grown checkpoint directory followed by ``sync`` after each grow, then the
   disk's floor: the same number of bytes written by as many processes as the grow had ranks, from
   one reused buffer with ``O_DIRECT`` (as the grow writes) and fsync, no CPU work.
4. Naive baseline: one process builds the whole source model, loads it with
   ``io.load_checkpoint``, grows its plain ``state_dict`` with ``reference.grow_state_dict``,
   builds the whole target model, ``load_state_dict`` and saves with ``io.save_checkpoint``.
5. Prints one markdown table for all sources side by side (grow phase and whole command as
   multiples of ``cp -r`` + sync, peak RSS per rank against the rank's share of the grown
   checkpoint), a line per source with the issue's three goals for 2 ranks, the load average
   before and after, and writes everything to ``WORKDIR/results_<growth>.json``.

The RSS of an idle process that only imports torch + megatron.core + megatron_grow is
reported as the per-process constant. Nothing here asserts on time: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

MiB = 2**20
GiB = 2**30
POLL_S = 0.05

# The 17B model (configs/models/17b.yaml) is hidden 2048, kv_channels 128, FFN 1024, 96 experts
# top-6; the benchmark keeps its proportions at 1/4 width and scales the rest.
PAPER_SHAPE = dict(
    hidden_size=512, num_attention_heads=16, num_query_groups=4, kv_channels=32,
    num_moe_experts=96, moe_router_topk=6, moe_ffn_hidden_size=256,
    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
    moe_router_load_balancing_type="global_aux_loss", moe_router_dtype="fp32",
    qk_layernorm=True, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
    vocab_size=8192, make_vocab_size_divisible_by=64, seq_length=256,
    untie_embeddings_and_output_weights=True,
)


# ------------------------------------------------------------------------------------------------
# Model and recipe


def growth_section(kind: str) -> dict:
    depth = {"mode": "interposition", "factor": 2, "ignore_first": 0, "ignore_last": 0,
             "identity_init": False}  # configs/growth/17b_to_35b.yaml
    width = {"factor": 2, "noise": "gaussian", "alpha": 0.01, "expert_layout": "append",
             "noise_granularity": "per_layer", "new_experts": "copy"}  # configs/growth/35b_to_70b.yaml
    if kind == "depth":
        return {"order": ["depth"], "depth": depth, "width": None, "seed": 1234, "optimizer": "reset"}
    if kind == "width":
        return {"order": ["width"], "depth": None, "width": width, "seed": 1234, "optimizer": "reset"}
    return {"order": ["depth", "width"], "depth": depth, "width": width, "seed": 1234, "optimizer": "reset"}


def recipe_dict(model: dict, kind: str) -> dict:
    return {"model": dict(model), "growth": growth_section(kind)}


def size_model(kind: str, target_bytes: float, bytes_per_param: int = 4) -> tuple[dict, object, object]:
    """The source model dict whose grown size (``bytes_per_param`` per parameter) is closest to ``target_bytes``."""
    from megatron_grow.config.loader import load_recipe
    from megatron_grow.models.params import count_params

    def plan_for(model: dict):
        from megatron_grow.growth.plan import make_growth_plan

        recipe = load_recipe(raw=recipe_dict(model, kind))
        return recipe, make_growth_plan(recipe.model, recipe.growth)

    def grown_bytes(model: dict) -> int:
        return bytes_per_param * count_params(plan_for(model)[1].target).total

    # layers first (at the 1/4-scale FFN), then the expert FFN width in steps of 16 to land on target
    # at least 2 source layers (a 1-layer source once failed to grow with 1 rank; see docs/benchmarks.md)
    best = None
    for layers in range(2, 65):
        model = dict(PAPER_SHAPE, num_layers=layers)
        b = grown_bytes(model)
        if best is None or abs(b - target_bytes) < abs(best[1] - target_bytes):
            best = (layers, b)
        if b > target_bytes:
            break
    layers = best[0]
    best = None
    for ffn in range(16, 1025, 16):
        model = dict(PAPER_SHAPE, num_layers=layers, moe_ffn_hidden_size=ffn)
        b = grown_bytes(model)
        if best is None or abs(b - target_bytes) < abs(best[1] - target_bytes):
            best = (ffn, b)
    model = dict(PAPER_SHAPE, num_layers=layers, moe_ffn_hidden_size=best[0])
    recipe, plan = plan_for(model)
    return model, recipe, plan


# ------------------------------------------------------------------------------------------------
# Bodies that run in their own process


def build_source_body(model_dict: dict, root: str, seed: int, dtype: str = "fp32") -> dict:
    """Runs in one gloo process (run_in_processes): save a random source checkpoint with a manifest.

    The model is built on the meta device and every tensor is drawn while the streaming writer
    (``checkpoint.streaming``) writes it, so a 16 GiB source needs no 16 GiB of memory: weights
    N(0, init_method_std^2) from a generator seeded by the tensor's name and offset, norms 1, a
    trained-looking expert bias N(0, 0.05^2) (fp32, as Megatron-Core keeps it). ``dtype="bf16"`` stores
    the weights in bf16, as real training checkpoints do."""
    import hashlib

    import torch
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from megatron_grow.checkpoint import io
    from megatron_grow.checkpoint.manifest import build_manifest
    from megatron_grow.checkpoint.megatron_args import common_state
    from megatron_grow.config.schema import ModelConfig, ParallelConfig
    from megatron_grow.models.builder import build_model_chunks
    from megatron_grow.parallel.init import initialize_distributed

    model = ModelConfig(**model_dict)
    initialize_distributed(ParallelConfig(), seed=seed)
    t0 = time.perf_counter()
    params_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    chunks = build_model_chunks(model, meta=True, params_dtype=params_dtype)
    state = io.model_sharded_state_dict(chunks)
    apply_factories(state)
    for st in io.iter_sharded_tensors(state):
        st.data = st.data.to("meta")

    def produce(st):
        text = f"{seed}|{st.key}|{tuple(st.global_offset)}".encode()
        g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1)
        if "layernorm" in st.key or "layer_norm" in st.key or st.key.endswith("final_layernorm.weight"):
            return torch.ones(st.local_shape, dtype=st.dtype)
        std = 0.05 if st.key.endswith("expert_bias") else model.init_method_std
        return torch.randn(st.local_shape, generator=g, dtype=torch.float32).mul_(std).to(st.dtype)

    t_build = time.perf_counter() - t0
    counters = {"iteration": 1000, "consumed_samples": 16000, "consumed_tokens": 16000 * model.seq_length,
                "flops_so_far": 1.0e18, "sunk_flops": 0}
    manifest = build_manifest(model=model, layout=dict(tp=1, pp=1, ep=1, etp=1, dp=1, world_size=1),
                              counters=counters, lineage=[])
    t1 = time.perf_counter()
    state.update(common_state(counters, manifest))
    final = io.save_checkpoint(root, 1000, state, manifest, produce=produce)
    return {"dir": final, "build_s": t_build, "save_s": time.perf_counter() - t1}


def naive_main(src: str, dst: str, recipe_path: str, out_json: str) -> None:
    """The naive algorithm in this process: whole source in memory, plain-tensor growth, save."""
    t_start = time.perf_counter()
    phases = {}
    import torch

    from megatron_grow.checkpoint import io, paths
    from megatron_grow.checkpoint.manifest import build_manifest
    from megatron_grow.checkpoint.megatron_args import common_state
    from megatron_grow.config.loader import load_recipe, recipe_to_dict
    from megatron_grow.config.schema import ParallelConfig
    from megatron_grow.growth.plan import make_growth_plan
    from megatron_grow.growth.reference import grow_state_dict
    from megatron_grow.models.builder import build_gpt_model
    from megatron_grow.parallel.init import destroy_distributed, initialize_distributed
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # this process is an entry point too
    torch.set_num_threads(os.cpu_count() or 1)
    phases["import"] = time.perf_counter() - t_start
    t0 = time.perf_counter()

    def mark(name, since):
        phases[name] = time.perf_counter() - since
        return time.perf_counter()

    recipe = load_recipe(recipe_path)
    plan = make_growth_plan(recipe.model, recipe.growth)
    initialize_distributed(ParallelConfig(), seed=1234)
    t = mark("init", t0)
    source = build_gpt_model(plan.source)
    t = mark("build_source", t)
    ckpt, it = paths.resolve_checkpoint_dir(src)
    io.load_checkpoint(ckpt, io.model_sharded_state_dict([source]))
    t = mark("load", t)
    source_sd = source.state_dict()
    grown_sd = grow_state_dict(source_sd, plan)
    del source_sd, source
    t = mark("grow", t)
    target = build_gpt_model(plan.target)
    t = mark("build_target", t)
    target.load_state_dict(grown_sd, strict=True)
    del grown_sd
    t = mark("load_state_dict", t)
    manifest = build_manifest(model=plan.target, recipe=recipe_to_dict(recipe),
                              layout=dict(tp=1, pp=1, ep=1, etp=1, dp=1, world_size=1),
                              counters={"iteration": it}, lineage=[])
    state = io.model_sharded_state_dict([target])
    state.update(common_state({"iteration": it}, manifest))
    final = io.save_checkpoint(dst, it, state, manifest)
    t = mark("save", t)
    phases["grow_total"] = time.perf_counter() - t0
    destroy_distributed()
    src_bytes = io.checkpoint_bytes(ckpt)
    with open(out_json, "w") as f:
        json.dump({"phases": phases, "grown": final, "bytes_read": src_bytes,
                   "bytes_written": io.checkpoint_bytes(final)}, f)


# ------------------------------------------------------------------------------------------------
# Measurement helpers


class RssPoller:
    """Polls a process tree every 50 ms: peak RSS per PID, peak total PSS, last I/O counters.

    Workers are the root's direct children that carry a RANK (torchrun's workers), or the root
    itself with ``include_root``. Their own descendants (the checkpoint writer forks them, and
    forked pages are shared copy-on-write, so their RSS double-counts) are charged to the total
    PSS only, which is the honest whole-run footprint (sampled every 4th poll: it reads smaps).
    """

    def __init__(self, root_pid: int, include_root: bool):
        import psutil

        self.psutil = psutil
        self.root = psutil.Process(root_pid)
        self.include_root = include_root
        self.peak: dict[int, int] = {}
        self.rank: dict[int, str] = {}
        self.ppid: dict[int, int] = {}
        self.io: dict[int, tuple] = {}
        self.peak_pss_total = 0
        self.peak_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _procs(self):
        try:
            procs = self.root.children(recursive=True)
        except self.psutil.Error:
            return []
        return [self.root] + procs

    def _run(self):
        while not self._stop.is_set():
            pss_total, with_pss = 0, self.samples % 4 == 0
            procs = self._procs()
            self.peak_procs = max(self.peak_procs, len(procs))
            for p in procs:
                try:
                    if p.pid not in self.rank:
                        self.rank[p.pid] = p.environ().get("RANK", "-")
                        self.ppid[p.pid] = p.ppid()
                    rss = p.memory_info().rss
                    if with_pss:
                        pss_total += p.memory_full_info().pss
                    io_c = p.io_counters()
                    self.io[p.pid] = (io_c.read_chars, io_c.write_chars, io_c.read_bytes, io_c.write_bytes)
                except self.psutil.Error:
                    continue
                self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            if with_pss:
                self.peak_pss_total = max(self.peak_pss_total, pss_total)
            self.samples += 1
            time.sleep(POLL_S)

    def workers(self) -> dict:
        """rank -> worker pid."""
        if self.include_root:
            return {"0": self.root.pid}
        return {self.rank[pid]: pid for pid in self.peak
                if self.ppid.get(pid) == self.root.pid and self.rank.get(pid, "-") != "-"}

    def worker_peaks(self) -> dict:
        return {r: self.peak[pid] for r, pid in self.workers().items()}

    def worker_io(self) -> dict:
        return {r: self.io.get(pid) for r, pid in self.workers().items()}


def run_polled(cmd: list[str], env: dict | None = None, include_root: bool = False) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO)
    with RssPoller(proc.pid, include_root) as poller:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(out)
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return {"wall_s": wall, "output": out, "poller": poller}


def parse_summary(text: str) -> dict:
    def grab(pattern, cast=float):
        m = re.search(pattern, text)
        return cast(m.group(1).replace(",", "")) if m else None

    m = re.search(r"time\s+([\d.]+)s \(stats ([\d.]+)s, load ([\d.]+)s, save ([\d.]+)s", text)
    return {
        "bytes_read": grab(r"bytes read \(all ranks\)\s+([\d,.]+) MiB") * MiB,
        "bytes_written": grab(r"bytes written\s+([\d,.]+) MiB") * MiB,
        "bytes_sent_between_ranks": (grab(r"and ([\d,.]+) MiB of it sent between ranks") or 0.0) * MiB,
        "seconds": float(m.group(1)), "stats_seconds": float(m.group(2)),
        "load_seconds": float(m.group(3)), "save_seconds": float(m.group(4)),
    }


def idle_rss() -> int:
    code = ("import psutil, torch, megatron.core, megatron_grow.growth.grow, megatron_grow.models.builder, "
            "megatron_grow.cli.grow; print(psutil.Process().memory_info().rss)")
    return int(subprocess.check_output([sys.executable, "-c", code], cwd=REPO, text=True).strip().splitlines()[-1])


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def time_cp(src_dir: str, dst_dir: str) -> float:
    if os.path.exists(dst_dir):
        shutil.rmtree(dst_dir)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", src_dir, dst_dir], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst_dir)
    return seconds


def disk_write_main(directory: str, nbytes: str) -> None:
    """One process of the disk floor: ``nbytes`` from one reused page-aligned 16 MiB buffer, ``O_DIRECT``
    (as the grow writes; plain writes where the filesystem refuses), then fsync."""
    import mmap

    buf = mmap.mmap(-1, 16 * MiB)
    buf.write(b"\1" * len(buf))
    path = os.path.join(directory, f"floor_{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:  # no O_DIRECT (another OS, or a filesystem refusing it): plain writes, as the grow falls back to
        fd = os.open(path, flags | os.O_DIRECT, 0o644)
    except (AttributeError, OSError):
        fd = os.open(path, flags, 0o644)
    left = int(nbytes)
    with memoryview(buf) as view:
        while left > 0:
            left -= os.write(fd, view[:min(len(view), -(-left // 4096) * 4096)])
    os.fsync(fd)
    os.close(fd)


def time_disk_write(directory: str, nbytes: int, procs: int) -> float:
    """Seconds for ``procs`` processes to write ``nbytes`` in all the way the grow writes (no CPU work):
    the disk's floor for the grown checkpoint, measured right after its ``cp``."""
    os.makedirs(directory, exist_ok=True)
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "_disk_write", directory,
                                 str(nbytes // procs)]) for _ in range(procs)]
    if any(w.wait() for w in workers):
        raise RuntimeError("the disk-write floor failed")
    seconds = time.perf_counter() - t0
    shutil.rmtree(directory)
    return seconds


def torchrun() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return cand if os.path.exists(cand) else "torchrun"


# ------------------------------------------------------------------------------------------------
# The benchmark


def fmt_table(rows: list[dict], headers: tuple) -> str:
    headers = list(headers)
    body = [[str(r.get(h, "")) for h in headers] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
    numeric = set(headers[5:])

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if h in numeric else c.ljust(w)
                                 for c, w, h in zip(cells, widths, headers)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if h in numeric else ("-" * (w + 2))
                         for w, h in zip(widths, headers)) + "|"
    return "\n".join([line(headers), sep] + [line(b) for b in body])


TABLE_HEADERS = ("grown GiB", "growth", "source", "method", "ranks", "wall s", "grow s", "load 1m",
                 "read MiB", "read / source", "sent between ranks MiB", "written MiB", "peak RSS/rank MiB",
                 "share/rank MiB",
                 "RSS / (1.5 share + 300 MB)", "peak PSS all procs MiB", "grow s / cp s", "wall s / cp s",
                 "disk write s", "grow s / disk s")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# The goals of issue 26 (2 ranks): grow phase and whole command against cp -r + sync of the grown
# checkpoint, peak RSS per rank against its budget, bytes read against the source's bytes.
GOAL_GROW_X, GOAL_WALL_X, GOAL_WALL_AT_GIB, GOAL_READ_X = 1.2, 1.5, 16, 1.05
GOAL_RSS_SHARE, GOAL_RSS_MB = 1.5, 300e6


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target-gib", type=float, nargs="+", default=[1.0],
                    help="sizes of the grown checkpoint, in the first --source-dtypes entry's dtype (one run each)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--growth", nargs="+", choices=("depth", "width", "depth_width"), default=["depth"])
    ap.add_argument("--source-dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                    help="source checkpoints to grow, one after the other (each grown in its own dtype)")
    ap.add_argument("--workdir", default="/tmp/megatron_grow_bench")
    ap.add_argument("--skip-naive", action="store_true", help="do not run the naive baseline")
    ap.add_argument("--keep", action="store_true", help="keep the sources and grown checkpoints (default: delete)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration (the fastest is reported)")
    ap.add_argument("--hf", action="store_true",
                    help="also time import-hf / export-hf against transformers' load + save (a ~230M Qwen3-MoE)")
    return ap.parse_args(argv)


def model_description(kind: str, plan, dtype: str) -> str:
    from megatron_grow.models.params import count_params

    src_params, tgt_params = count_params(plan.source).total, count_params(plan.target).total
    src_expert = count_params(plan.source).expert
    s, t, nb = plan.source, plan.target, DTYPE_BYTES[dtype]
    return (f"model: {kind} growth, source {s.num_layers} layers x {s.num_moe_experts} experts "
            f"(top-{s.moe_router_topk}) -> target {t.num_layers} layers x {t.num_moe_experts} experts "
            f"(top-{t.moe_router_topk}); hidden {s.hidden_size}, 16 heads / 4 groups x kv {s.kv_channels}, "
            f"expert FFN {s.moe_ffn_hidden_size} (SwiGLU), vocab {s.vocab_size}; params {src_params:,} -> "
            f"{tgt_params:,} ({nb * src_params / GiB:.2f} GiB -> {nb * tgt_params / GiB:.2f} GiB {dtype}; "
            f"experts {100 * src_expert / src_params:.0f}% of the source)")


def ensure_source(wd: str, kind: str, model: dict, dtype: str) -> str:
    """The synthetic source checkpoint (reused when it matches)."""
    from megatron_grow.parallel.spawn import run_in_processes

    src_root = os.path.join(wd, f"src_{kind}" + ("" if dtype == "fp32" else f"_{dtype}"))
    stamp = os.path.join(src_root, "bench_model.json")
    wanted = dict(model, _source_dtype=dtype, _builder="streaming")
    if os.path.isfile(stamp) and json.load(open(stamp)) == wanted:
        print(f"reusing source checkpoint {src_root}", flush=True)
        return src_root
    shutil.rmtree(src_root, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_in_processes(build_source_body, 1, (model, src_root, 1234, dtype), timeout=3600)[0]
    print(f"built {dtype} source checkpoint {res['dir']} in {time.perf_counter() - t0:.1f}s "
          f"(meta build {res['build_s']:.1f}s, streaming save {res['save_s']:.1f}s)", flush=True)
    with open(stamp, "w") as f:
        json.dump(wanted, f)
    return src_root


def grow_runs(args, wd: str, src_root: str, recipe_path: str, n_experts: int, tag: str) -> tuple[list, list]:
    """``megatron_grow grow`` under torchrun for every rank count; each followed by cp -r + sync."""
    runs, cp_times = [], []
    for n in args.ranks:
        ep = n if n_experts % n == 0 else 1
        layout_name = f"EP={ep}" + (f" DP={n}" if ep == 1 and n > 1 else "")
        best = None
        for rep in range(args.repeat):
            dst = os.path.join(wd, f"grown_{tag}_n{n}")
            shutil.rmtree(dst, ignore_errors=True)
            cmd = [torchrun(), "--standalone", "--nproc-per-node", str(n), "-m", "megatron_grow", "grow",
                   "--load", src_root, "--save", dst, "--recipe", recipe_path, "--no-verify", "--quiet",
                   "--expert-model-parallel-size", str(ep)]
            subprocess.run(["sync"], check=True)
            print(f"[{tag}] grow with {n} rank(s), {layout_name} (run {rep + 1}/{args.repeat}) ...", flush=True)
            load = os.getloadavg()[0]
            r = run_polled(cmd)
            run = grow_record(r, n, layout_name, dst)
            run["load"] = max(load, os.getloadavg()[0])
            run["cp_s"] = time_cp(dst, os.path.join(wd, "cp_copy"))
            run["cp_load"] = os.getloadavg()[0]
            run["disk_s"] = time_disk_write(os.path.join(wd, "disk_floor"), run["grown_bytes"], n)
            cp_times.append((run["cp_s"], run["cp_load"]))
            peaks = ", ".join(f"r{k}={v / MiB:.0f}" for k, v in sorted(run["peak_rss_by_rank"].items()))
            print(f"  wall {run['wall_s']:.1f}s, grow {run['summary']['seconds']:.1f}s (load {run['load']:.2f}); "
                  f"peak RSS/rank {peaks}"
                  + f" MiB; cp -r + sync of the result {run['cp_s']:.2f}s (load {run['cp_load']:.2f}); the same bytes "
                  f"written by {n} process(es), O_DIRECT + fsync: {run['disk_s']:.2f}s", flush=True)
            runs.append(run)
            if best is None or run["summary"]["seconds"] < best["summary"]["seconds"]:
                best = run
            if not args.keep:
                shutil.rmtree(dst, ignore_errors=True)
        best["best"] = True
    return runs, cp_times


def grow_record(r: dict, n: int, layout_name: str, dst: str) -> dict:
    return {"method": "grow", "ranks": n, "layout": layout_name, "wall_s": r["wall_s"],
            "summary": parse_summary(r["output"]), "peak_rss_by_rank": r["poller"].worker_peaks(),
            "peak_pss_total": r["poller"].peak_pss_total, "samples": r["poller"].samples,
            "procs": r["poller"].peak_procs, "proc_io_by_rank": r["poller"].worker_io(),
            "grown_bytes": dir_bytes(dst), "output": r["output"][-4000:]}


def naive_run(wd: str, src_root: str, recipe_path: str, tag: str, keep: bool) -> dict:
    dst = os.path.join(wd, f"naive_{tag}")
    shutil.rmtree(dst, ignore_errors=True)
    out_json = os.path.join(wd, f"naive_phases_{tag}.json")
    print(f"[{tag}] naive baseline (1 process, whole model in memory) ...", flush=True)
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    r = run_polled([sys.executable, os.path.abspath(__file__), "_naive", src_root, dst, recipe_path, out_json],
                   include_root=True)
    naive = json.load(open(out_json))
    peak = r["poller"].worker_peaks()["0"]
    print(f"  wall {r['wall_s']:.1f}s, grow {naive['phases']['grow_total']:.1f}s ("
          + ", ".join(f"{k} {v:.1f}" for k, v in naive["phases"].items() if k != "grow_total")
          + f"); peak RSS {peak / MiB:.0f} MiB", flush=True)
    if not keep:
        shutil.rmtree(dst, ignore_errors=True)
    return {"method": "naive", "ranks": 1, "layout": "whole model", "wall_s": r["wall_s"],
            "phases": naive["phases"], "bytes_read": naive["bytes_read"], "bytes_written": naive["bytes_written"],
            "peak_rss": peak, "peak_pss_total": r["poller"].peak_pss_total, "best": True,
            "load": max(load, os.getloadavg()[0])}


def table_rows(d: dict) -> list[dict]:
    cp_s, grown_bytes, src_bytes = d["cp_s"], d["grown_bytes"], d["source_bytes"]
    first = {"grown GiB": f"{grown_bytes / GiB:.1f}", "growth": d["growth"], "source": d["dtype"]}
    rows = [dict(first, **{"method": "cp -r + sync", "ranks": "1", "wall s": f"{cp_s:.2f}", "grow s": f"{cp_s:.2f}",
                           "load 1m": f"{d['cp_load']:.2f}", "read MiB": f"{grown_bytes / MiB:.0f}",
                           "written MiB": f"{grown_bytes / MiB:.0f}", "grow s / cp s": "1.00",
                           "wall s / cp s": "1.00"})]
    for run in d["runs"]:
        if not run.get("best"):
            continue
        n = run["ranks"]
        share = grown_bytes / n
        if run["method"] == "grow":
            sm, peak = run["summary"], max(run["peak_rss_by_rank"].values())
            grow_s, read, written = sm["seconds"], sm["bytes_read"], sm["bytes_written"]
            label = f"streaming grow ({run['layout']})"
        else:
            peak, grow_s, label = run["peak_rss"], run["phases"]["grow_total"], "naive (whole model, 1 proc)"
            read, written = run["bytes_read"], run["bytes_written"]
        rows.append(dict(first, **{
            "method": label, "ranks": str(n), "wall s": f"{run['wall_s']:.1f}", "grow s": f"{grow_s:.2f}",
            "load 1m": f"{run['load']:.2f}", "read MiB": f"{read / MiB:.0f}",
            "read / source": f"{read / src_bytes:.2f}",
            "sent between ranks MiB": (f"{run['summary']['bytes_sent_between_ranks'] / MiB:.0f}"
                                       if run["method"] == "grow" else "-"),
            "written MiB": f"{written / MiB:.0f}", "peak RSS/rank MiB": f"{peak / MiB:.0f}",
            "share/rank MiB": f"{share / MiB:.0f}",
            "RSS / (1.5 share + 300 MB)": f"{peak / (GOAL_RSS_SHARE * share + GOAL_RSS_MB):.2f}",
            "peak PSS all procs MiB": f"{run['peak_pss_total'] / MiB:.0f}",
            "grow s / cp s": f"{grow_s / cp_s:.2f}", "wall s / cp s": f"{run['wall_s'] / cp_s:.2f}",
            "disk write s": f"{run['disk_s']:.2f}" if "disk_s" in run else "-",
            "grow s / disk s": f"{grow_s / run['disk_s']:.2f}" if "disk_s" in run else "-"}))
    return rows


def goal_lines(d: dict) -> list[str]:
    """The issue's goals for the 2-rank run of this size, growth and source."""
    two = next((r for r in d["runs"] if r.get("best") and r["method"] == "grow" and r["ranks"] == 2), None)
    if two is None:
        return []
    cp_s = d["cp_s"]
    grow_x, wall_x = two["summary"]["seconds"] / cp_s, two["wall_s"] / cp_s
    rss = max(two["peak_rss_by_rank"].values()) / (GOAL_RSS_SHARE * d["grown_bytes"] / 2 + GOAL_RSS_MB)
    read_x = two["summary"]["bytes_read"] / d["source_bytes"]
    verdict = lambda ok: "met" if ok else "NOT met"
    at_size = d["grown_bytes"] >= 0.9 * GOAL_WALL_AT_GIB * GiB
    wall_goal = (f"(<= {GOAL_WALL_X}: {verdict(wall_x <= GOAL_WALL_X)})" if at_size
                 else f"(goal <= {GOAL_WALL_X} at {GOAL_WALL_AT_GIB} GiB only)")
    return [f"goals ({d['grown_bytes'] / GiB:.1f} GiB {d['growth']}, {d['dtype']} source, 2 ranks): grow phase "
            f"{grow_x:.2f}x cp (<= {GOAL_GROW_X}: {verdict(grow_x <= GOAL_GROW_X)}); whole command {wall_x:.2f}x cp "
            f"{wall_goal}; peak RSS/rank {rss:.2f}x (1.5 share + 300 MB) (<= 1: {verdict(rss <= 1)}); bytes read "
            f"{read_x:.2f}x source (<= {GOAL_READ_X}: {verdict(read_x <= GOAL_READ_X)}); grow phase "
            f"{two['summary']['seconds'] / two['disk_s']:.2f}x the disk's floor ({two['disk_s']:.1f} s); load average "
            f"{two['load']:.2f} (grow), {d['cp_load']:.2f} (cp)"]


def bench_source(args, wd: str, kind: str, model: dict, recipe_path: str, n_experts: int, dtype: str) -> dict:
    src_root = ensure_source(wd, kind, model, dtype)
    tag = f"{kind}_{dtype}"
    runs, cp_times = grow_runs(args, wd, src_root, recipe_path, n_experts, tag)
    if not args.skip_naive:
        runs.append(naive_run(wd, src_root, recipe_path, tag, args.keep))
    grown_bytes = next(r["grown_bytes"] for r in runs if r["method"] == "grow")
    cp_s, cp_load = min(cp_times)
    d = {"dtype": dtype, "growth": kind, "source_bytes": dir_bytes(src_root), "runs": runs, "cp_s": cp_s,
         "cp_load": cp_load, "cp_s_all": cp_times, "grown_bytes": grown_bytes}
    if not args.keep:
        shutil.rmtree(src_root, ignore_errors=True)  # the disk holds one size at a time
    return dict(d, rows=table_rows(d), goals=goal_lines(d))


def bench_size(args, wd: str, gib: float, kind: str) -> tuple[str, list[dict]]:
    import yaml

    model, _, plan = size_model(kind, gib * GiB, DTYPE_BYTES[args.source_dtypes[0]])
    recipe_path = os.path.join(wd, f"recipe_{kind}_{gib:g}.yaml")
    with open(recipe_path, "w") as f:
        f.write("# written by benchmarks/grow_bench.py: model = the synthetic source, growth = the paper's\n")
        yaml.safe_dump(recipe_dict(model, kind), f, sort_keys=False)
    line = model_description(kind, plan, args.source_dtypes[0])
    print(line, flush=True)
    return line, [bench_source(args, wd, kind, model, recipe_path, plan.target.num_moe_experts, dtype)
                  for dtype in args.source_dtypes]


# ------------------------------------------------------------------------------------------------
# HF conversion: import-hf / export-hf against transformers' own load + save of the same model

# Qwen3-MoE at about the held-out size (~230M parameters, one bf16 safetensors file).
HF_ARCH = "Qwen3MoeForCausalLM"
HF_SHAPE = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=6, num_attention_heads=16,
                num_key_value_heads=4, head_dim=64, num_experts=32, moe_intermediate_size=256,
                intermediate_size=256, num_experts_per_tok=4, max_position_embeddings=4096)
HF_HEADERS = ("step", "wall s", "work s", "load 1m", "/ transformers (wall)", "/ transformers (work)",
              "/ cp (wall)")


def hf_make(out_dir: str) -> None:
    """A random bf16 Qwen3-MoE written with ``save_pretrained`` (one file)."""
    import torch

    from megatron_grow.interop.hf.tiny import make_tiny_model

    model = make_tiny_model(HF_ARCH, 0, **HF_SHAPE).to(torch.bfloat16)
    model.save_pretrained(out_dir, max_shard_size="4GB")


def hf_roundtrip(src: str, out: str, out_json: str) -> None:
    """transformers' own conversion work: ``from_pretrained`` (stored dtype) + ``save_pretrained``."""
    t0 = time.perf_counter()
    import transformers as T

    t1 = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    model.save_pretrained(out, max_shard_size="4GB")
    with open(out_json, "w") as f:
        json.dump({"import_s": t1 - t0, "work_s": time.perf_counter() - t1}, f)


def timed(cmd: list[str]) -> tuple[float, str, float]:
    """Wall seconds of ``cmd`` followed by ``sync`` (the files on disk), its output, the load average."""
    subprocess.run(["sync"], check=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, text=True, capture_output=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stdout + r.stderr)
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}")
    return seconds, r.stdout + r.stderr, max(load, os.getloadavg()[0])


def work_seconds(output: str) -> float | None:
    """The conversion's own time from the CLI's summary (its ``time  N.NNs`` line), else None."""
    m = re.search(r"^\s*time\s+([\d.]+)s", output, re.M)
    return float(m.group(1)) if m else None


def hf_bench(wd: str) -> tuple[str, list[str], dict]:
    base = os.path.join(wd, "hf")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    src, tf_out, root, exported = (os.path.join(base, n) for n in ("src", "tf_out", "imported", "exported"))
    me = [sys.executable, os.path.abspath(__file__)]
    subprocess.run(me + ["_hf_make", src], check=True, cwd=REPO, capture_output=True)
    src_bytes = dir_bytes(src)
    cp_s = time_cp(src, os.path.join(base, "cp_copy"))
    cp_load = os.getloadavg()[0]
    tf_json = os.path.join(base, "tf.json")
    tf_s, _, tf_load = timed(me + ["_hf_roundtrip", src, tf_out, tf_json])
    tf_work = json.load(open(tf_json))["work_s"]
    cli = [sys.executable, "-m", "megatron_grow"]
    imp_s, imp_out, imp_load = timed(cli + ["import-hf", "--hf-dir", src, "--save", root, "--quiet"])
    exp_s, exp_out, exp_load = timed(cli + ["export-hf", "--load", root, "--hf-dir", exported, "--quiet"])
    imp_work, exp_work = work_seconds(imp_out), work_seconds(exp_out)
    rows = [
        {"step": "cp -r + sync of the HF files", "wall s": f"{cp_s:.2f}", "load 1m": f"{cp_load:.2f}"},
        {"step": "transformers from_pretrained + save_pretrained", "wall s": f"{tf_s:.2f}",
         "work s": f"{tf_work:.2f}", "load 1m": f"{tf_load:.2f}", "/ transformers (wall)": "1.00",
         "/ transformers (work)": "1.00", "/ cp (wall)": f"{tf_s / cp_s:.1f}"},
    ]
    for step, wall, work, load in (("megatron-grow import-hf", imp_s, imp_work, imp_load),
                                   ("megatron-grow export-hf", exp_s, exp_work, exp_load)):
        rows.append({"step": step, "wall s": f"{wall:.2f}", "work s": f"{work:.2f}" if work else "?",
                     "load 1m": f"{load:.2f}", "/ transformers (wall)": f"{wall / tf_s:.2f}",
                     "/ transformers (work)": f"{work / tf_work:.2f}" if work else "?",
                     "/ cp (wall)": f"{wall / cp_s:.1f}"})
    verdict = lambda x: "met" if x <= 1.0 else "NOT met"
    goals = [f"goal (HF, {src_bytes / MiB:.0f} MiB bf16 Qwen3-MoE): import-hf {imp_s / tf_s:.2f}x transformers "
             f"load + save, wall (<= 1.0: {verdict(imp_s / tf_s)}); export-hf {exp_s / tf_s:.2f}x "
             f"(<= 1.0: {verdict(exp_s / tf_s)})"]
    shutil.rmtree(base, ignore_errors=True)
    return fmt_table(rows, HF_HEADERS), goals, {"rows": rows, "src_bytes": src_bytes, "import_output": imp_out[-3000:],
                                                "export_output": exp_out[-3000:]}


def main(argv=None) -> int:
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # an entry point: CPU mode is installed here, a no-op with CUDA
    args = parse_args(argv)
    import psutil

    wd = os.path.abspath(args.workdir)
    os.makedirs(wd, exist_ok=True)
    idle = idle_rss()
    print(f"idle process (imports torch + megatron.core + megatron_grow): RSS {idle / MiB:.0f} MiB", flush=True)
    load_before = os.getloadavg()
    model_lines, results = [], []
    for gib in args.target_gib:
        for kind in args.growth:
            line, per_dtype = bench_size(args, wd, gib, kind)
            model_lines.append(line)
            results += per_dtype
    hf_table, hf_goals, hf_record = hf_bench(wd) if args.hf else ("", [], {})
    load_after = os.getloadavg()
    table = fmt_table([row for d in results for row in d["rows"]], TABLE_HEADERS)
    print()
    for line in model_lines:
        print(line)
    for d in results:
        print(f"{d['growth']} {d['dtype']} source checkpoint {d['source_bytes'] / MiB:.0f} MiB, grown "
              f"{d['grown_bytes'] / MiB:.0f} MiB; cp -r + sync of the grown checkpoint {d['cp_s']:.2f}s "
              f"(min of {len(d['cp_s_all'])}, load {d['cp_load']:.2f})")
    print(f"idle process RSS (torch + megatron imports) {idle / MiB:.0f} MiB; load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)")
    print("wall s = whole subprocess (torchrun + imports + grow); grow s = the summary's time (grow_checkpoint: "
          "plan, meta build, statistics, streaming save incl. reads and fsync); load 1m = the 1-minute load "
          "average around the timing; read = every byte read from the source (all ranks); share/rank = grown "
          "bytes / ranks; peak RSS/rank = max over ranks of each worker's own RSS; peak PSS = whole process tree")
    print(table)
    for d in results:
        for line in d["goals"]:
            print(line)
    if hf_table:
        print("\nHF conversion (1 process each; wall = the whole command + sync, work = its own timer, no imports)")
        print(hf_table)
        for line in hf_goals:
            print(line)
    out = os.path.join(wd, f"results_{'_'.join(args.growth)}.json")
    with open(out, "w") as f:
        json.dump({"model_lines": model_lines, "growth": args.growth, "sizes_gib": args.target_gib,
                   "idle_rss": idle, "loadavg_before": load_before, "loadavg_after": load_after,
                   "machine": {"cpus": os.cpu_count(), "mem_gib": psutil.virtual_memory().total / GiB,
                               "platform": platform.platform(), "python": platform.python_version()},
                   "sources": results, "table": table, "hf_table": hf_table, "hf": hf_record,
                   "command": " ".join([os.path.relpath(sys.argv[0], REPO)] + (argv or sys.argv[1:]))},
                  f, indent=2, default=str)
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_naive":
        naive_main(*sys.argv[2:6])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_disk_write":
        disk_write_main(*sys.argv[2:4])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_hf_make":
        hf_make(sys.argv[2])
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_hf_roundtrip":
        hf_roundtrip(*sys.argv[2:5])
        sys.exit(0)
    sys.exit(main())
