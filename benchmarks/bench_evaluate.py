"""
Time an ImageNet evaluation end to end on one GPU, ours against the original's sampler.

For each size, a pipeline of the released size with random weights (nothing is downloaded) runs
`flexvar_hf.evaluation.evaluate_pipeline` as `examples/evaluate_imagenet.py` does: fast sampling with compiled
blocks and decoder, bfloat16 (float8 optional), the paper's settings at 256x256 (published 10-step schedule, guidance
3.5 linear, top-k 900, top-p 0.95), classes 0-999 in turn, one generator per sample, shards, `samples.npz`, then the
Inception features of the samples and of a reference batch and FID, IS, precision and recall. The Inception network
is a random stand-in of the real architecture (the same cost) and the reference batch random images with FID
statistics, so the metric values mean nothing; the times are the real ones.

Reported per size: start-up (building the pipeline, compiling and capturing the first batch), sampling, writing
`samples.npz`, Inception features (samples and reference), metrics, and the total. A size sampled with fewer than
50,000 images also reports its sampling time scaled to 50,000 (sampling time grows with the count; start-up and the
reference's features do not), marked as extrapolated. With `--original PATH` (a checkout of
github.com/jiaosiyu1999/FlexVAR, never committed here), the original's sampler, as its `eval_c2i.py` runs it, is timed
on the same GPU with `bench_generate.py`'s `OriginalSampler`.

    python benchmarks/bench_evaluate.py --sizes d24 d16 --num_samples 50000 10000 --float8 fast none \
        --original .orig --original_sizes d24 --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flexvar_hf import FlexVARScaleScheduler
from flexvar_hf.evaluation import (
    SamplePlan,
    evaluate_pipeline,
    generate_samples,
    process_state,
    resolve_sampling,
    save_random_inception_weights,
    write_npz,
)
from flexvar_hf.evaluation.inception import NUM_POOL_FEATURES

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import DEPTHS, OriginalSampler, bench_original, build_pipeline  # noqa: E402

FULL_EVALUATION = 50_000
NUM_CLASSES = 1000


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["d24", "d16"], choices=sorted(DEPTHS))
    parser.add_argument("--num_samples", nargs="+", type=int, default=[FULL_EVALUATION, 10_000],
                        help="Samples per size (one number for all sizes, or one per size).")
    parser.add_argument("--float8", nargs="+", choices=["exact", "fast", "none"], default=["none"],
                        help="Float8 block products per size (one for all, or one per size).")
    parser.add_argument("--batch_size", type=int, default=125)
    parser.add_argument("--shard_size", type=int, default=500)
    parser.add_argument("--inception_batch_size", type=int, default=500)
    parser.add_argument("--reference_images", type=int, default=10_000, help="As ADM's ImageNet reference batch.")
    parser.add_argument("--original", type=Path, default=None, help="Checkout of the original FlexVAR code.")
    parser.add_argument("--original_sizes", nargs="*", default=None, choices=sorted(DEPTHS),
                        help="Sizes to time the original at (default: all of --sizes).")
    parser.add_argument("--original_batch", type=int, default=64, help="eval_c2i.py's default batch size.")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/bench_evaluate"),
                        help="Each call works in a new folder made here, removed at the end.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    for name in ("num_samples", "float8"):
        values = getattr(args, name)
        if len(values) not in (1, len(args.sizes)):
            parser.error(f"--{name} takes one value or one per size ({len(args.sizes)}), got {len(values)}.")
        setattr(args, name, values * len(args.sizes) if len(values) == 1 else values)
    return args


def write_reference(path: Path, num_images: int, seed: int = 0) -> Path:
    """Random 256x256 uint8 images with FID statistics, in the ADM's format, written in chunks."""
    rng = np.random.default_rng(seed)
    chunks = (rng.integers(0, 256, size=(min(1000, num_images - begin), 256, 256, 3), dtype=np.uint8)
              for begin in range(0, num_images, 1000))
    return write_npz(path, {
        "arr_0": ((num_images, 256, 256, 3), np.uint8, chunks),
        "mu": ((NUM_POOL_FEATURES,), np.float64, [np.zeros(NUM_POOL_FEATURES)]),
        "sigma": ((NUM_POOL_FEATURES, NUM_POOL_FEATURES), np.float64, [np.eye(NUM_POOL_FEATURES)]),
    })


