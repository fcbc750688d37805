"""LR and alpha schedules at hand-computed points."""
import json
import math

import pytest

from asyncfgd.runtime.schedules import ALPHA_PRESETS, LR_KINDS, AlphaSchedule, lr_at


def test_constant_lr():
    assert lr_at("constant", 0.1, 0, 100) == 0.1
    assert lr_at("constant", 0.1, 500, 100) == 0.1
    assert lr_at("constant", 0.1, 1, 100, warmup_steps=4) == pytest.approx(0.05)  # 0.1 * 2/4


def test_cosine_lr():
    assert lr_at("cosine", 0.2, 0, 100) == pytest.approx(0.2)
    assert lr_at("cosine", 0.2, 50, 100) == pytest.approx(0.1)
    assert lr_at("cosine", 0.2, 25, 100) == pytest.approx(0.1 * (1 + math.sqrt(0.5)))
    assert lr_at("cosine", 0.2, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert lr_at("cosine", 0.2, 150, 100) == pytest.approx(0.0, abs=1e-15)


def test_cosine_with_warmup():
    # warm-up 10 steps: 0.2 * (s+1)/10, then cosine over the remaining 90 steps
    assert lr_at("cosine", 0.2, 0, 100, warmup_steps=10) == pytest.approx(0.02)
    assert lr_at("cosine", 0.2, 9, 100, warmup_steps=10) == pytest.approx(0.2)
    assert lr_at("cosine", 0.2, 10, 100, warmup_steps=10) == pytest.approx(0.2)
    assert lr_at("cosine", 0.2, 55, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at("cosine", 0.2, 100, 100, warmup_steps=10) == pytest.approx(0.0, abs=1e-15)


def test_step_lr():
    assert lr_at("step", 1.0, 0, 100, step_size=30) == 1.0
    assert lr_at("step", 1.0, 29, 100, step_size=30) == 1.0
    assert lr_at("step", 1.0, 30, 100, step_size=30) == pytest.approx(0.1)
    assert lr_at("step", 1.0, 95, 100, step_size=30, gamma=0.5) == pytest.approx(0.125)
    assert lr_at("step", 1.0, 34, 100, warmup_steps=5, step_size=30) == 1.0  # counted after warm-up
    assert lr_at("step", 1.0, 35, 100, warmup_steps=5, step_size=30) == pytest.approx(0.1)


def test_lr_errors():
    with pytest.raises(ValueError, match="constant.*cosine.*step"):
        lr_at("linear", 0.1, 0, 10)
    with pytest.raises(ValueError, match="step_size"):
        lr_at("step", 0.1, 0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at("cosine", 0.1, 20, 10, warmup_steps=10)
    with pytest.raises(ValueError):
        lr_at("constant", -0.1, 0, 10)
    with pytest.raises(ValueError):
        lr_at("constant", 0.1, -1, 10)
    assert set(LR_KINDS) == {"constant", "cosine", "step"}


def test_uniform_and_head_only():
    u = AlphaSchedule("uniform", value=0.3)
    assert [u.alpha(k, 4, 7.5) for k in range(4)] == [0.3] * 4
    assert u.frozen_prefix(4, 0.0) == 0
    h = AlphaSchedule("head-only")
    assert [h.alpha(k, 4, e) for e in (0.0, 100.0) for k in range(4)] == [0, 0, 0, 1] * 2
    assert h.frozen_prefix(4, 50.0) == 3
    assert AlphaSchedule("uniform", value=0.0).frozen_prefix(3, 0.0) == 3


def test_paper_schedule():
    p = AlphaSchedule("paper")  # warm 10 epochs, ramp 5 epochs to 0.15
    assert p.alpha(3, 4, 0.0) == 1.0 and p.alpha(3, 4, 12.0) == 1.0
    assert p.alpha(0, 4, 9.99) == 0.0
    assert p.alpha(0, 4, 10.0) == 0.0
    assert p.alpha(1, 4, 12.5) == pytest.approx(0.075)
    assert p.alpha(2, 4, 11.0) == pytest.approx(0.03)
    assert p.alpha(0, 4, 15.0) == pytest.approx(0.15)
    assert p.alpha(0, 4, 40.0) == pytest.approx(0.15)
    assert p.frozen_prefix(4, 3.0) == 3
    assert p.frozen_prefix(4, 10.0) == 3
    assert p.frozen_prefix(4, 10.2) == 0
    quick = AlphaSchedule("paper", warm_epochs=1, ramp_epochs=0, target=0.5)
    assert quick.alpha(0, 2, 0.5) == 0.0 and quick.alpha(0, 2, 1.0) == 0.5


def test_constant_alphas():
    c = AlphaSchedule("constant", alphas=[0, 0, 0.2, 1])
    assert [c.alpha(k, 4, 3.0) for k in range(4)] == [0.0, 0.0, 0.2, 1.0]
    assert c.frozen_prefix(4, 3.0) == 2
    assert AlphaSchedule("constant", alphas=[0, 0.5, 0, 1]).frozen_prefix(4, 0.0) == 1  # prefix only
    with pytest.raises(ValueError, match="4 alphas given for 3 modules"):
        c.alpha(0, 3, 0.0)


def test_dict_round_trip_through_json():
    for s in (AlphaSchedule("paper", warm_epochs=2.5, target=0.2), AlphaSchedule("constant", alphas=[0, 0.5, 1]),
              AlphaSchedule("head-only")):
        d = json.loads(json.dumps(s.to_dict()))
        assert AlphaSchedule.from_dict(d) == s
    assert AlphaSchedule.from_dict({"preset": "uniform", "value": 0.5}).alpha(0, 2, 0.0) == 0.5


def test_alpha_errors():
    with pytest.raises(ValueError, match="uniform.*head-only.*paper.*constant"):
        AlphaSchedule("cosine")
    with pytest.raises(ValueError, match="value"):
        AlphaSchedule("uniform", value=-0.1)
    with pytest.raises(ValueError, match="target"):
        AlphaSchedule("paper", target=-1)
    with pytest.raises(ValueError, match=">= 0"):
        AlphaSchedule("constant", alphas=[0.5, -0.5])
    with pytest.raises(ValueError, match="required by"):
        AlphaSchedule("constant")
    with pytest.raises(ValueError, match="required by"):
        AlphaSchedule("uniform", alphas=[1.0])
    with pytest.raises(ValueError, match="unknown alpha schedule keys"):
        AlphaSchedule.from_dict({"preset": "uniform", "alpha": 1})
    with pytest.raises(ValueError, match="out of range"):
        AlphaSchedule("uniform").alpha(4, 4, 0.0)
    with pytest.raises(ValueError, match="epoch"):
        AlphaSchedule("uniform").alpha(0, 4, -1.0)
    assert set(ALPHA_PRESETS) == {"uniform", "head-only", "paper", "constant"}
