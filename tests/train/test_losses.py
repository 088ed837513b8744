"""CLIMS / QA-CLIMS losses against direct formulas (METHODS.md sections 3-4) and gradchecks."""

import math

import pytest
import torch

from wsclip.errors import ShapeError
from wsclip.train import losses


def _unit(*shape, dtype=torch.float64):
    return torch.nn.functional.normalize(torch.randn(*shape, dtype=dtype), dim=-1)


# ----------------------------------------------------------------------------- direct formulas
def test_otm_btm_match_formula_with_clamps():
    sim = torch.tensor([-0.3, 0.0, 0.00005, 0.2, 0.5, 0.99995, 1.0], dtype=torch.float64)
    clamped = [min(max(s, 1e-4), 0.9999) for s in sim.tolist()]
    want_otm = -sum(math.log(c) for c in clamped) / len(clamped)
    want_btm = -sum(math.log(1 - c) for c in clamped) / len(clamped)
    assert losses.otm(sim).item() == pytest.approx(want_otm, rel=1e-12)
    assert losses.btm(sim).item() == pytest.approx(want_btm, rel=1e-12)


def test_otm_btm_random_means():
    sim = torch.rand(37, dtype=torch.float64) * 1.2 - 0.1
    c = sim.clamp(1e-4, 0.9999)
    torch.testing.assert_close(losses.otm(sim), -(c.log()).sum() / 37)
    torch.testing.assert_close(losses.btm(sim), -((1 - c).log()).sum() / 37)


def test_cbs_is_a_sum_over_pairs_above_tau():
    sim = torch.rand(6, 11, dtype=torch.float64) * 0.6
    tau = 0.26
    want = 0.0
    for m in range(6):
        for l in range(11):
            c = sim[m, l].item()
            if c > tau:
                want += -math.log(1 - c)
    assert losses.cbs(sim, tau).item() == pytest.approx(want, rel=1e-12)
    # a sum: doubling the pairs doubles the loss (a mean would not change)
    assert losses.cbs(torch.cat([sim, sim]), tau).item() == pytest.approx(2 * want, rel=1e-12)


def test_cbs_mask_and_edge_cases():
    sim = torch.tensor([[0.9, 0.5, 1.0], [0.1, 0.27, 0.3]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, True, True]])
    out = losses.cbs(sim, 0.26, mask)
    want = -(math.log(0.1) + math.log(0.5) + math.log(1 - 0.27) + math.log(1 - 0.3))
    assert out.item() == pytest.approx(want, rel=1e-12)
    out.backward()
    # c = 1 is masked out: finite gradients, zero where unselected
    assert torch.isfinite(sim.grad).all()
    assert sim.grad[0, 2] == 0 and sim.grad[1, 0] == 0
    assert losses.cbs(torch.zeros(0, 4), 0.26).item() == 0.0
    assert losses.cbs(torch.full((2, 3), 0.1), 0.26).item() == 0.0


def test_area_is_mean_of_all_entries():
    cams = torch.rand(3, 5, 7, 9, dtype=torch.float64)
    assert losses.area(cams).item() == pytest.approx(cams.sum().item() / cams.numel(), rel=1e-12)


def test_empty_pairs_give_zero_with_graph():
    sim = torch.zeros(0, dtype=torch.float64, requires_grad=True)
    for f in (losses.otm, losses.btm):
        out = f(sim)
        assert out.item() == 0.0 and out.requires_grad


def _contrast_direct(x, t_fg, t_bg, tau, mask, fg_wins: bool):
    """FRC (fg_wins: -log e_fg / (e_fg + e_bg), e_bg summed) or BRC (-log mean e_bg / (mean e_bg + e_fg)),
    summed over rows with at least one background text, one exp at a time."""
    total = 0.0
    for m in range(x.shape[0]):
        js = [j for j in range(t_bg.shape[1]) if mask[m, j]]
        if not js:
            continue
        e_fg = math.exp(float(x[m] @ t_fg[m]) / tau)
        e_bg = sum(math.exp(float(x[m] @ t_bg[m, j]) / tau) for j in js)
        total += -math.log(e_fg / (e_fg + e_bg)) if fg_wins else -math.log((e_bg / len(js)) / (e_bg / len(js) + e_fg))
    return total


