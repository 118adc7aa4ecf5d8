"""`examples/evaluate_imagenet.py` end to end on the shipped digits model, tiny and at 32x32: the same samples from
any batch size and number of processes, a killed run resumed to the same samples and metrics, metrics that match an
independent computation on the same features, and bad inputs refused before anything is sampled or written.

A randomly initialised Inception network (real architecture, torch-fidelity's module) stands in for the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flexvar_hf import FlexVARPipeline
from flexvar_hf.evaluation import InceptionFeatures, SampleShards, save_random_inception_weights
from test_evaluation import brute_force_precision_recall, numpy_frechet_distance

from conftest import REPO_ROOT, load_example, require_torch_fidelity

MODEL = REPO_ROOT / "models" / "flexvar-digits"
NUM_SAMPLES = 8
SMALL = ["--height", "32", "--width", "32", "--num_inference_steps", "3", "--num_samples", str(NUM_SAMPLES)]


@pytest.fixture(scope="module")
def script():
    return load_example("evaluate_imagenet")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    require_torch_fidelity()
    root = tmp_path_factory.mktemp("evaluation")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "reference.npz", arr_0=images)
    # With FID statistics (any Gaussian: the metrics must use them for FID, as the ADM does).
    half = rng.normal(size=(2048, 16))
    mean, covariance = rng.normal(size=2048), half @ half.T + 0.1 * np.eye(2048)
    np.savez(root / "reference_stats.npz", arr_0=images, mu=mean, sigma=covariance)
    return {"root": root, "weights": save_random_inception_weights(root / "inception.pth"),
            "reference": root / "reference.npz", "reference_stats": root / "reference_stats.npz",
            "images": images, "mu": mean, "sigma": covariance}


def arguments(output_dir, *extra) -> list[str]:
    return ["--model", str(MODEL), "--output_dir", str(output_dir), *SMALL, *extra]


def load_samples(output_dir) -> tuple[np.ndarray, np.ndarray]:
    with np.load(output_dir / "samples.npz") as data:
        return data["arr_0"], data["arr_1"]


@pytest.fixture(scope="module")
def uninterrupted(script, assets):
    """One process, batch 4, one shard, with metrics against the reference with statistics."""
    output_dir = assets["root"] / "uninterrupted"
    assert script.main(arguments(output_dir, "--batch_size", "4", "--shard_size", "8", "--reference",
                                 str(assets["reference_stats"]), "--inception_weights", str(assets["weights"]))) == 0
    return output_dir


def test_outputs_are_the_adm_format_with_a_report_and_a_grid(uninterrupted):
    images, labels = load_samples(uninterrupted)
    assert images.dtype == np.uint8 and images.shape == (NUM_SAMPLES, 32, 32, 3)
    assert labels.tolist() == list(range(NUM_SAMPLES))  # sample i has class i % 10
    assert images.std() > 5 and not np.array_equal(images[0], images[1])
    assert sorted(path.name for path in uninterrupted.iterdir()) == [
        "report.json", "report.md", "samples.npz", "samples_grid.png", "settings.json"]  # shards removed
    report = json.loads((uninterrupted / "report.json").read_text())
    assert report["num_samples"] == report["sampled_this_run"] == NUM_SAMPLES and report["num_processes"] == 1
    assert report["settings"]["sampling"]["scales"] == [[1, 1], [2, 2], [4, 4]]
    assert report["seconds"]["sampling"] > 0 and report["images_per_second"] > 0
    assert set(report["seconds"]) == {"sampling", "writing", "features", "metrics"}
    table = (uninterrupted / "report.md").read_text()
    assert f"| {report['metrics']['fid']:.2f} | {report['metrics']['inception_score']:.1f} |" in table
    with Image.open(uninterrupted / "samples_grid.png") as grid:
        assert grid.size == (8 * 32, 32)  # the first 8 samples in one row of 8
        assert np.array_equal(np.asarray(grid)[:, 32:64], images[1])


def test_metrics_match_an_independent_computation(uninterrupted, assets):
    """FID against the file's mu/sigma, IS and precision/recall the right way round, recomputed in numpy from the
    Inception features of the written samples and of the reference images."""
    metrics = json.loads((uninterrupted / "report.json").read_text())["metrics"]
    network = InceptionFeatures(assets["weights"])
    samples = torch.from_numpy(load_samples(uninterrupted)[0])
    sample_pool, sample_logits = (features.double().numpy() for features in network(samples))
    reference_pool = network(torch.from_numpy(assets["images"]))[0].double().numpy()
    sample_mean, sample_covariance = sample_pool.mean(0), np.cov(sample_pool, rowvar=False)
    fid = numpy_frechet_distance(sample_mean, sample_covariance, assets["mu"], assets["sigma"])
    assert metrics["fid_statistics"] == "reference file" and metrics["fid"] == pytest.approx(fid, rel=1e-5)
    fid_images = numpy_frechet_distance(sample_mean, sample_covariance, reference_pool.mean(0),
                                        np.cov(reference_pool, rowvar=False))
    assert metrics["fid_reference_images"] == pytest.approx(fid_images, rel=1e-4)
    probs = np.exp(sample_logits - sample_logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    kl = (probs * (np.log(probs) - np.log(probs.mean(0, keepdims=True)))).sum(1).mean()
    assert metrics["inception_score"] == pytest.approx(np.exp(kl), rel=1e-4) and metrics["inception_score_splits"] == 1
    # The ADM's float16 distances may move a point that lies on a ball's border: at most one of each here.
    precision, recall = brute_force_precision_recall(reference_pool, sample_pool)
    assert (metrics["precision"], metrics["recall"]) == pytest.approx((precision, recall), abs=1 / NUM_SAMPLES)


def test_batch_size_does_not_change_the_samples(script, assets, uninterrupted):
    output_dir = assets["root"] / "batch7"
    assert script.main(arguments(output_dir, "--batch_size", "7", "--shard_size", "8")) == 0
    for written, expected in zip(load_samples(output_dir), load_samples(uninterrupted)):
        assert np.array_equal(written, expected)
    report = json.loads((output_dir / "report.json").read_text())
    assert report["metrics"] is None and report["reference"] is None  # no reference: samples only


def test_killed_run_resumes_to_the_same_samples_and_metrics(script, assets, uninterrupted, monkeypatch):
    output_dir = assets["root"] / "resumed"
    command = arguments(output_dir, "--batch_size", "3", "--shard_size", "3", "--reference",
                        str(assets["reference_stats"]), "--inception_weights", str(assets["weights"]))
    write = SampleShards.write

    def write_then_die(self, shard, images):
        if shard > 0:
            raise KeyboardInterrupt  # as if killed while sampling the second shard
        return write(self, shard, images)

    monkeypatch.setattr(SampleShards, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        script.main(command)
    monkeypatch.undo()
    assert sorted(path.name for path in (output_dir / "shards").iterdir()) == ["shard-000000.npz"]
    assert not (output_dir / "samples.npz").exists()
    (output_dir / "shards" / ".shard-000001.npz.tmp-deadbeef").write_bytes(b"torn")  # a write cut off by the kill
    assert script.main(command) == 0
    for written, expected in zip(load_samples(output_dir), load_samples(uninterrupted)):
        assert np.array_equal(written, expected)
    resumed = json.loads((output_dir / "report.json").read_text())
    expected = json.loads((uninterrupted / "report.json").read_text())
    assert resumed["sampled_this_run"] == NUM_SAMPLES - 3
    assert resumed["metrics"] == expected["metrics"]
    assert not (output_dir / "shards").exists()


def test_two_processes_write_the_same_samples(assets, uninterrupted):
    output_dir = assets["root"] / "two_processes"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "examples" / "evaluate_imagenet.py"),
               *arguments(output_dir, "--batch_size", "2", "--shard_size", "3")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    for written, expected in zip(load_samples(output_dir), load_samples(uninterrupted)):
        assert np.array_equal(written, expected)
    report = json.loads((output_dir / "report.json").read_text())
    assert report["num_processes"] == 2 and report["sampled_this_run"] == NUM_SAMPLES


@pytest.fixture(scope="module")
def digits_pipe():
    pipe = FlexVARPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def snapshot(folder) -> dict:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def test_bad_inputs_are_refused_before_sampling(script, assets, uninterrupted, digits_pipe, tmp_path, monkeypatch):
    # Every case loads the same model: one loaded copy instead of one per case.
    monkeypatch.setattr(FlexVARPipeline, "from_pretrained", classmethod(lambda cls, *args, **kwargs: digits_pipe))

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(SampleShards, "sample", no_sampling)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    rng = np.random.default_rng(1)
    files = {
        "no_arr_0.npz": dict(images=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)),
        "wrong_size.npz": dict(arr_0=rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)),
        "float_images.npz": dict(arr_0=rng.random((5, 32, 32, 3))),
        "grey_images.npz": dict(arr_0=rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)),
        "three_images.npz": dict(arr_0=rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)),
        "bad_statistics.npz": dict(arr_0=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), mu=np.zeros(7),
                                   sigma=np.eye(7)),
    }
    for name, arrays in files.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "not_an.npz").write_text("text")
    (tmp_path / "weights.pth").write_bytes(b"not a checkpoint")
    good = ["--reference", str(assets["reference"]), "--inception_weights", str(assets["weights"])]
    cases = [
        (["--reference", str(tmp_path / "missing.npz"), *good[2:]], "does not exist"),
        (["--reference", str(tmp_path / "no_arr_0.npz"), *good[2:]], r"no `arr_0` array \(it holds \['images'\]\)"),
        (["--reference", str(tmp_path / "wrong_size.npz"), *good[2:]], "reference images are 64x64 but the samples"),
        (["--reference", str(tmp_path / "float_images.npz"), *good[2:]], "uint8 images .N, 32, 32, 3., got float64"),
        (["--reference", str(tmp_path / "grey_images.npz"), *good[2:]], "must be uint8 images"),
        (["--reference", str(tmp_path / "three_images.npz"), *good[2:]], "more than 3 images"),
        (["--reference", str(tmp_path / "bad_statistics.npz"), *good[2:]], r"mu \(2048,\) and sigma"),
        (["--reference", str(tmp_path / "not_an.npz"), *good[2:]], "as an .npz file"),
        (["--reference", str(assets["reference"])], "weights-inception-2015-12-05-6726825d.pth.*empty_torch_home"),
        ([*good[:2], "--inception_weights", str(tmp_path / "missing.pth")], "do not exist"),
        ([*good[:2], "--inception_weights", str(tmp_path / "weights.pth")], "Cannot read Inception weights"),
        ([*good, "--classes", "3", "12"], r"Classes \[12\] are outside the model's classes \[0, 10\)"),
        ([*good, "--classes", "3", "3"], "distinct; repeated: \\[3\\]"),
        ([*good, "--num_samples", "3"], "Metrics need more than 3 samples, got 3"),
        ([*good, "--batch_size", "0"], "`batch_size` must be a positive int, got 0"),
        ([*good, "--shard_size", "-2"], "`shard_size` must be a positive int, got -2"),
        ([*good, "--guidance_scale", "-1"], "guidance_scale"),
        ([*good, "--scales", "1", "2", "2"], "no two consecutive scales equal"),
    ]
    for index, (extra, match) in enumerate(cases):
        output_dir = tmp_path / f"case{index}"
        with pytest.raises(ValueError, match=match):
            script.main(["--model", "digits", "--output_dir", str(output_dir), *SMALL, *extra])
        assert not output_dir.exists(), extra
    # Sample counts: not positive (ValueError), not an int (argparse's error).
    base = ["--model", "digits", "--output_dir", str(tmp_path / "counts"), "--height", "32", "--width", "32"]
    for extra, match in ((["--num_samples", "0"], "number of samples must be a positive int, got 0"),
                         (["--images_per_class", "-1"], "images per class must be a positive int, got -1")):
        with pytest.raises(ValueError, match=match):
            script.main(base + extra)
    with pytest.raises(SystemExit):
        script.main(base + ["--num_samples", "2.5"])
    assert not (tmp_path / "counts").exists()
    # Output folders: another run's settings, or files that no run wrote; nothing in them changes.
    before = snapshot(uninterrupted)
    with pytest.raises(ValueError, match="other settings .seed: 0 -> 1"):
        script.main(arguments(uninterrupted, "--seed", "1", "--shard_size", "8"))
    assert snapshot(uninterrupted) == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "samples.npz").write_bytes(b"someone else's")
    with pytest.raises(ValueError, match=r"holds \['samples.npz'\] but no settings.json"):
        script.main(arguments(foreign))
    assert (foreign / "samples.npz").read_bytes() == b"someone else's" and len(list(foreign.iterdir())) == 1
