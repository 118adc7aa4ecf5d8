"""Sample-quality metrics on feature vectors, computed as OpenAI's ADM evaluation suite computes them.

The ADM suite (github.com/openai/guided-diffusion, `evaluations/evaluator.py`) is what FlexVAR, VAR, LlamaGen and
most ImageNet papers report. Its definitions, reproduced here in PyTorch:

- FID: the Frechet distance between Gaussians fitted to the pool features (mean and `np.cov`'s unbiased covariance,
  float64) of the samples and of the reference batch.
- Inception Score: `exp(E_x KL(p(y|x) || p(y)))` from the softmax of the logits without the classifier's bias,
  over consecutive splits of 5,000 samples (10 splits for 50,000), averaged over the splits.
- Improved precision and recall (Kynkaanniemi et al. 2019) with k = 3: a sample is precise when it lies inside the
  k-nearest-neighbour ball of some reference image; a reference image is recalled when it lies inside the ball of
  some sample. Squared Euclidean distances, computed as the ADM's `DistanceBlock` does: in float16 arithmetic, in
  blocks of 10,000 x 10,000, each block redone in float32 when a float16 distance is not finite.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..utils.validation import check_int

IS_SPLIT_SIZE = 5000  # the ADM evaluator's `split_size`
PR_NEIGHBOURHOOD = 3  # the ADM evaluator's `nhood_sizes=(3,)`
DISTANCE_BLOCK = 10000  # the ADM evaluator's row and column batch sizes


@dataclass
class FeatureStatistics:
    """
    Gaussian fitted to features, as FID uses it.

    Args:
        mean (`torch.Tensor` of shape `(D,)`, float64): Mean feature.
        covariance (`torch.Tensor` of shape `(D, D)`, float64): Unbiased covariance (divided by `N - 1`).
        factor (`torch.Tensor` of shape `(D, N)`, *optional*): `covariance = factor @ factor.T`, kept by
            `from_features` when there are no more features than dimensions (it makes `frechet_distance` cheap).
    """

    mean: torch.Tensor
    covariance: torch.Tensor
    factor: torch.Tensor | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor) -> FeatureStatistics:
        """Statistics of `(N, D)` features, `N >= 2`, in float64 (as `np.mean` and `np.cov(rowvar=False)`)."""
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Feature statistics need an (N, D) tensor with N >= 2, got {tuple(features.shape)}.")
        features = features.double()
        mean = features.mean(0)
        factor = (features - mean).T / (len(features) - 1) ** 0.5
        return cls(mean, factor @ factor.T, factor if len(features) <= features.shape[1] else None)


def _covariance_factor(statistics: FeatureStatistics) -> torch.Tensor:
    """Some `M` with `covariance = M @ M.T`: the kept factor, else the Cholesky factor, else (singular covariance)
    the eigendecomposition's `V diag(sqrt(max(eigenvalues, 0)))`."""
    if statistics.factor is not None:
        return statistics.factor
    covariance = (statistics.covariance + statistics.covariance.T) / 2
    lower, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        return lower
    values, vectors = torch.linalg.eigh(covariance)
    return vectors * values.clamp_min(0).sqrt()


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """
    `|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^1/2)` in float64, >= 0.

    `tr((S_a S_b)^1/2)` is the sum of the square roots of the eigenvalues of `S_a S_b`, which are those of the
    symmetric `M^T S_b M` for any `S_a = M M^T` (`_covariance_factor`), computed with a symmetric eigensolver. The
    ADM evaluator takes scipy's `sqrtm(S_a S_b)`; the two agree to rounding.
    """
    if a.mean.shape != b.mean.shape or a.covariance.shape != b.covariance.shape:
        raise ValueError(
            f"Feature statistics of different sizes: {tuple(a.mean.shape)} and {tuple(b.mean.shape)} means."
        )
    b = FeatureStatistics(b.mean.to(a.mean), b.covariance.to(a.covariance), b.factor)
    if a.factor is None and b.factor is not None:
        a, b = b, a  # the eigenvalues of S_a S_b and S_b S_a are the same; the smaller factor is cheaper
    factor = _covariance_factor(a)
    cross = torch.linalg.eigvalsh(factor.T @ b.covariance @ factor).clamp_min(0).sqrt().sum()
    value = (a.mean - b.mean).square().sum() + a.covariance.trace() + b.covariance.trace() - 2 * cross
    return max(float(value), 0.0)


