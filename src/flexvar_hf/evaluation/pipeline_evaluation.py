"""Evaluate a class-conditional pipeline as the ADM suite does, on one process or many: `evaluate_pipeline`.

One call samples a `SamplePlan` into shards (spread over the processes of an accelerate launch, resumable), joins
them into the ADM's `samples.npz`, and on the main process computes FID, Inception Score and precision/recall against
a reference batch with the Inception network of `evaluation.inception`, writing a JSON and a markdown report and a
grid of the first samples. Its output folder:

    settings.json       what defines the samples (plan, sampling arguments, model); a rerun must match it
    shards/             finished shards while sampling; removed once samples.npz is written
    samples.npz         arr_0: uint8 (N, H, W, 3) samples, arr_1: int64 (N,) labels, in sample order
    samples_grid.png    the first samples, 8 per row
    report.json, report.md
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from tqdm.auto import tqdm

from ..utils.io import atomic_save
from ..utils.precision import without_tf32
from ..utils.validation import check_int
from .inception import (
    NUM_POOL_FEATURES,
    InceptionFeatures,
    find_inception_weights,
    load_inception_state_dict,
)
from .metrics import (
    IS_SPLIT_SIZE,
    PR_NEIGHBOURHOOD,
    FeatureStatistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from .npz import iter_npz_batches, npz_array_header, npz_keys
from .sampling import SamplePlan, SampleShards, write_samples_npz

SETTINGS_VERSION = 1
GRID_COLUMNS, GRID_ROWS = 8, 4
FINGERPRINT_VALUES = 64  # values read from each weight tensor for the model's fingerprint


@dataclass(frozen=True)
class EvaluationFolder:
    """The files of an evaluation's output folder (see the module docstring)."""

    path: Path

    @property
    def settings(self) -> Path:
        return self.path / "settings.json"

    @property
    def shards(self) -> Path:
        return self.path / "shards"

    @property
    def samples(self) -> Path:
        return self.path / "samples.npz"

    @property
    def grid(self) -> Path:
        return self.path / "samples_grid.png"

    @property
    def report_json(self) -> Path:
        return self.path / "report.json"

    @property
    def report_markdown(self) -> Path:
        return self.path / "report.md"

    def remove_temporaries(self) -> None:
        """Delete what writes cut off by a kill left behind: the temporary files of this folder's own names."""
        for path in (self.samples, self.grid, self.report_json, self.report_markdown):
            for staging in self.path.glob(f".{path.name}.tmp-*"):
                staging.unlink(missing_ok=True)

    def check(self, settings: dict) -> None:
        """
        ValueError unless this folder can hold a run with `settings`: new, or made by a run with the same settings
        (which is then resumed). A folder with other settings, or with files of these names but no settings (not
        written by an evaluation), is refused, so nothing is mixed or overwritten.
        """
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"Output folder {str(self.path)!r} is a file.")
        if not self.settings.is_file():
            ours = [path.name for path in (self.shards, self.samples, self.grid, self.report_json,
                                           self.report_markdown) if path.exists()]
            if ours:
                raise ValueError(
                    f"{str(self.path)!r} holds {ours} but no settings.json, so not from an evaluation run: refusing "
                    "to overwrite them. Choose another output folder."
                )
            return
        existing = json.loads(self.settings.read_text())
        differences = _differences(existing, settings)
        if differences:
            raise ValueError(
                f"{str(self.path)!r} holds an evaluation with other settings ({'; '.join(differences[:8])}): "
                "resuming would mix samples. Use the same settings to resume it, or another output folder."
            )


