"""Loss landscape over (x1, x2) = (pi/pi_ref of y_w, of y_l): closed-form gradient vs autograd, the
seed's reading of the field as numbers, and the drawing."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpop.analysis.landscape import draw_landscape, landscape_grid, ratio_loss, ratio_loss_gradient
from dpop.errors import ConfigError


def autograd_gradient(loss, x1, x2, beta, dpop_lambda):
    """The registry's own loss (what training optimises) on log-probs lw = log x1, ll = log x2, rw = rl = 0,
    differentiated by torch: the landscape's numpy formula is checked against dpop.losses, not a third copy."""
    from dpop.losses import LOSSES

    x1 = torch.tensor(x1, dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor(x2, dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros_like(x1)
    options = {"dpop_lambda": dpop_lambda} if loss == "dpop" else {}
    value = LOSSES[loss].fn(torch.log(x1), torch.log(x2), zeros, zeros, beta=beta, **options)[0]
    value.sum().backward()
    return value.detach().numpy(), x1.grad.numpy(), x2.grad.numpy()


@pytest.mark.parametrize("loss", ["dpo", "dpop"])
@pytest.mark.parametrize("beta,dpop_lambda", [(0.3, 50.0), (0.1, 5.0), (1.0, 0.5)])
def test_closed_form_gradient_matches_autograd(loss, beta, dpop_lambda):
    rng = np.random.default_rng(0)
    x1, x2 = rng.uniform(0.03, 2.0, 400), rng.uniform(0.03, 2.0, 400)
    x1 = x1[np.abs(x1 - 1.0) > 1e-3]  # the penalty's kink
    x2 = x2[: len(x1)]
    value, grad_x1, grad_x2 = autograd_gradient(loss, x1, x2, beta, dpop_lambda)
    np.testing.assert_allclose(ratio_loss(loss, x1, x2, beta=beta, dpop_lambda=dpop_lambda), value, rtol=1e-12)
    ours_x1, ours_x2 = ratio_loss_gradient(loss, x1, x2, beta=beta, dpop_lambda=dpop_lambda)
    np.testing.assert_allclose(ours_x1, grad_x1, rtol=1e-10)
    np.testing.assert_allclose(ours_x2, grad_x2, rtol=1e-10)


def test_hand_values():
    """x1 = x2: DPO's sigmoid argument is 0, L = log 2. DPOP at x1 = x2 = 0.5, beta 0.3, lambda 50:
    z = 0.3 * (0 - 50 log 2) = -10.3972, L = softplus(10.3972) = 10.3972 + log1p(e^-10.3972) = 10.39724."""
    assert ratio_loss("dpo", 0.7, 0.7) == pytest.approx(math.log(2), abs=1e-12)
    assert ratio_loss("dpop", 0.5, 0.5) == pytest.approx(10.39724, abs=1e-5)
    assert ratio_loss("dpop", 1.5, 0.5) == pytest.approx(ratio_loss("dpo", 1.5, 0.5), abs=1e-12)


def test_seed_gradient_ratio_is_x2_over_x1_for_dpo():
    """Seed 003 eq. 17: |dL/dx1 / dL/dx2| = x2 / x1, whatever beta."""
    grid = landscape_grid("dpo", beta=0.3, points=60)
    np.testing.assert_allclose(np.abs(grid.grad_x1 / grid.grad_x2), grid.x2 / grid.x1, rtol=1e-10)


def test_seed_reading_of_the_field():
    # DPO at (1, 0.5): the rejected side gets twice the push of the chosen side.
    dpo_x1, dpo_x2 = ratio_loss_gradient("dpo", 1.0, 0.5)
    assert abs(dpo_x2) == pytest.approx(2 * abs(dpo_x1))
    # As x2 -> 0 the x2 gradient explodes and the x1 gradient stays weak.
    near_zero_x1, near_zero_x2 = ratio_loss_gradient("dpo", 1.0, 0.02)
    assert abs(near_zero_x2) > 40 * abs(near_zero_x1) and abs(near_zero_x2) > 10 * abs(dpo_x2)
    # DPOP at x1 = 0.8 < 1: the descent step raises x1, ~100x harder than DPO's (beta 0.3, lambda 50).
    dpop_x1, _ = ratio_loss_gradient("dpop", 0.8, 0.5)
    dpo_x1_at_08, _ = ratio_loss_gradient("dpo", 0.8, 0.5)
    assert -dpop_x1 > 0 and -dpo_x1_at_08 > 0
    assert -dpop_x1 > 50 * -dpo_x1_at_08


def test_dpop_field_points_back_over_x1_equals_1_and_matches_dpo_beyond_it():
    dpo, dpop = landscape_grid("dpo", points=80), landscape_grid("dpop", points=80)
    left = dpop.x1 < 1.0
    # left of the line: descent raises x1 more than it lowers x2, everywhere on the grid (x2 >= 0.02)
    assert np.all(-dpop.grad_x1[left] > np.abs(dpop.grad_x2[left]))
    # DPO below the diagonal does the opposite: it mostly lowers x2
    below = dpo.x2 < dpo.x1
    assert np.all(np.abs(dpo.grad_x2[below]) > np.abs(dpo.grad_x1[below]))
    np.testing.assert_allclose(dpop.loss[~left], dpo.loss[~left], rtol=1e-12)
    np.testing.assert_allclose(dpop.grad_x1[~left], dpo.grad_x1[~left], rtol=1e-12)
    zero = landscape_grid("dpop", dpop_lambda=0.0, points=40)
    np.testing.assert_allclose(zero.loss, landscape_grid("dpo", points=40).loss, rtol=1e-12)


def test_draw_writes_png_and_svg(tmp_path):
    png = draw_landscape("both", tmp_path / "both.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 20_000
    svg = draw_landscape("dpop", tmp_path / "dpop.svg", beta=0.1, dpop_lambda=5.0)
    assert b"<svg" in svg.read_bytes()[:2000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.png", "dpop.svg"]  # no temp files left


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ipo"):
        draw_landscape("ipo", tmp_path / "x.png")
    with pytest.raises(ConfigError, match=r"\.png, \.svg or \.pdf"):
        draw_landscape("dpo", tmp_path / "x.jpeg")
    with pytest.raises(ConfigError, match="beta"):
        landscape_grid("dpo", beta=0.0)


def test_importing_the_modules_does_nothing():
    code = ("import sys, dpop.analysis.landscape, dpop.reporting.report, dpop.reporting.plots, dpop.analysis.bt; "
            "print('matplotlib' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
