"""FID, KID and diversity against closed forms and their defining properties."""

import math

import pytest
import torch

from didr.evaluation.fidelity import diversity, frechet_distance, frechet_from_statistics, kernel_distance


def _gaussian(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


MEAN_A = torch.tensor([0.0, 1.0], dtype=torch.float64)
MEAN_B = torch.tensor([0.5, -0.5], dtype=torch.float64)
COV_A = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
COV_B = torch.tensor([[0.5, -0.2], [-0.2, 1.5]], dtype=torch.float64)


def _closed_form_2d(m1, s1, m2, s2) -> float:
    """For 2x2 A = S1 S2 (non-negative eigenvalues): tr A^(1/2) = sqrt(tr A + 2 sqrt(det A))."""
    product = s1 @ s2
    tr_sqrt = math.sqrt(product.trace() + 2 * math.sqrt(torch.linalg.det(product)))
    return float(((m1 - m2) ** 2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def test_frechet_from_statistics_is_exact_for_non_commuting_covariances():
    expected = _closed_form_2d(MEAN_A, COV_A, MEAN_B, COV_B)
    assert frechet_from_statistics(MEAN_A, COV_A, MEAN_B, COV_B) == pytest.approx(expected, abs=1e-12)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    diag = frechet_from_statistics(
        MEAN_A, torch.diag(torch.tensor([4.0, 1.0])), MEAN_A, torch.diag(torch.tensor([1.0, 9.0]))
    )
    assert diag == pytest.approx((2 - 1) ** 2 + (1 - 3) ** 2, abs=1e-12)


def test_frechet_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-9


def test_frechet_between_gaussian_samples_matches_the_closed_form():
    """n = 200000 per set: the estimate's sampling error is O(1/sqrt(n)) ~ 0.01 here; tolerance 0.03."""
    a, b = _gaussian(200_000, MEAN_A, COV_A, 1), _gaussian(200_000, MEAN_B, COV_B, 2)
    expected = _closed_form_2d(MEAN_A, COV_A, MEAN_B, COV_B)
    assert frechet_distance(a, b) == pytest.approx(expected, abs=0.03)


@pytest.mark.parametrize(("n_a", "n_b"), [(5, 9), (48, 48), (12, 30)])
def test_frechet_of_sets_smaller_than_the_dimension_equals_the_covariance_route(n_a, n_b):
    """The sample-space route (tr (S_a S_b)^(1/2) = nuclear norm of A B^T) against the D x D eigen-decompositions, on
    48-dimensional sets of at most 48 features, one with repeated rows as a bootstrap resample has; the covariance
    route's sqrt of round-off eigenvalues bounds the agreement (measured 2e-10 relative)."""
    generator = torch.Generator().manual_seed(n_a)
    mix = torch.randn(48, 48, generator=generator, dtype=torch.float64) / 7
    a = torch.randn(n_a, 48, generator=generator, dtype=torch.float64) + 0.3
    b = torch.randn(n_b, 48, generator=generator, dtype=torch.float64) @ mix
    b = b[torch.randint(n_b, (n_b,), generator=generator)]
    covariance_route = frechet_from_statistics(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(covariance_route, rel=1e-7)


def test_kid_is_zero_within_its_std_for_one_distribution_and_positive_for_a_shift():
    cov = torch.eye(8, dtype=torch.float64)
    mean = torch.zeros(8, dtype=torch.float64)
    a, b = _gaussian(2000, mean, cov, 3), _gaussian(2000, mean, cov, 4)
    same, same_std = kernel_distance(a, b, subsets=20, subset_size=500)
    assert abs(same) < 2 * same_std
    shifted, shifted_std = kernel_distance(a, _gaussian(2000, mean + 0.5, cov, 5), subsets=20, subset_size=500)
    assert shifted > 10 * shifted_std and shifted > 10 * abs(same)


def test_kid_of_identical_features_is_deterministic_by_seed():
    feats = torch.randn(300, 4, generator=torch.Generator().manual_seed(6))
    other = feats + 0.1
    assert kernel_distance(feats, other, subsets=5, subset_size=100) == kernel_distance(
        feats, other, subsets=5, subset_size=100
    )


def test_diversity_is_zero_for_identical_points_and_scales_linearly():
    assert diversity(torch.ones(10, 5)) == 0.0
    feats = torch.randn(50, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert diversity(3.0 * feats) == pytest.approx(3.0 * diversity(feats), rel=1e-12)
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert diversity(two) == pytest.approx(5.0)


def test_bad_shapes_fail_with_a_message():
    with pytest.raises(ValueError, match="at least 2"):
        diversity(torch.ones(1, 3))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(torch.ones(1, 3), torch.ones(5, 3))