def _differences(old, new, prefix: str = "") -> list[str]:
    """`"key: old -> new"` for every differing leaf of two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [item for key in sorted(set(old) | set(new), key=str)
                for item in _differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    if old != new:
        return [f"{prefix.rstrip('.')}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_json(value):
    """`value` as JSON would read it back (tuples -> lists, ...), to compare with a settings file."""
    return json.loads(json.dumps(value))


def pipeline_fingerprint(pipe) -> dict:
    """
    A cheap identity of a pipeline: class, configs (without private keys) and a hash of every weight tensor's name,
    shape and `FINGERPRINT_VALUES` evenly spaced values. Differs for other weights (any training step changes them)
    without reading every weight.
    """
    digest = hashlib.sha256()
    configs = {}
    for name in ("transformer", "vqvae", "scheduler"):
        component = getattr(pipe, name)
        configs[name] = {key: value for key, value in component.config.items() if not key.startswith("_")}
        if isinstance(component, torch.nn.Module):
            for key, tensor in component.state_dict().items():
                flat = tensor.detach().reshape(-1)
                values = flat[:: max(1, flat.numel() // FINGERPRINT_VALUES)][:FINGERPRINT_VALUES]
                digest.update(f"{name}.{key}{tuple(tensor.shape)}".encode())
                digest.update(values.float().cpu().numpy().tobytes())
    return _as_json({"class": type(pipe).__name__, "configs": configs, "weights_sha256": digest.hexdigest()})


def resolve_sampling(
    pipe,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    scales=None,
    guidance_scale: float | None = None,
    guidance_schedule: str | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
) -> dict:
    """
    The sampling arguments of `pipe(...)` made explicit and checked (ValueError otherwise): None takes the
    pipeline's default (its `__call__`'s defaults, the model's size and guidance schedule, the published or default
    scales for the size). Returns `height`, `width`, `scales` (`[[h, w], ...]`), `guidance_scale`,
    `guidance_schedule`, `top_k`, `top_p` and `temperature`, to pass as `pipe(labels, **sampling)`. With explicit
    `scales` the size is the last scale's; a `height` / `width` that disagrees is refused.
    """
    parameters = inspect.signature(type(pipe).__call__).parameters
    defaults = {name: parameter.default for name, parameter in parameters.items()}
    scheduler = pipe.scheduler
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    guidance_schedule = scheduler.config.guidance_schedule if guidance_schedule is None else guidance_schedule
    top_k = defaults["top_k"] if top_k is None else top_k
    top_p = defaults["top_p"] if top_p is None else top_p
    temperature = defaults["temperature"] if temperature is None else temperature
    scheduler.check_sampling_args(guidance_scale, guidance_schedule, top_k, top_p, temperature)
    if scales is None:
        height = pipe.default_sample_size if height is None else height
        width = pipe.default_sample_size if width is None else width
        scales = scheduler.get_scales(num_inference_steps, height, width)
    else:
        scales = scheduler.check_scales(scales)
        factor = scheduler.config.vae_scale_factor
        final = (scales[-1][0] * factor, scales[-1][1] * factor)
        if (height or final[0], width or final[1]) != final:
            raise ValueError(f"`scales` end at {final[0]}x{final[1]} pixels, but {height}x{width} was asked for.")
        height, width = final
    return _as_json(dict(height=height, width=width, scales=scales, guidance_scale=float(guidance_scale),
                         guidance_schedule=guidance_schedule, top_k=int(top_k), top_p=float(top_p),
                         temperature=float(temperature)))


@dataclass(frozen=True)
class ReferenceBatch:
    """An ADM reference batch checked by `check_reference`: `num_images` uint8 images and maybe FID statistics."""

    path: Path
    num_images: int
    has_statistics: bool

    def statistics(self, device: torch.device | str = "cpu") -> FeatureStatistics | None:
        """The file's precomputed `mu` / `sigma` (float64 on `device`), or None without them."""
        if not self.has_statistics:
            return None
        with np.load(self.path, allow_pickle=False) as data:
            mean, covariance = data["mu"], data["sigma"]
        return FeatureStatistics(torch.from_numpy(mean).to(device, torch.float64),
                                 torch.from_numpy(covariance).to(device, torch.float64))


