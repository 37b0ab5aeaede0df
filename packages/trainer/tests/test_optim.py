import math

import pytest
import torch

from loom.trainer.config import OptimConfig
from loom.trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_each_schedule():
    warm, total, floor = 4, 14, 0.1

    def factors(schedule, steps):
        optim = OptimConfig(schedule=schedule, warmup_steps=warm, min_lr_ratio=floor)
        return [lr_factor(s, optim, steps=total) for s in steps]

    assert factors("cosine", range(4)) == [0.25, 0.5, 0.75, 1.0]
    after = range(warm, total + 3)
    progress = [min(1.0, (s - warm) / (total - warm)) for s in after]
    assert factors("constant", after) == [1.0] * len(after)
    linear = [floor + (1 - floor) * (1 - p) for p in progress]
    assert factors("linear", after) == pytest.approx(linear)
    cosine = [floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)) for p in progress]
    assert factors("cosine", after) == pytest.approx(cosine)


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(2, 2)
    optim = OptimConfig(lr=1e-2, schedule="linear", warmup_steps=2, min_lr_ratio=0.0)
    opt = build_optimizer(model, optim, device=torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    sched = build_scheduler(opt, optim, steps=6)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
