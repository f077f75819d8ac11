"""Where a streaming grow's seconds go: a py-spy profile of its workers, summed per phase.

    py-spy record --subprocesses --idle -r 25 -f raw -o prof.txt -- \\
        torchrun --standalone --nproc-per-node 2 -m megatron_grow grow --load SRC --save DST --recipe R \\
        --no-verify --quiet --expert-model-parallel-size 2
    python benchmarks/pyspy_summary.py prof.txt

Prints a markdown table of thread-seconds per worker (rank order = PID order) and category: each
sample goes to the deepest frame that matches a pattern of ``CATS``; *writers* are the DCP writer
threads (``_write_files_from_queue``), *main* the rest. Used for docs/benchmarks.md (issue 26).
"""

import collections
import sys

RATE = 25.0
CATS = [  # checked from the leaf up: the deepest matching frame decides
    ("fsync", "fsync"),
    ("noise: randn + scale", "_expert_noise_fp32"),
    ("noise: add + round", "expert_tensor (megatron_grow/growth/operators/width.py"),
    ("finite check of reads", "check_finite"),
    ("stats: moments", "tensor_moments"),
    ("stats: experts sent between ranks", "_share_layer"),
    ("stats pass (reads, moments, all-reduce)", "expert_st"),
    ("read: DCP read_data + torch.load", "read_data"),
    ("read: region matching, casts", "_source (megatron_grow/growth/streamed.py"),
    ("write: serialise + write", "_write_item"),
    ("write: other writer-thread work", "_write_files_from_queue"),
    ("main waits for its writer threads", "_FileSystemWriter._write_data"),
    ("plan: MCore -> torch ShardedTensor conversion", "mcore_to_pyt_state_dict"),
    ("plan: DCP global plan + chunk check (rank 0)", "create_global_plan"),
    ("plan: local plan", "create_local_plan"),
    ("plan: plans gathered/scattered (pickle, wait)", "reduce_scatter"),
    ("after writing: waits for the other rank", "_DistWrapper.all_reduce"),
    ("plan: lazy write items", "streaming_save_plan"),
    ("save: rest of DCP save", "save_streaming"),
    ("save: common state, manifest, finalize", "save_checkpoint"),
    ("meta model, sharded state dict, tasks", "streaming_target"),
    ("imports", "_find_and_load"),
    ("torch.distributed init", "initialize_distributed"),
]


def main(path: str) -> None:
    per = collections.defaultdict(collections.Counter)
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        proc = next((f for f in frames[:3] if "megatron_grow grow" in f and "torchrun" not in f), None)
        if proc is None:
            continue
        cat = "other"
        for f in reversed(frames):
            hit = next((c for c, p in CATS if p in f), None)
            if hit:
                cat = hit
                break
        thread = "writers" if any("_write_files_from_queue" in f for f in frames) else "main"
        if thread == "writers" and cat == "other":
            cat = "write: other writer-thread work"
        per[proc.split(":")[0]][(thread, cat)] += int(n)
    pids = sorted(per)
    keys = sorted({k for p in pids for k in per[p]}, key=lambda k: (k[0] != "main", -sum(per[p][k] for p in pids)))
    print("| thread | where | " + " | ".join(f"rank {i}" for i in range(len(pids))) + " |")
    print("|---|---|" + "---:|" * len(pids))
    for k in keys:
        vals = [per[p][k] / RATE for p in pids]
        if max(vals) >= 0.3:
            print(f"| {k[0]} | {k[1]} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    print("| | total thread-seconds | " + " | ".join(f"{sum(per[p].values()) / RATE:.1f}" for p in pids) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