def check_reference(path: str | Path, image_size: tuple[int, int]) -> ReferenceBatch:
    """
    Check a reference batch from its headers alone: an `.npz` whose `arr_0` holds uint8 images `(N, H, W, 3)` of
    `image_size` `(H, W)`, more than 3 of them (precision/recall's k = 3), and, if it has `mu`, a `mu` of shape
    `(2048,)` with a `sigma` of `(2048, 2048)`. Raises ValueError saying what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Reference batch {str(path)!r} does not exist.")
    shape, dtype = npz_array_header(path, "arr_0")
    expected = f"uint8 images (N, {image_size[0]}, {image_size[1]}, 3)"
    if len(shape) != 4 or shape[3] != 3 or dtype != np.uint8:
        raise ValueError(f"`arr_0` of {str(path)!r} must be {expected}, got {dtype} of shape {shape}.")
    if tuple(shape[1:3]) != tuple(image_size):
        raise ValueError(
            f"The reference images are {shape[1]}x{shape[2]} but the samples will be {image_size[0]}x{image_size[1]}:"
            " use the reference batch of the sample size (e.g. VIRTUAL_imagenet256_labeled.npz for 256x256)."
        )
    if shape[0] <= PR_NEIGHBOURHOOD:
        raise ValueError(f"The reference batch needs more than {PR_NEIGHBOURHOOD} images, it has {shape[0]}.")
    has_statistics = "mu" in npz_keys(path)
    if has_statistics:
        mean_shape, _ = npz_array_header(path, "mu")
        covariance_shape, _ = npz_array_header(path, "sigma")
        if mean_shape != (NUM_POOL_FEATURES,) or covariance_shape != (NUM_POOL_FEATURES, NUM_POOL_FEATURES):
            raise ValueError(
                f"The FID statistics of {str(path)!r} must be mu ({NUM_POOL_FEATURES},) and sigma "
                f"({NUM_POOL_FEATURES}, {NUM_POOL_FEATURES}), got {mean_shape} and {covariance_shape}."
            )
    return ReferenceBatch(path, shape[0], has_statistics)


def score_features(
    sample_pool: torch.Tensor,
    sample_logits: torch.Tensor,
    reference_pool: torch.Tensor,
    reference_statistics: FeatureStatistics | None = None,
) -> dict:
    """
    The ADM suite's metrics from Inception features: samples' pool features `(N, 2048)` and logits `(N, 1008)`, the
    reference images' pool features `(M, 2048)`, and the reference file's FID statistics if it has them.

    `fid` uses `reference_statistics` when given (the ADM's choice: for ImageNet they are the statistics of the
    whole training set, from the TensorFlow graph that torch-fidelity ports), else the statistics of the reference
    images; `fid_reference_images` always uses the latter (both sides on this network, but only M images, which
    raises FID). `inception_score` over splits of 5,000, `precision` / `recall` with k = 3 against the reference
    images. Computed in float32 without TF32 and float64 where the ADM uses it.
    """
    with without_tf32():
        sample_statistics = FeatureStatistics.from_features(sample_pool)
        image_statistics = FeatureStatistics.from_features(reference_pool)
        precision, recall = precision_recall(reference_pool, sample_pool)
        return {
            "fid": frechet_distance(sample_statistics, reference_statistics or image_statistics),
            "fid_statistics": "reference file" if reference_statistics is not None else "reference images",
            "fid_reference_images": frechet_distance(sample_statistics, image_statistics),
            "inception_score": inception_score(sample_logits),
            "inception_score_splits": math.ceil(len(sample_logits) / IS_SPLIT_SIZE),
            "precision": precision,
            "recall": recall,
        }


def save_grid(samples_path: str | Path, path: str | Path, columns: int = GRID_COLUMNS, rows: int = GRID_ROWS) -> Path:
    """PNG of the first `columns * rows` samples of `samples_path`, row by row (white where there are fewer)."""
    images = next(iter_npz_batches(samples_path, "arr_0", columns * rows))
    rows = -(-len(images) // columns)
    canvas = np.full((rows * columns, *images.shape[1:]), 255, dtype=np.uint8)
    canvas[: len(images)] = images
    height, width = images.shape[1:3]
    canvas = canvas.reshape(rows, columns, height, width, 3).transpose(0, 2, 1, 3, 4).reshape(rows * height, -1, 3)
    return atomic_save(lambda staging: Image.fromarray(canvas).save(staging, format="PNG"), path)


def markdown_report(report: dict) -> str:
    """The report as a markdown table of the metrics and timings, and a list of the settings."""
    settings, sampling, seconds = report["settings"], report["settings"]["sampling"], report["seconds"]
    metrics = report["metrics"] or {}

    def number(key: str, digits: int) -> str:
        return f"{metrics[key]:.{digits}f}" if key in metrics else "-"

    metric_seconds = seconds.get("features", 0.0) + seconds.get("metrics", 0.0)
    lines = [
        "| FID | IS | precision | recall | samples | sampling s | images/s | writing s | metrics s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {number('fid', 2)} | {number('inception_score', 1)} | {number('precision', 3)} | {number('recall', 3)} | "
        f"{report['num_samples']} | {seconds['sampling']:.1f} | {report['images_per_second']:.1f} | "
        f"{seconds['writing']:.1f} | {metric_seconds:.1f} |",
        "",
    ]
    if metrics:
        num_reference = report["num_reference_images"]
        if metrics["fid_statistics"] == "reference file":
            fid = (f"FID against the reference file's statistics (mu, sigma); against the Inception statistics of "
                   f"its {num_reference} images on this network: {metrics['fid_reference_images']:.2f}.")
        else:
            fid = f"FID against the Inception statistics of the {num_reference} reference images (no mu, sigma)."
        lines += [
            f"{fid} Inception Score over {metrics['inception_score_splits']} split(s) of up to {IS_SPLIT_SIZE} "
            f"samples; precision and recall with k = {PR_NEIGHBOURHOOD} against the reference images. Metrics s: "
            f"the Inception features of samples and reference ({seconds['features']:.1f} s), then the metrics.",
            "",
        ]
    lines += [
        f"- samples: {report['num_samples']} of {len(settings['classes'])} classes, seed {settings['seed']}; "
        f"{report['sampled_this_run']} sampled by this run on {report['num_processes']} process(es), "
        f"{report['device']}",
        f"- size {sampling['height']}x{sampling['width']}, {len(sampling['scales'])} steps (scales "
        f"{[max(scale) for scale in sampling['scales']]}), guidance {sampling['guidance_scale']:g} "
        f"({sampling['guidance_schedule']}), top-k {sampling['top_k']}, top-p {sampling['top_p']:g}, temperature "
        f"{sampling['temperature']:g}",
        f"- model: {report['model']}, {json.dumps(settings['model']['run'])}, weights fingerprint "
        f"{settings['model']['pipeline']['weights_sha256'][:12]}",
        f"- reference: {report['reference']}; Inception weights: {report['inception_weights']}",
    ]
    return "\n".join(lines) + "\n"


def process_state() -> PartialState:
    """
    accelerate's state of this process: on the CPU when asked (`accelerate launch --cpu`, `ACCELERATE_USE_CPU=1`)
    or when there is no accelerator, so that CPU processes form a gloo group. ValueError if the launch has more
    processes (`WORLD_SIZE`) than accelerate sees, which would let every process write every file.
    """
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != world_size:
        raise ValueError(
            f"Launched as {world_size} processes, but accelerate sees {state.num_processes}: on CPUs, launch with "
            "`accelerate launch --cpu` or set ACCELERATE_USE_CPU=1."
        )
    return state


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def evaluate_pipeline(
    pipe,
    output_dir: str | Path,
    plan: SamplePlan,
    sampling: dict | None = None,
    reference: str | Path | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 100,
    shard_size: int = 500,
    inception_batch_size: int = 200,
    run_settings: dict | None = None,
    model_name: str | None = None,
    state: PartialState | None = None,
) -> dict | None:
    """
    Sample `plan` with `pipe` into `output_dir` and score it against `reference` (see the module docstring).

    Every process of an accelerate launch (`state`) calls this with the same arguments
    and its own copy of the pipeline on its device; the missing shards are dealt out to the processes in turn. Every
    input is checked (ValueError) before anything is sampled or written: the plan against the model's classes, the
    sampling arguments, the reference batch (`check_reference`), the Inception weights and the output folder
    (`EvaluationFolder.check`).

    Args:
        pipe (`FlexVARPipeline`): The pipeline, on this process's device (fast sampling, compilation, float8 set).
        output_dir (`str` or `Path`): The output folder; a folder of an earlier run with the same settings resumes.
        plan (`SamplePlan`): Classes, number of samples and seed.
        sampling (`dict`, *optional*): Keyword arguments of `resolve_sampling` (size, steps or scales, guidance,
            top-k, top-p, temperature); what is left out takes the pipeline's defaults.
        reference (`str` or `Path`, *optional*): ADM reference batch; None samples only (no metrics, no weights).
        inception_weights (`str` or `Path`, *optional*): The Inception weights; None looks in the torch hub cache.
        batch_size (`int`, defaults to 100): Images per pipeline call.
        shard_size (`int`, defaults to 500): Samples per shard (the unit of resuming and of work per process).
        inception_batch_size (`int`, defaults to 200): Images per Inception call.
        run_settings (`dict`, *optional*): More settings that change the samples (dtype, float8, compilation, the
            model's name), recorded and checked with the others.
        model_name (`str`, *optional*): The model's name or path, for the report (not checked: the model's weights
            are, through `pipeline_fingerprint`).
        state (`PartialState`, *optional*): accelerate's process state; default `process_state()`.

    Returns:
        The report (also in `report.json`) on the main process, None on the others.
    """
    state = process_state() if state is None else state
    sampling = resolve_sampling(pipe, **(sampling or {}))
    image_shape = (sampling["height"], sampling["width"], 3)
    reference_batch, weights = _check_inputs(pipe, plan, image_shape, reference, inception_weights, batch_size,
                                             inception_batch_size)
    folder = EvaluationFolder(Path(output_dir))
    shards = SampleShards(folder.shards, plan, shard_size)
    settings = _as_json({
        "version": SETTINGS_VERSION, "classes": plan.classes, "num_samples": plan.num_samples, "seed": plan.seed,
        "shard_size": shard_size, "sampling": sampling,
        "model": {"pipeline": pipeline_fingerprint(pipe), "run": run_settings or {}},
    })
    folder.check(settings)
    state.wait_for_everyone()  # every process has checked the folder before the main one writes to it

    if state.is_main_process:
        folder.shards.mkdir(parents=True, exist_ok=True)
        if not folder.settings.is_file():
            atomic_save(lambda staging: staging.write_text(json.dumps(settings, indent=2) + "\n"), folder.settings)
        folder.remove_temporaries()
        shards.remove_temporaries()
    state.wait_for_everyone()
    sampled_complete = folder.samples.is_file()
    missing = [] if sampled_complete else shards.missing()
    state.wait_for_everyone()  # every process has listed the missing shards before any is written
    seconds = {"sampling": _sample_shards(state, shards, missing, pipe, batch_size, sampling)}
    if not state.is_main_process:
        return None

    start = time.perf_counter()
    if not sampled_complete:
        write_samples_npz(folder.samples, shards, image_shape)
    shutil.rmtree(folder.shards, ignore_errors=True)
    save_grid(folder.samples, folder.grid)
    seconds["writing"] = time.perf_counter() - start
    metrics = None
    if reference_batch is not None:
        network = InceptionFeatures(weights).to(state.device)
        metrics = _measure(network, folder.samples, reference_batch, inception_batch_size, seconds)
    sampled = sum(len(shards.indices(shard)) for shard in missing)
    report = {
        "model": model_name,
        "metrics": metrics,
        "num_samples": plan.num_samples,
        "num_reference_images": None if reference_batch is None else reference_batch.num_images,
        "sampled_this_run": sampled,
        "seconds": seconds,
        "images_per_second": sampled / seconds["sampling"] if sampled else 0.0,
        "num_processes": state.num_processes,
        "device": _device_name(state.device),
        "reference": None if reference is None else str(reference),
        "inception_weights": None if weights is None else str(weights),
        "outputs": {"samples": str(folder.samples), "grid": str(folder.grid), "report": str(folder.report_markdown)},
        "settings": settings,
    }
    atomic_save(lambda staging: staging.write_text(json.dumps(report, indent=2) + "\n"), folder.report_json)
    atomic_save(lambda staging: staging.write_text(markdown_report(report)), folder.report_markdown)
    return report


def _check_inputs(
    pipe, plan: SamplePlan, image_shape: tuple, reference, inception_weights, batch_size: int,
    inception_batch_size: int,
) -> tuple[ReferenceBatch | None, Path | None]:
    """`evaluate_pipeline`'s checks before anything is written; returns the checked reference and weights."""
    plan.check_classes(pipe.transformer.config.num_classes)
    check_int("batch_size", batch_size, minimum=1)
    check_int("inception_batch_size", inception_batch_size, minimum=1)
    if reference is None:
        return None, None
    reference_batch = check_reference(reference, image_shape[:2])
    if plan.num_samples <= PR_NEIGHBOURHOOD:
        raise ValueError(f"Metrics need more than {PR_NEIGHBOURHOOD} samples, got {plan.num_samples}.")
    weights = find_inception_weights(inception_weights)
    load_inception_state_dict(weights)
    return reference_batch, weights


