"""Sections 2-7 of METHOD.md: C, Q, G, G', C' on constructed and hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from guided_flow.model import volumes
from guided_flow.model.geometry import warp_by_flow
from tests.helpers import random_unit_features, shifted_pair


def test_correlation_layout_and_relu():
    source = random_unit_features(2, 16, 4, 5, seed=1)
    target = random_unit_features(2, 16, 4, 5, seed=2)
    volume = volumes.correlation(source, target)
    assert volume.shape == (2, 20, 4, 5)
    # channel j = target cell (raster order), spatial = source cell
    i_y, i_x, j = 2, 3, 7
    expected = torch.dot(source[1, :, i_y, i_x], target[1, :, j // 5, j % 5]).clamp_min(0)
    assert torch.isclose(volume[1, j, i_y, i_x], expected, atol=1e-6)
    assert (volume >= 0).all()


def test_identical_pair_confidence_and_guidance_are_exact():
    features = random_unit_features(1, 64, 6, 6, seed=3)
    volume = volumes.correlation(features, features)
    confidence = volumes.soft_mutual_confidence(volume)
    diagonal = confidence.view(1, 36, 36).diagonal(dim1=1, dim2=2)
    assert torch.allclose(diagonal, torch.ones_like(diagonal), atol=1e-4)
    assert confidence.max() <= 1.0 + 1e-5
    sparse, weight = volumes.sparse_guidance(confidence, rho=0.9)
    assert (weight > 0).all()
    assert torch.allclose(sparse, torch.zeros_like(sparse), atol=1e-5)
    dense = volumes.interpolate_guidance(sparse, weight, c_p=5.0, window=5)
    assert torch.allclose(dense, torch.zeros_like(dense), atol=1e-5)


@pytest.mark.parametrize("shift", [(2, 1), (-1, 3), (0, -2)])
@pytest.mark.parametrize("model", ["translation", "affine"])
def test_shifted_pair_guidance_recovers_the_shift(shift, model):
    h = w = 12
    source, target = shifted_pair(2, 128, h, w, shift, seed=4)
    confidence = volumes.soft_mutual_confidence(volumes.correlation(source, target))
    sparse, weight = volumes.sparse_guidance(confidence, rho=0.9)
    sx, sy = shift
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    covered = (xs + sx >= 0) & (xs + sx < w) & (ys + sy >= 0) & (ys + sy < h)
    expected = torch.tensor([sx, sy], dtype=torch.float32).view(1, 2, 1, 1)
    assert (weight[:, 0][:, covered] > 0).all()
    assert torch.allclose(sparse[:, :, covered], expected.view(1, 2, 1).expand(2, 2, 1), atol=1e-5)
    dense = volumes.interpolate_guidance(sparse, weight, c_p=5.0, window=5, model=model)
    # interior: every neighbour within the 5x5 window is covered and valid
    interior = torch.nn.functional.max_pool2d((~covered).float()[None, None], 5, 1, 2)[0, 0] == 0
    assert torch.allclose(dense[:, :, interior], expected.view(1, 2, 1), atol=1e-4)
    warped = warp_by_flow(target, dense)
    assert torch.allclose(warped[:, :, interior], source[:, :, interior], atol=1e-4)


def _numpy_reference(source: np.ndarray, target: np.ndarray, rho, c_p, window, c_m, pruning):
    """Independent loop implementation of sections 2-7 for one pair (features D x h x w)."""
    d, h, w = source.shape
    cells = [(x, y) for y in range(h) for x in range(w)]
    n = len(cells)
    corr = np.zeros((n, n))  # [i, j]
    for i, (xi, yi) in enumerate(cells):
        for j, (xj, yj) in enumerate(cells):
            corr[i, j] = max(0.0, float(source[:, yi, xi] @ target[:, yj, xj]))
    conf = np.zeros_like(corr)
    for i in range(n):
        for j in range(n):
            col_max = max(corr[k, j] for k in range(n))
            row_max = max(corr[i, k] for k in range(n))
            conf[i, j] = corr[i, j] / (col_max + 1e-6) * corr[i, j] / (row_max + 1e-6)
    refined = conf * pruning
    guide = np.zeros((n, 2))
    weight = np.zeros(n)
    for i, (xi, yi) in enumerate(cells):
        for j, (xj, yj) in enumerate(cells):
            if refined[i, j] > rho:
                weight[i] += refined[i, j]
                guide[i] += refined[i, j] * np.array([xj - xi, yj - yi])
        if weight[i] > 0:
            guide[i] /= weight[i]
    dense = np.zeros((n, 2))
    r = window // 2
    for i, (xi, yi) in enumerate(cells):
        num, den = np.zeros(2), 0.0
        for k, (xk, yk) in enumerate(cells):
            if abs(xk - xi) <= r and abs(yk - yi) <= r:
                wik = weight[k] * math.exp(-((xi - xk) ** 2 + (yi - yk) ** 2) / (2 * c_p))
                num += wik * guide[k]
                den += wik
        dense[i] = num / (den + 1e-6)
    guided = np.zeros_like(corr)
    for i, (xi, yi) in enumerate(cells):
        for j, (xj, yj) in enumerate(cells):
            dist2 = (xj - xi - dense[i, 0]) ** 2 + (yj - yi - dense[i, 1]) ** 2
            guided[i, j] = corr[i, j] * math.exp(-dist2 / (2 * c_m))
    return corr, conf, guide, weight, dense, guided


def test_three_by_three_case_matches_an_independent_loop_implementation():
    generator = torch.Generator().manual_seed(5)
    # correlated features so that several cells compete and Q takes non-trivial values
    base = torch.randn(1, 4, 3, 3, generator=generator)
    source = base + 0.3 * torch.randn(1, 4, 3, 3, generator=generator)
    target = base.roll(1, dims=3) + 0.3 * torch.randn(1, 4, 3, 3, generator=generator)
    source = source / source.norm(dim=1, keepdim=True)
    target = target / target.norm(dim=1, keepdim=True)
    rho, c_p, window, c_m = 0.5, 2.0, 3, 1.5
    pruning = 0.97
    corr, conf, guide, weight, dense, guided = _numpy_reference(
        source[0].double().numpy(), target[0].double().numpy(), rho, c_p, window, c_m, pruning
    )
    volume = volumes.correlation(source, target)
    confidence = volumes.soft_mutual_confidence(volume)
    sparse, v = volumes.sparse_guidance(confidence * pruning, rho)
    g_dense = volumes.interpolate_guidance(sparse, v, c_p, window)
    c_guided = volumes.guided_correlation(volume, g_dense, c_m)

    def as_ij(t):  # B x J x h x w -> [i, j]
        return t[0].reshape(9, 9).t().double().numpy()

    def as_cells(t):  # B x 2 x h x w -> [i, 2]
        return t[0].reshape(2, 9).t().double().numpy()

    assert 0 < (conf * pruning > rho).sum() < 81, "the case must exercise the threshold"
    np.testing.assert_allclose(as_ij(volume), corr, atol=1e-5)
    np.testing.assert_allclose(as_ij(confidence), conf, atol=1e-5)
    np.testing.assert_allclose(as_cells(sparse), guide, atol=1e-5)
    np.testing.assert_allclose(v[0].reshape(9).double().numpy(), weight, atol=1e-5)
    np.testing.assert_allclose(as_cells(g_dense), dense, atol=1e-5)
    np.testing.assert_allclose(as_ij(c_guided), guided, atol=1e-5)


def test_guidance_is_zero_where_no_neighbour_is_valid():
    sparse = torch.zeros(1, 2, 9, 9)
    weight = torch.zeros(1, 1, 9, 9)
    sparse[0, :, 0, 0] = torch.tensor([1.0, -2.0])
    weight[0, 0, 0, 0] = 0.95
    dense = volumes.interpolate_guidance(sparse, weight, c_p=5.0, window=5)
    assert torch.allclose(dense[0, :, 0, 0], torch.tensor([1.0, -2.0]), atol=1e-5)
    assert torch.allclose(dense[0, :, 2, 2], torch.tensor([1.0, -2.0]), atol=1e-5)
    assert (dense[0, :, 3:, :] == 0).all() and (dense[0, :, :, 3:] == 0).all()


def test_affine_guidance_recovers_a_linear_field_where_translation_cannot():
    h = w = 11
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    # G = A p + t with a rotation/scale part: a translation average is biased at the borders
    sparse = torch.stack((0.1 * xs - 0.05 * ys + 1.0, 0.05 * xs + 0.1 * ys - 0.5))[None]
    weight = torch.ones(1, 1, h, w)
    affine = volumes.interpolate_guidance(sparse, weight, 5.0, 5, model="affine")
    translation = volumes.interpolate_guidance(sparse, weight, 5.0, 5, model="translation")
    assert torch.allclose(affine, sparse, atol=1e-3)
    assert (translation - sparse).abs().max() > 0.05


def test_guided_correlation_damps_away_from_the_guided_position():
    volume = torch.ones(1, 16, 4, 4)
    guidance = torch.zeros(1, 2, 4, 4)
    guidance[0, 0] = 1.0  # guided position of every source cell: one cell to the right
    damped = volumes.guided_correlation(volume, guidance, c_m=5.0)
    # source cell (x=1, y=2): guided target (2, 2) keeps its value, target (0, 0) is damped
    assert torch.isclose(damped[0, 2 * 4 + 2, 2, 1], torch.tensor(1.0))
    assert torch.isclose(damped[0, 0, 2, 1], torch.tensor(math.exp(-(4 + 4) / 10)))


def test_argmax_flow_of_a_shifted_pair():
    source, target = shifted_pair(1, 64, 8, 8, (1, 2), seed=6)
    flow = volumes.argmax_flow(volumes.correlation(source, target))
    assert (flow[0, 0, :6, :7] == 1).all() and (flow[0, 1, :6, :7] == 2).all()


def test_guided_soft_argmax_of_an_identity_volume_is_zero():
    # every source cell's best target is itself and the prior is centred there (G' = 0)
    h, w = 4, 5
    volume = torch.eye(h * w).view(1, h * w, h, w)
    flow = volumes.guided_soft_argmax(volume, torch.zeros(1, 2, h, w), c_m=5.0, beta=100.0)
    assert flow.shape == (1, 2, h, w)
    assert torch.allclose(flow, torch.zeros_like(flow), atol=1e-6)


def test_guided_soft_argmax_hand_computed_case():
    # a 1 x 2 grid, target cells at x = 0 and x = 1, G' = 0, c_M = 1/(2 ln 2): the prior weighs
    # the other cell by 1/2. Source cell 0 has C = (1, 0): with beta = ln 3 the weights are
    # (3, 1/2), expected x = 1/7; source cell 1 has C = (0.5, 0.5): weights (1/2, 1), expected
    # x = 2/3, displacement -1/3.
    volume = torch.tensor([[1.0, 0.5], [0.0, 0.5]]).view(1, 2, 1, 2)
    flow = volumes.guided_soft_argmax(
        volume, torch.zeros(1, 2, 1, 2), c_m=1 / (2 * math.log(2.0)), beta=math.log(3.0)
    )
    expected = torch.tensor([[1 / 7, -1 / 3], [0.0, 0.0]]).view(1, 2, 1, 2)
    assert torch.allclose(flow, expected, atol=1e-6)


@pytest.mark.parametrize("shift", [(2, 1), (-1, 0)])
def test_guided_soft_argmax_of_a_shifted_pair_recovers_the_shift(shift):
    # G' = 0 (a prior one or two cells off): the correlation evidence moves S to the shift
    h = w = 10
    source, target = shifted_pair(1, 128, h, w, shift, seed=5)
    volume = volumes.correlation(source, target)
    flow = volumes.guided_soft_argmax(volume, torch.zeros(1, 2, h, w), 5.0, 100.0)
    sx, sy = shift
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    covered = (xs + sx >= 0) & (xs + sx < w) & (ys + sy >= 0) & (ys + sy < h)
    expected = torch.tensor(shift, dtype=torch.float32).view(2, 1)
    assert torch.allclose(flow[0][:, covered], expected.expand(2, int(covered.sum())), atol=1e-2)


def test_guided_soft_argmax_is_the_softmax_of_c_times_the_gaussian_renormalised():
    torch.manual_seed(0)
    h, w = 3, 4
    volume = torch.rand(2, h * w, h, w)
    guidance = torch.randn(2, 2, h, w)
    flow = volumes.guided_soft_argmax(volume, guidance, c_m=2.0, beta=7.0)
    gaussian = volumes.guided_correlation(torch.ones_like(volume), guidance, 2.0)
    weights = torch.exp(7.0 * volume) * gaussian
    weights = weights / weights.sum(dim=1, keepdim=True)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    positions = torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1).float()
    expected = torch.einsum("bjyx,jc->bcyx", weights, positions)
    expected = expected - positions.t().reshape(1, 2, h, w)
    assert torch.allclose(flow, expected, atol=1e-5)


def test_guided_soft_argmax_with_a_flat_volume_returns_the_guidance_in_the_interior():
    # no evidence in C: the prior alone, centred at p_i + G'_i, gives G'_i where the Gaussian
    # is not cut by the border
    h = w = 15
    guidance = torch.tensor([1.0, -1.0]).view(1, 2, 1, 1).expand(1, 2, h, w)
    flow = volumes.guided_soft_argmax(torch.zeros(1, h * w, h, w), guidance, 1.0, 50.0)
    assert torch.allclose(flow[0, :, 6:9, 6:9], guidance[0, :, 6:9, 6:9], atol=1e-3)
