"""LR re-warmup after growth (``training.lr_rewarmup_iters``) through Megatron-Core's own
``OptimizerParamScheduler``: the LR at every step of a schedule restarted at a growth point against
the warmup-stable-decay formula written here (docs/training.md)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_grow.config.loader import load_recipe
from megatron_grow.training.optimizer import build_scheduler
from megatron_grow.training.resume import scheduler_differences

LR, MIN_LR = 1e-3, 1e-4


def _recipe(**training):
    return load_recipe(raw={"training": {"lr": LR, "min_lr": MIN_LR, **training}})


def _lrs(recipe, steps: int, restarted: bool) -> list[float]:
    """The LR MCore's scheduler gives after 0, 1, ..., steps calls of ``step(1)`` (a real torch AdamW)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    scheduler = build_scheduler(optimizer, recipe, steps, restarted=restarted)
    out = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        scheduler.step(1)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def _wsd(s: int, warmup: int, total: int, decay: int, style: str) -> float:
    """Warmup-stable-decay at step s of a schedule of ``total`` steps: linear 0 -> LR over ``warmup``
    steps, LR until ``total - decay``, then LR -> MIN_LR over the last ``decay`` steps."""
    if warmup and s <= warmup:
        return LR * s / warmup
    if s <= total - decay:
        return LR
    r = (s - (total - decay)) / decay
    coeff = 1 - r if style == "linear" else 0.5 * (math.cos(math.pi * r) + 1)
    return MIN_LR + coeff * (LR - MIN_LR)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_wsd_restarts_its_warmup_at_the_growth_step(style):
    # a base trained with a 10-step warmup, grown at iteration 40 of 100: the grown run's schedule spans
    # the 60 remaining steps, warms up again over 4, holds, and decays over the last 20.
    recipe = _recipe(train_iters=100, lr_decay_style="WSD", lr_warmup_iters=10, lr_rewarmup_iters=4,
                     lr_wsd_decay_iters=20, lr_wsd_decay_style=style)
    got = _lrs(recipe, 60, restarted=True)
    expected = [_wsd(s, 4, 60, 20, style) for s in range(61)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # a fresh (not restarted) schedule keeps the base warmup
    assert _lrs(recipe, 60, restarted=False) == pytest.approx([_wsd(s, 10, 60, 20, style) for s in range(61)],
                                                              rel=1e-12, abs=1e-15)


def test_rewarmup_zero_starts_at_the_peak_and_null_keeps_the_warmup():
    common = dict(train_iters=50, lr_decay_style="WSD", lr_warmup_iters=5, lr_wsd_decay_iters=10)
    assert _lrs(_recipe(**common, lr_rewarmup_iters=0), 30, True) == pytest.approx(
        [_wsd(s, 0, 30, 10, "linear") for s in range(31)], rel=1e-12, abs=1e-15)
    assert _lrs(_recipe(**common), 30, True) == pytest.approx(
        [_wsd(s, 5, 30, 10, "linear") for s in range(31)], rel=1e-12, abs=1e-15)


def test_resuming_a_grown_run_compares_against_the_rewarmup():
    recipe = _recipe(train_iters=100, lr_decay_style="WSD", lr_warmup_iters=10, lr_rewarmup_iters=4,
                     lr_wsd_decay_iters=20)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=LR)
    state = build_scheduler(optimizer, recipe, 60, restarted=True).state_dict()
    assert state["lr_warmup_steps"] == 4
    assert scheduler_differences(state, recipe, 40) == []                           # started at the growth point
    assert scheduler_differences(state, recipe, 0) == [("lr_warmup_iters", 4, 10), ("train_iters", 60, 100)]


def test_bounds():
    from megatron_grow.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _recipe(lr_rewarmup_iters=-1)
    assert "training.lr_rewarmup_iters: -1 is not allowed; must be >= 0" in str(err.value)