def _sample_shards(state: PartialState, shards: SampleShards, missing: list[int], pipe, batch_size: int,
                   sampling: dict) -> float:
    """Sample this process's share of the `missing` shards (every `num_processes`-th); the seconds until every
    process is done."""
    mine = missing[state.process_index :: state.num_processes]
    start = time.perf_counter()
    with tqdm(total=sum(len(shards.indices(shard)) for shard in mine), unit="img",
              desc=f"Sampling (process {state.process_index} of {state.num_processes})",
              disable=not state.is_local_main_process) as progress:
        shards.sample(mine, pipe, batch_size, progress, **sampling)
    state.wait_for_everyone()
    return time.perf_counter() - start


def _measure(network: InceptionFeatures, samples_path: Path, reference: ReferenceBatch, batch_size: int,
             seconds: dict) -> dict:
    """`score_features` of the samples against `reference`; adds the seconds of the feature extraction
    (`features`) and of the metrics (`metrics`) to `seconds`."""
    start = time.perf_counter()
    num_samples = npz_array_header(samples_path, "arr_0")[0][0]
    sample_pool, sample_logits = network.extract(
        iter_npz_batches(samples_path, "arr_0", batch_size), num_samples, "Inception features, samples"
    )
    reference_pool, _ = network.extract(
        iter_npz_batches(reference.path, "arr_0", batch_size), reference.num_images, "Inception features, reference"
    )
    seconds["features"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics = score_features(sample_pool, sample_logits, reference_pool, reference.statistics(sample_pool.device))
    seconds["metrics"] = time.perf_counter() - start
    return metrics
