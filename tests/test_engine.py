"""The lr schedule (engine.lr_lambda), with and without a time budget."""

import pytest

from ptft_dist import engine
from ptft_dist.config import OptimConfig


def test_warmup_then_linear_decay_over_max_steps():
    f = engine.lr_lambda(OptimConfig(warmup_steps=10, max_steps=110, schedule="linear", min_lr_ratio=0.0))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)


def test_a_time_budget_decays_the_lr_to_its_end():
    clock = {"progress": 0.0}
    f = engine.lr_lambda(OptimConfig(warmup_steps=10, max_steps=1_000_000, schedule="linear", min_lr_ratio=0.0), clock)
    assert f(5) == pytest.approx(0.6)  # warmup stays in steps
    assert f(50) == pytest.approx(1.0, abs=1e-4)
    clock["progress"] = 0.25  # a quarter of the budget spent
    assert f(50) == pytest.approx(0.75)
    clock["progress"] = 1.0
    assert f(51) == pytest.approx(0.0)
    # whichever ends first: max_steps still ends a run that is faster than its budget
    g = engine.lr_lambda(
        OptimConfig(warmup_steps=0, max_steps=100, schedule="cosine", min_lr_ratio=0.1), {"progress": 0.1}
    )
    assert g(100) == pytest.approx(0.1)