def frechet_distance_of_features(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """`frechet_distance` of the statistics of two `(N, D)` feature sets (FID for Inception pool features)."""
    return frechet_distance(FeatureStatistics.from_features(features_a), FeatureStatistics.from_features(features_b))


def inception_score(logits: torch.Tensor, split_size: int = IS_SPLIT_SIZE) -> float:
    """
    Inception Score of `(N, C)` class logits, as the ADM evaluator: `p(y|x) = softmax(logits)` (its logits are the
    pool features times the classifier's weight, without the bias), then for each consecutive split of `split_size`
    samples (the last one may be shorter) `exp(mean_x sum_y p(y|x) (log p(y|x) - log mean_x p(y|x)))`, averaged over
    the splits. Computed in float64 (the ADM in float32). Between 1 and C.
    """
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"`logits` must be a non-empty (N, C) tensor, got shape {tuple(logits.shape)}.")
    check_int("split_size", split_size, minimum=1)
    log_probs = logits.double().log_softmax(dim=-1)
    scores = []
    for part in log_probs.split(split_size):
        log_marginal = part.exp().mean(0).log()
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    return float(torch.stack(scores).mean())


def _round_half(values: torch.Tensor) -> torch.Tensor:
    """Float32 values rounded to float16's precision (and range: overflow becomes inf)."""
    return values.half().float()


def pairwise_squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """
    `(R, C)` float32 squared distances `max(|u|^2 - 2 u.v + |v|^2, 0)` between `(R, D)` and `(C, D)` features, as the
    ADM's `DistanceBlock`: the features rounded to float16 and every intermediate result (squares, norms, products,
    differences) rounded to float16, sums and products accumulated in float32; redone in float32 when any float16
    distance is not finite.
    """
    rows, columns = rows.float(), columns.float()
    half_rows, half_columns = _round_half(rows), _round_half(columns)
    row_norms = _round_half(_round_half(half_rows.square()).sum(1))
    column_norms = _round_half(_round_half(half_columns.square()).sum(1))
    products = _round_half(half_rows @ half_columns.T)
    distances = _round_half(_round_half(row_norms[:, None] - 2 * products) + column_norms[None, :]).clamp_min(0)
    if torch.isfinite(distances).all():
        return distances
    row_norms, column_norms = rows.square().sum(1), columns.square().sum(1)
    return (row_norms[:, None] - 2 * rows @ columns.T + column_norms[None, :]).clamp_min(0)


def _blocks(count: int, size: int) -> Iterator[slice]:
    return (slice(begin, min(begin + size, count)) for begin in range(0, count, size))


def manifold_radii(
    features: torch.Tensor, k: int = PR_NEIGHBOURHOOD, block_size: int = DISTANCE_BLOCK
) -> torch.Tensor:
    """
    `(N,)` squared distance from each of `(N, D)` features to its k-th nearest neighbour, the point itself counted
    as the 0-th (the ADM's `manifold_radii`: the k-th smallest of each row of the distance matrix, from 0). Needs
    `N > k`.
    """
    if len(features) <= k:
        raise ValueError(f"Precision and recall with k={k} need more than {k} feature vectors, got {len(features)}.")
    radii = []
    for rows in _blocks(len(features), block_size):
        distances = torch.cat(
            [pairwise_squared_distances(features[rows], features[columns])
             for columns in _blocks(len(features), block_size)],
            dim=1,
        )
        radii.append(distances.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def precision_recall(
    reference: torch.Tensor, samples: torch.Tensor, k: int = PR_NEIGHBOURHOOD, block_size: int = DISTANCE_BLOCK
) -> tuple[float, float]:
    """
    Improved precision and recall of `(N_s, D)` sample features against `(N_r, D)` reference features (the ADM's
    `compute_prec_recall`).

    Precision: the fraction of samples within the k-NN ball (`manifold_radii`, inclusive) of at least one reference
    feature. Recall: the fraction of reference features within the k-NN ball of at least one sample. Both in [0, 1].
    """
    reference_radii = manifold_radii(reference, k, block_size)
    sample_radii = manifold_radii(samples, k, block_size)
    reference_recalled = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_precise = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    for rows in _blocks(len(reference), block_size):
        for columns in _blocks(len(samples), block_size):
            distances = pairwise_squared_distances(reference[rows], samples[columns])
            reference_recalled[rows] |= (distances <= sample_radii[None, columns]).any(1)
            sample_precise[columns] |= (distances <= reference_radii[rows, None]).any(0)
    return float(sample_precise.double().mean()), float(reference_recalled.double().mean())
