"""flexvar_hf.evaluation's parts: the metrics against independent float64 computations with known answers, the
Inception network loaded without torchvision, the streamed npz files and the sample plan."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from flexvar_hf.evaluation import (
    FeatureStatistics,
    InceptionFeatures,
    SamplePlan,
    find_inception_weights,
    frechet_distance,
    frechet_distance_of_features,
    inception_score,
    iter_npz_batches,
    manifold_radii,
    npz_array_header,
    precision_recall,
    sample_seed,
    save_random_inception_weights,
    write_npz,
)
from flexvar_hf.evaluation.inception import WEIGHTS_FILE_NAMES, default_weights_paths, inception_module
from flexvar_hf.evaluation.metrics import pairwise_squared_distances

from conftest import REPO_ROOT, require_torch_fidelity

# ----------------------------------------------------------------------------------------------------------------
# Frechet distance


def numpy_frechet_distance(mean_a, covariance_a, mean_b, covariance_b) -> float:
    """Independent float64 reference: tr((S_a S_b)^1/2) from the eigenvalues of the non-symmetric product."""
    eigenvalues = np.linalg.eigvals(covariance_a @ covariance_b)
    cross = np.sqrt(np.clip(eigenvalues.real, 0, None)).sum()
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(covariance_a) + np.trace(covariance_b) - 2 * cross)


def statistics(mean, covariance) -> FeatureStatistics:
    return FeatureStatistics(torch.tensor(mean, dtype=torch.float64), torch.tensor(covariance, dtype=torch.float64))


def test_frechet_distance_of_gaussians_in_closed_form():
    # Commuting (diagonal) covariances: |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2.
    mean_a, mean_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    std_a, std_b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 2.0, 1.5])
    expected = ((mean_a - mean_b) ** 2).sum() + ((std_a - std_b) ** 2).sum()  # 5 + 4 + 0 + 1 = 10
    value = frechet_distance(statistics(mean_a, np.diag(std_a**2)), statistics(mean_b, np.diag(std_b**2)))
    assert expected == 10.0 and value == pytest.approx(expected, rel=1e-12)
    # Non-commuting covariances, one of them singular (the eigendecomposition fallback of the Cholesky factor).
    rng = np.random.default_rng(0)
    half = rng.normal(size=(5, 5))
    covariance_a, covariance_b = half @ half.T, np.diag([2.0, 1.0, 0.5, 0.0, 3.0])
    for a, b in ((covariance_a, covariance_b), (covariance_b, covariance_a)):
        value = frechet_distance(statistics(np.zeros(5), a), statistics(np.ones(5), b))
        assert value == pytest.approx(numpy_frechet_distance(np.zeros(5), a, np.ones(5), b), rel=1e-9)
    assert frechet_distance(statistics(np.zeros(5), covariance_a), statistics(np.zeros(5), covariance_a)) == (
        pytest.approx(0.0, abs=1e-9)
    )


@pytest.mark.parametrize("num_a, num_b, dim", [(6, 9, 20), (400, 300, 6), (12, 12, 12)])
def test_frechet_distance_of_features_matches_numpy(num_a, num_b, dim):
    """Fewer features than dimensions (the kept low-rank factor) and more (Cholesky), against np.cov + eigvals."""
    rng = np.random.default_rng(dim)
    a = rng.normal(size=(num_a, dim))
    b = rng.normal(size=(num_b, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + 0.3
    expected = numpy_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_of_features(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance_of_features(torch.from_numpy(b), torch.from_numpy(a)) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        FeatureStatistics.from_features(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="different sizes"):
        frechet_distance(statistics(np.zeros(3), np.eye(3)), statistics(np.zeros(4), np.eye(4)))


# ----------------------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_constructed_logits():
    confident = torch.full((8, 6), -60.0)
    # Split 1: four samples sure of four different classes (IS 4); split 2: two classes twice each (IS 2).
    for row, label in enumerate([0, 1, 2, 3, 0, 0, 1, 1]):
        confident[row, label] = 60.0
    assert inception_score(confident, split_size=4) == pytest.approx(3.0, rel=1e-9)
    # One split: sure predictions give exp(entropy of the marginal), here of (3, 3, 1, 1) / 8.
    marginal = np.array([3, 3, 1, 1]) / 8
    assert inception_score(confident, split_size=8) == pytest.approx(np.exp(-(marginal * np.log(marginal)).sum()))
    # Undecided samples: p(y|x) = p(y), IS 1, whatever the logits' offset.
    assert inception_score(torch.full((10, 5), 3.0)) == pytest.approx(1.0, abs=1e-12)
    # Against an independent float64 computation on random logits, with a shorter last split (ADM's splitting).
    logits = torch.randn(11, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    probs = torch.softmax(logits, -1).numpy()
    scores = []
    for begin in range(0, 11, 4):
        part = probs[begin : begin + 4]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    assert inception_score(logits, split_size=4) == pytest.approx(np.mean(scores), rel=1e-12)
    with pytest.raises(ValueError, match="non-empty"):
        inception_score(torch.zeros(0, 5))
    with pytest.raises(ValueError, match="`split_size` must be a positive int, got True"):
        inception_score(logits, split_size=True)  # a bool is not a split size


# ----------------------------------------------------------------------------------------------------------------
# Precision and recall


def brute_force_precision_recall(reference: np.ndarray, samples: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Independent float64 definition: k-NN radii (the point itself the 0-th), inclusive balls."""

    def radii(points):
        distances = ((points[:, None] - points[None]) ** 2).sum(-1)
        return np.sort(distances, axis=1)[:, k]

    cross = ((reference[:, None] - samples[None]) ** 2).sum(-1)  # (N_r, N_s)
    precision = (cross <= radii(reference)[:, None]).any(0).mean()
    recall = (cross <= radii(samples)[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_of_constructed_point_sets():
    # Reference: 0..9 on a line. Squared 3-NN radii: 9 at the ends, 4 inside (neighbours at 1, 1, 2).
    reference = torch.arange(10.0)[:, None]
    assert manifold_radii(reference).tolist() == [9.0] + [4.0] * 8 + [9.0]
    # Samples: four inside the reference's span, four far away (a tight cluster around 100).
    samples = torch.tensor([0.5, 3.0, 8.5, 11.0, 100.0, 101.0, 102.0, 103.0])[:, None]
    precision, recall = precision_recall(reference, samples)
    # 11 is within 9 of the end point 9 (distance 4 <= 9); 100.. are outside every ball: precision 4/8.
    # Sample radii: 0.5 -> (0, 6.25, 64, 110.25)[3] = 110.25 covers reference points within 10.5 of 0.5: all ten.
    assert (precision, recall) == (0.5, 1.0)
    assert (precision, recall) == brute_force_precision_recall(reference.numpy(), samples.numpy())


def test_precision_recall_matches_brute_force_in_blocks():
    """Integer features (exact in float16, like every distance below 2048): ADM's float16 arithmetic is exact, so
    the result equals the float64 definition, also with blocks smaller than the sets."""
    rng = np.random.default_rng(1)
    reference = rng.integers(0, 6, size=(23, 4)).astype(np.float32)
    samples = (rng.integers(0, 6, size=(17, 4)) + rng.integers(0, 2, size=(17, 1))).astype(np.float32)
    expected = brute_force_precision_recall(reference.astype(np.float64), samples.astype(np.float64))
    for block_size in (5, 10000):
        assert precision_recall(torch.from_numpy(reference), torch.from_numpy(samples), block_size=block_size) == (
            pytest.approx(expected)
        )
    assert 0 < expected[0] < 1 and 0 < expected[1] <= 1  # not a degenerate case


def test_distances_are_computed_in_float16_arithmetic_as_the_adm_does():
    # 10.01 is 10.0078125 in float16, its square rounded to float16 again: not float32's 100.2001.
    distances = pairwise_squared_distances(torch.tensor([[0.0], [1.0]]), torch.tensor([[10.01]]))
    half_square = torch.tensor(10.01).half().float().square().half().float().item()
    assert distances[0, 0].item() == half_square != pytest.approx(10.01**2, rel=1e-6)
    # |u|^2 - 2 u.v + |v|^2 = 1 - 20.015625 + 100.1875 rounded step by step: 81.1875, not (10.0078125 - 1)^2 = 81.14.
    assert distances[1, 0].item() == 81.1875
    # A squared distance above float16's 65504 is inf there, so the block is redone in float32 (exact here).
    distances = pairwise_squared_distances(torch.tensor([[0.0]]), torch.tensor([[300.0], [1.0]]))
    assert distances.tolist() == [[90000.0, 1.0]]
    with pytest.raises(ValueError, match="more than 3 feature vectors"):
        manifold_radii(torch.zeros(3, 2))


# ----------------------------------------------------------------------------------------------------------------
# Inception network


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    require_torch_fidelity()
    return save_random_inception_weights(tmp_path_factory.mktemp("inception") / "stand-in.pth", seed=0)


def test_core_import_needs_neither_torch_fidelity_nor_torchvision():
    code = ("import sys, flexvar_hf, flexvar_hf.evaluation; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch_fidelity', 'torchvision')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_inception_network_runs_torch_fidelitys_module(random_weights):
    network = InceptionFeatures(random_weights)
    assert type(network.network).__module__ == "torch_fidelity.feature_extractor_inceptionv3"
    # Loaded without torchvision here: nothing of torch_fidelity stays registered, so a later import is a normal one.
    assert "torchvision" in sys.modules or not any(name.startswith("torch_fidelity") for name in sys.modules)
    images = torch.randint(0, 256, (3, 40, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool, logits = network.extract(iter([images[:2].numpy(), images[2:].numpy()]), total=3)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == logits.dtype == torch.float32
    # The IS logits are the pool features times the classifier's weight, without its bias (the ADM's).
    fc = network.network.fc
    assert torch.allclose(logits, pool @ fc.weight.T, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, fc(pool), atol=1e-3)
    # A channels-first image alone gets its features from the batch; the stand-in's features vary by image.
    assert torch.allclose(network(images[1:2].permute(0, 3, 1, 2))[0], pool[1:2], rtol=1e-4, atol=1e-5)
    assert pool.std(0).mean() > 1e-3
    assert inception_module() is inception_module()


def test_inception_weights_are_read_only_with_weights_only(random_weights, monkeypatch):
    loads = []
    real_load = torch.load

    def recording_load(path, *args, **kwargs):
        loads.append((str(path), kwargs.get("weights_only")))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    network = InceptionFeatures(random_weights)
    assert [weights_only for path, weights_only in loads if path == str(random_weights)] == [True]
    expected = real_load(random_weights, weights_only=True)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in network.network.state_dict().items())


def test_weights_are_found_in_the_hub_cache_and_missing_ones_are_named(random_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE_NAMES[0]
    assert default_weights_paths()[0] == expected
    with pytest.raises(ValueError, match=f"{WEIGHTS_FILE_NAMES[0]}.*{expected}"):
        find_inception_weights()
    with pytest.raises(ValueError, match="do not exist"):
        find_inception_weights(tmp_path / "nowhere.pth")
    expected.parent.mkdir(parents=True)
    expected.write_bytes(random_weights.read_bytes())
    assert find_inception_weights() == expected
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="not the Inception-v3 FID weights"):
        InceptionFeatures(bad)
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read Inception weights"):
        InceptionFeatures(bad)


# ----------------------------------------------------------------------------------------------------------------
# npz files and the sample plan


def test_streamed_npz_round_trip_and_errors(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 5, 4, 3), dtype=np.uint8)
    labels = np.arange(7, dtype=np.int64)
    path = write_npz(tmp_path / "batch.npz", {
        "arr_0": ((7, 5, 4, 3), np.uint8, [images[:3], images[3:]]),
        "arr_1": ((7,), np.int64, [labels]),
    })
    with np.load(path) as data:
        assert np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    assert npz_array_header(path, "arr_0") == ((7, 5, 4, 3), np.dtype(np.uint8))
    batches = list(iter_npz_batches(path, "arr_0", 3))
    assert [len(batch) for batch in batches] == [3, 3, 1] and np.array_equal(np.concatenate(batches), images)
    assert batches[0].flags.writeable
    with pytest.raises(ValueError, match="no `mu` array"):
        npz_array_header(path, "mu")
    with pytest.raises(ValueError, match="got 6 rows"):
        write_npz(tmp_path / "short.npz", {"arr_0": ((7, 5, 4, 3), np.uint8, [images[:6]])})
    assert not (tmp_path / "short.npz").exists() and [p.name for p in tmp_path.iterdir()] == ["batch.npz"]
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="as an .npz file"):
        npz_array_header(tmp_path / "text.npz", "arr_0")
    assert zipfile.is_zipfile(path)


def test_sample_plan_classes_seeds_and_errors():
    plan = SamplePlan.per_class([3, 1, 4], images_per_class=2, seed=5)
    assert plan.num_samples == 6 and plan.labels(range(6)) == [3, 1, 4, 3, 1, 4]
    first = [g.initial_seed() for g in plan.generators(range(4))]
    assert first == [sample_seed(5, index) for index in range(4)] and len(set(first)) == 4
    assert [g.initial_seed() for g in plan.generators(range(2, 4))] == first[2:]  # depends on the index alone
    assert sample_seed(6, 0) != sample_seed(5, 0) and 0 <= sample_seed(5, 0) < 2**63
    plan.check_classes(5)
    with pytest.raises(ValueError, match=r"Classes \[4\] are outside the model's classes \[0, 4\)"):
        plan.check_classes(4)
    for kwargs, match in [
        (dict(classes=(), num_samples=3), "non-empty"),
        (dict(classes=(1, 1), num_samples=3), "distinct; repeated: \\[1\\]"),
        (dict(classes=(1, -2), num_samples=3), "class ids >= 0"),
        (dict(classes=(1,), num_samples=0), "positive int, got 0"),
        (dict(classes=(1,), num_samples=2.5), "positive int, got 2.5"),
        (dict(classes=(1,), num_samples=2, seed=-1), "seed"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplePlan(**kwargs)
    with pytest.raises(ValueError, match="images per class must be a positive int"):
        SamplePlan.per_class([1], 0)