def evaluate_size(size: str, num_samples: int, float8: str, args, reference: Path, weights: Path,
                  output_dir: Path) -> dict:
    """One size: start-up, then `evaluate_pipeline`'s sampling, writing, features and metrics into `output_dir` (a
    new folder, removed afterwards)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe = build_pipeline(DEPTHS[size], torch.bfloat16, "cuda")
    if float8 != "none":
        pipe.transformer.enable_float8_inference(fast_accumulation=float8 == "fast")
    pipe.enable_fast_sampling(torch_compile=True)
    plan = SamplePlan(tuple(range(NUM_CLASSES)), num_samples)
    sampling = resolve_sampling(pipe)
    next(generate_samples(pipe, plan, range(args.batch_size), args.batch_size, **sampling))  # compile and capture
    torch.cuda.synchronize()
    startup = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    report = evaluate_pipeline(
        pipe, output_dir, plan, sampling, reference=reference, inception_weights=weights, batch_size=args.batch_size,
        shard_size=args.shard_size, inception_batch_size=args.inception_batch_size, state=process_state(),
    )
    seconds = report["seconds"]
    result = {
        "size": size, "float8": float8, "num_samples": num_samples, "batch_size": args.batch_size,
        "startup_s": startup, **{f"{phase}_s": value for phase, value in seconds.items()},
        "images_per_s": report["images_per_second"],
        "inception_images_per_s": (num_samples + args.reference_images) / seconds["features"],
        "total_s": startup + sum(seconds.values()),
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30,
    }
    if num_samples < FULL_EVALUATION:
        scale = FULL_EVALUATION / num_samples
        result["extrapolated_50k_sampling_s"] = seconds["sampling"] * scale
        result["extrapolated_50k_total_s"] = result["total_s"] + seconds["sampling"] * (scale - 1)
    shutil.rmtree(output_dir, ignore_errors=True)
    del pipe
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return result


def time_original(size: str, args) -> dict:
    """images/s of the original sampler at `--original_batch` (1 warm-up, 3 timed calls)."""
    sides = tuple(height for height, _ in FlexVARScaleScheduler().get_scales(None, 256, 256))
    sampler = OriginalSampler(args.original, DEPTHS[size], sides)
    timing = bench_original(sampler, args.original_batch, argparse.Namespace(warmup=1, iters=3))
    sampler.release()
    images_per_s = timing["images_per_s"]
    return {"size": size, "mode": "original", "batch_size": args.original_batch, **timing,
            "sampling_50k_s": FULL_EVALUATION / images_per_s}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    # A folder of this call's own: nothing already in --work_dir is overwritten or removed.
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.work_dir))
    try:
        return run(args, run_dir)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run(args, run_dir: Path) -> int:
    start = time.perf_counter()
    weights = save_random_inception_weights(run_dir / "inception-stand-in.pth")
    reference = write_reference(run_dir / "reference.npz", args.reference_images)
    print(json.dumps({"stand_in_files_s": time.perf_counter() - start}), flush=True)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "args": {key: str(value) for key, value in vars(args).items()}, "runs": []}
    for index, (size, num_samples, float8) in enumerate(zip(args.sizes, args.num_samples, args.float8)):
        result = evaluate_size(size, num_samples, float8, args, reference, weights, run_dir / f"{index}-{size}")
        results["runs"].append(result)
        print(json.dumps(result), flush=True)
    if args.original is not None:
        for size in args.sizes if args.original_sizes is None else args.original_sizes:
            result = time_original(size, args)
            results["runs"].append(result)
            print(json.dumps(result), flush=True)
    print_table(results["runs"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(runs: list[dict]) -> None:
    print(f"\n{'size':5} {'mode':14} {'samples':>7} {'start s':>8} {'sampling s':>10} {'img/s':>7} {'write s':>8} "
          f"{'features s':>10} {'metrics s':>9} {'total s':>8} {'50k total s':>12}")
    for run in runs:
        if run.get("mode") == "original":
            print(f"{run['size']:5} {'original':14} {'':>7} {'':>8} {run['sampling_50k_s']:10.1f} "
                  f"{run['images_per_s']:7.1f}   (50k at batch {run['batch_size']}, sampling only)")
            continue
        mode = "ours" + ("" if run["float8"] == "none" else f" fp8 {run['float8']}")
        full = run.get("extrapolated_50k_total_s", run["total_s"])
        mark = " (extrap.)" if "extrapolated_50k_total_s" in run else ""
        print(f"{run['size']:5} {mode:14} {run['num_samples']:7d} {run['startup_s']:8.1f} {run['sampling_s']:10.1f} "
              f"{run['images_per_s']:7.1f} {run['writing_s']:8.1f} {run['features_s']:10.1f} {run['metrics_s']:9.1f} "
              f"{run['total_s']:8.1f} {full:12.1f}{mark}")


if __name__ == "__main__":
    raise SystemExit(main())
