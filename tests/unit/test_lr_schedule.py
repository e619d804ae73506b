"""The LR horizon handed to Megatron's scheduler (short debug runs of long recipes)."""

from __future__ import annotations

import pytest
import torch

from sophiavl_mcore.trainer.config import OptimConfig, check_schedule, decay_horizon


def test_constant_schedule_lets_a_short_run_end_inside_the_warmup() -> None:
    cfg = OptimConfig(lr=3e-4, min_lr=3e-4, warmup_steps=10, decay_style="constant")
    check_schedule(cfg, 6)  # would have been "warmup 10 >= horizon 6"
    assert decay_horizon(cfg, 6) == 11 and decay_horizon(cfg, 70) == 70
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
                                    lr_warmup_steps=cfg.warmup_steps,
                                    lr_decay_steps=decay_horizon(cfg, 6),
                                    lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=1, wd_incr_style="constant")
    lrs = []
    for _ in range(6):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == pytest.approx([cfg.lr * k / 10 for k in range(1, 7)])


def test_decaying_schedules_still_need_warmup_inside_the_run() -> None:
    cosine = OptimConfig(lr=1e-3, warmup_steps=10, decay_style="cosine")
    with pytest.raises(ValueError, match="warmup_steps=10 must be < the decay horizon 6"):
        check_schedule(cosine, 6)
    explicit = OptimConfig(lr=1e-3, warmup_steps=10, decay_style="constant", decay_steps=12)
    assert decay_horizon(explicit, 6) == 12 and decay_horizon(explicit, 100) == 12
