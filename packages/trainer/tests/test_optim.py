import math

import pytest
import torch

from loom.trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_each_schedule():
    warm, total, floor = 4, 14, 0.1
    assert [lr_factor(s, "cosine", warm, total, floor) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(warm, total + 3):
        p = min(1.0, (s - warm) / (total - warm))
        assert lr_factor(s, "constant", warm, total, floor) == 1.0
        assert lr_factor(s, "linear", warm, total, floor) == pytest.approx(
            floor + (1 - floor) * (1 - p)
        )
        cos = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
        assert lr_factor(s, "cosine", warm, total, floor) == pytest.approx(cos)


def test_scheduler_drives_the_optimizer():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, 1e-2, (0.9, 0.95), 1e-8, 0.0, torch.device("cpu"))
    sched = build_scheduler(opt, "linear", 2, 6, 0.0)
    seen = []
    for _ in range(7):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([5e-3, 1e-2, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0.0])
