"""Class-structure statistics of the layer-peeled probe, on hand-made features with known answers."""

import math

import pytest
import torch

from callbacks.feature_stats import (
    ClassMoments,
    alignment_gain,
    between_class_variance,
    classifier_cosine,
    effective_weight,
    fit_readout,
    layer_metrics,
    readout_correct,
    relative_change,
    variance_ratio,
    within_class_variance,
)

# two classes in the plane: class 0 at (0,0), (2,0) (mean (1,0)); class 1 at (0,2), (0,4) (mean
# (0,3)). Var_W = (1+1+1+1)/4 = 1; mu_G = (0.5, 1.5); Var_B = (2.5 + 2.5)/2 = 2.5.
FEATURES = torch.tensor([[0.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 4.0]])
LABELS = torch.tensor([0, 1, 0, 1])


def moments(features, labels, num_classes=2, chunk=None):
    m = ClassMoments.zeros(num_classes, features.shape[1])
    step = chunk or len(labels)
    for start in range(0, len(labels), step):
        m.update(features[start : start + step], labels[start : start + step])
    return m


def test_variances_of_a_known_class_structure():
    m = moments(FEATURES, LABELS)
    assert within_class_variance(m) == pytest.approx(1.0, abs=1e-12)
    assert between_class_variance(m) == pytest.approx(2.5, abs=1e-12)
    assert variance_ratio(1.0, 2.5) == pytest.approx(0.4)


def test_chunked_accumulation_gives_the_same_numbers():
    whole = moments(FEATURES, LABELS)
    for chunk in (1, 3):
        parts = moments(FEATURES, LABELS, chunk=chunk)
        assert torch.equal(parts.counts, whole.counts)
        assert torch.allclose(parts.sums, whole.sums)
        assert within_class_variance(parts) == pytest.approx(within_class_variance(whole))


def test_unequal_classes_use_the_sample_mean_and_only_present_classes():
    # class 0: (1,0), (3,0) -> mean (2,0); class 1: (0,2); class 2 absent. N = 3.
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    m = moments(features, torch.tensor([0, 0, 1]), num_classes=3)
    assert within_class_variance(m) == pytest.approx(2 / 3, abs=1e-12)
    # mu_G = (4/3, 2/3): ||(2/3, -2/3)||^2 = 8/9, ||(-4/3, 4/3)||^2 = 32/9, over C' = 2 classes
    assert between_class_variance(m) == pytest.approx(20 / 9, abs=1e-12)
    assert layer_metrics(m, None, None)["ratio"] == pytest.approx(0.3, abs=1e-12)


def test_a_single_class_leaves_class_separation_undefined():
    m = moments(FEATURES[:2], torch.tensor([1, 1]))
    values = layer_metrics(m, torch.eye(2), torch.eye(2))
    assert values["var_w"] == pytest.approx(1.0)  # (0,0), (0,2) around (0,1)
    for key in ("var_b", "ratio", "align", "cls_cos"):
        assert math.isnan(values[key]), key


def test_classifier_cosine_of_known_rows():
    m = moments(FEATURES, LABELS)
    # centred means are (0.5, -1.5) and (-0.5, 1.5); rows (1, -1) and (-1, 1): cos = 2/sqrt(5)
    rows = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert classifier_cosine(m, rows) == pytest.approx(2 / math.sqrt(5), abs=1e-12)
    assert classifier_cosine(m, -rows) == pytest.approx(-2 / math.sqrt(5), abs=1e-12)


def test_alignment_gain_of_known_weights():
    m = moments(FEATURES, LABELS)
    # W keeps the first coordinate: sum ||W d_c||^2 = 0.5, sum ||d_c||^2 = 5, ||W||_F^2 / d = 1/2
    assert alignment_gain(m, torch.tensor([[1.0, 0.0], [0.0, 0.0]])) == pytest.approx(0.2)
    # along the class direction (1, -3)/sqrt(10): all of the class spread passes, A = d = 2
    assert alignment_gain(m, torch.tensor([[1.0, -3.0]])) == pytest.approx(2.0)
    # an isotropic layer is blind to the class structure, whatever its scale
    assert alignment_gain(m, 7 * torch.eye(2)) == pytest.approx(1.0)


def test_effective_weight_of_convs_and_flattened_linears():
    conv = torch.arange(4 * 3 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3, 3)
    assert torch.equal(effective_weight(conv, 3), conv.double().sum((2, 3)))
    assert effective_weight(conv, 5) is None
    # a linear layer reading a flattened (3, 2, 2) map: channel c owns columns 4c .. 4c+3
    linear = torch.arange(2 * 12, dtype=torch.float32).reshape(2, 12)
    summed = effective_weight(linear, 3)
    assert summed.tolist() == [[6.0, 22.0, 38.0], [54.0, 70.0, 86.0]]
    assert torch.equal(effective_weight(linear, 12), linear.double())
    assert effective_weight(linear, 5) is None


def test_relative_change():
    assert relative_change(2.0, 1.0) == -0.5
    assert relative_change(-2.0, -1.0) == 0.5
    assert relative_change(3.0, 3.0) == 0.0
    assert math.isnan(relative_change(0.0, 1.0))
    assert math.isnan(relative_change(math.nan, 1.0))


def test_readout_from_the_sums_is_the_ridge_least_squares_solution():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (40,), generator=generator)
    m = ClassMoments.zeros(3, 3, with_gram=True)
    for start in range(0, 40, 16):  # chunked, as the probe feeds it
        m.update(features[start : start + 16], labels[start : start + 16])
    z = torch.cat([features, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    y = torch.nn.functional.one_hot(labels, 3).double()
    penalty = 0.1 * float((z * z).sum(0).mean())
    expected = torch.linalg.solve(z.T @ z + penalty * torch.eye(4, dtype=torch.float64), z.T @ y)
    assert torch.allclose(fit_readout(m, 0.1), expected)


def test_readout_separates_separable_classes():
    m = ClassMoments.zeros(2, 2, with_gram=True)
    m.update(FEATURES, LABELS)
    readout = fit_readout(m, 1e-6)
    assert int(readout_correct(readout, FEATURES, LABELS)) == 4
    assert int(readout_correct(readout, FEATURES, 1 - LABELS)) == 0
