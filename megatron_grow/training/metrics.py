"""Metric sinks: a console line, tensorboard and wandb (each optional, rank 0 only).

wandb runs in the mode the recipe says (``offline`` by default, so no network is needed)
and only when ``logging.wandb_project`` is set.
"""

from __future__ import annotations

from megatron_grow.config.schema import LoggingConfig

_CONSOLE = [
    ("loss", "loss {:.4f}"), ("valid_loss", "valid loss {:.4f}"), ("lr", "lr {:.3e}"),
    ("grad_norm", "grad norm {:.3f}"), ("aux_loss", "aux {:.4f}"), ("tokens_per_s", "{:,.0f} tok/s"),
    ("tflops_per_gpu", "{:.1f} TFLOP/s/GPU"), ("mfu", "MFU {:.1%}"),
    ("expert_load_max", "load max {:.2f}"), ("expert_load_min", "min {:.2f}"),
    ("flops_so_far", "FLOPs {:.3e}"), ("sunk_flops", "(sunk {:.2e}"), ("new_flops", "new {:.2e})"),
]


class MetricSinks:
    def __init__(self, cfg: LoggingConfig):
        self.tb = None
        self.wandb = None
        if cfg.tensorboard_dir:
            # Lazy: optional sinks, imported only when configured (tensorboard 0.1 s, wandb 0.6 s measured).
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.wandb_project and cfg.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, mode=cfg.wandb_mode)

    def write(self, iteration: int, metrics: dict, prefix: str = "train") -> None:
        parts = [fmt.format(metrics[k]) for k, fmt in _CONSOLE if k in metrics]
        print(f"[{prefix}] iter {iteration:>7d} | " + " | ".join(parts), flush=True)
        for key, value in metrics.items():
            if self.tb is not None:
                self.tb.add_scalar(f"{prefix}/{key}", value, iteration)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step=iteration)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
