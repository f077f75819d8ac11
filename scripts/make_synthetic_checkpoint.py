"""Write a synthetic run with a rising layer-wise weight-norm profile (see megatron_grow/analysis/synthetic.py).

    python scripts/make_synthetic_checkpoint.py --config configs/models/tiny.yaml --save /tmp/mg/base \
        --iterations 50,100,150,200,250,300 training.lr_decay_style=WSD training.train_iters=300 \
        training.lr_wsd_decay_iters=100 training.global_batch_size=512
"""

from __future__ import annotations

import argparse
import sys


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative iterations, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    from megatron_grow.platform import cpu

    cpu.apply_cpu_adaptations()  # an entry point: CPU mode is installed here, a no-op with CUDA
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="recipe whose model: and training: sections to use")
    parser.add_argument("--save", required=True, help="run directory to write iter_* checkpoints into")
    parser.add_argument("--iterations", type=_int_list, default=[100], metavar="N,N,...",
                        help="comma-separated iterations to save (default 100)")
    parser.add_argument("--slope", type=float, default=1.0, help="layer l's weights are scaled by 1 + slope * l")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    args = parser.parse_args(argv)

    from megatron_grow.analysis.synthetic import save_synthetic_run
    from megatron_grow.cli._errors import run_with_clean_errors
    from megatron_grow.config.loader import load_recipe

    def go(a):
        save_synthetic_run(load_recipe(a.config, a.overrides), a.save, a.iterations, a.slope)
        return 0
    return run_with_clean_errors(go, args)


if __name__ == "__main__":
    sys.exit(main())