def _frc_direct(v, t_fg, t_bg, tau, mask):
    return _contrast_direct(v, t_fg, t_bg, tau, mask, fg_wins=True)


def _brc_direct(u, t_fg, t_bg, tau, mask):
    return _contrast_direct(u, t_fg, t_bg, tau, mask, fg_wins=False)


@pytest.mark.parametrize("tau", [0.7, 0.05])
def test_frc_brc_match_formula_with_padding(tau):
    m, l, d = 7, 5, 16
    v, u, t_fg, t_bg = _unit(m, d), _unit(m, d), _unit(m, d), _unit(m, l, d)
    mask = torch.rand(m, l) > 0.4
    mask[2] = False  # a pair without background texts: skipped
    mask[3] = True
    assert losses.frc(v, t_fg, t_bg, tau, mask).item() == pytest.approx(_frc_direct(v, t_fg, t_bg, tau, mask), rel=1e-10)
    assert losses.brc(u, t_fg, t_bg, tau, mask).item() == pytest.approx(_brc_direct(u, t_fg, t_bg, tau, mask), rel=1e-10)
    full = torch.ones(m, l, dtype=torch.bool)
    assert losses.frc(v, t_fg, t_bg, tau).item() == pytest.approx(_frc_direct(v, t_fg, t_bg, tau, full), rel=1e-10)
    assert losses.brc(u, t_fg, t_bg, tau).item() == pytest.approx(_brc_direct(u, t_fg, t_bg, tau, full), rel=1e-10)


def test_frc_brc_all_pairs_skipped_and_shapes():
    v, t_fg, t_bg = _unit(3, 8), _unit(3, 8), _unit(3, 2, 8)
    none = torch.zeros(3, 2, dtype=torch.bool)
    assert losses.frc(v, t_fg, t_bg, 0.7, none).item() == 0.0
    assert losses.brc(v, t_fg, t_bg, 0.7, none).item() == 0.0
    with pytest.raises(ShapeError):
        losses.frc(v, t_fg, _unit(3, 2, 4), 0.7)
    with pytest.raises(ShapeError):
        losses.cbs(torch.rand(3), 0.26)


# ----------------------------------------------------------------------------- gradchecks (float64)
def test_gradcheck_clims_terms():
    sim = (torch.rand(9, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(losses.otm, (sim,))
    assert torch.autograd.gradcheck(losses.btm, (sim,))
    # keep entries away from tau so the indicator does not flip under the finite differences
    c = torch.rand(5, 6, dtype=torch.float64) * 0.7
    c = torch.where((c - 0.26).abs() < 0.01, c + 0.05, c).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: losses.cbs(s, 0.26), (c,))
    cams = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(losses.area, (cams,))


def test_gradcheck_qa_terms():
    m, l, d = 4, 3, 6
    v = _unit(m, d).requires_grad_()
    t_fg = _unit(m, d).requires_grad_()
    t_bg = _unit(m, l, d).requires_grad_()
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True], [False, True, False]])
    assert torch.autograd.gradcheck(lambda a, b, c: losses.frc(a, b, c, 0.7, mask), (v, t_fg, t_bg))
    assert torch.autograd.gradcheck(lambda a, b, c: losses.brc(a, b, c, 0.7, mask), (v, t_fg, t_bg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cbs_similarity_equal_to_tau_does_not_count(dtype):
    """The public CBSLoss keeps entries with sim > threshold (strict); 0.25 and 0.5 are exact in binary."""
    sim = torch.tensor([[0.25, 0.5], [0.2, 0.25]], dtype=dtype)
    assert losses.cbs(sim, 0.25).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    assert losses.cbs(sim, 0.5).item() == 0.0
    # OTM/BTM clamps at the edges: a similarity of exactly 1e-4 or 0.9999 is kept as is
    edge = torch.tensor([0.0001, 0.9999], dtype=torch.float64)
    assert losses.otm(edge).item() == pytest.approx(-(math.log(0.0001) + math.log(0.9999)) / 2, rel=1e-12)
