"""Evaluate a class-conditional FlexVAR pipeline as the paper does: FID, Inception Score, precision and recall.

    accelerate launch examples/evaluate_imagenet.py --model path/to/flexvar-d24 \
        --reference VIRTUAL_imagenet256_labeled.npz \
        --inception_weights weights-inception-2015-12-05-6726825d.pth \
        --output_dir eval/d24 --fast_sampling --compile

(or `python examples/evaluate_imagenet.py ...` for one process). Defaults are the paper's evaluation: 50 samples of
every class of the model (50,000 for ImageNet), the pipeline's sampling defaults (the published 10-step schedule at
256x256, guidance 3.5 with the linear schedule, top-k 900, top-p 0.95), metrics as OpenAI's ADM suite computes them
against its reference batch. Sample `i` has class `i % num_classes` and draws from a generator seeded from (seed, i),
so any number of processes gives the same samples; a killed run started again with the same command continues from
its finished shards. Outputs in `--output_dir`: `samples.npz` (the ADM format: `arr_0` uint8 images, `arr_1`
labels), `report.json`, `report.md`, `samples_grid.png`. Without `--reference` it only samples. See
docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flexvar_hf import FlexVARPipeline
from flexvar_hf.evaluation import SamplePlan, evaluate_pipeline, process_state

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="FlexVARPipeline folder or Hub id.")
    parser.add_argument("--output_dir", required=True, help="Samples, report and grid; an earlier run here resumes.")
    parser.add_argument("--reference", default=None,
                        help="ADM reference batch (.npz with arr_0 uint8 images of the sample size). Without it, "
                             "only samples are made.")
    parser.add_argument("--inception_weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth. Default: the torch hub "
                             "cache (~/.cache/torch/hub/checkpoints/).")
    count = parser.add_mutually_exclusive_group()
    count.add_argument("--images_per_class", type=int, default=50, help="Samples of each class (default 50).")
    count.add_argument("--num_samples", type=int, default=None,
                       help="Total samples instead, the classes taken in turn.")
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="Class ids (default: all the model has).")
    parser.add_argument("--seed", type=int, default=0, help="Sample i draws from a generator seeded from (seed, i).")
    sampling = parser.add_argument_group("sampling (default: the pipeline's)")
    sampling.add_argument("--height", type=int, default=None)
    sampling.add_argument("--width", type=int, default=None)
    sampling.add_argument("--num_inference_steps", type=int, default=None)
    sampling.add_argument("--scales", type=int, nargs="+", default=None, help="Explicit square scales as token sides, "
                          "e.g. 1 2 3 4 5 6 8 10 13 16; override --num_inference_steps, and the last sets the size.")
    sampling.add_argument("--guidance_scale", type=float, default=None)
    sampling.add_argument("--guidance_schedule", default=None, choices=["linear", "constant"])
    sampling.add_argument("--top_k", type=int, default=None)
    sampling.add_argument("--top_p", type=float, default=None)
    sampling.add_argument("--temperature", type=float, default=None)
    speed = parser.add_argument_group("speed")
    speed.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                       help="Weights and compute dtype; auto: bfloat16 on a GPU, float32 on the CPU.")
    speed.add_argument("--fast_sampling", action="store_true", help="`pipe.enable_fast_sampling()` (CUDA graphs).")
    speed.add_argument("--compile", action="store_true", help="Also torch.compile blocks and decoder (implies "
                       "--fast_sampling).")
    speed.add_argument("--float8", choices=["exact", "fast"], default=None,
                       help="Float8 block products (`enable_float8_inference`), exact or fast accumulation.")
    speed.add_argument("--batch_size", type=int, default=100, help="Images per pipeline call.")
    speed.add_argument("--shard_size", type=int, default=500, help="Samples per shard (the unit of resuming).")
    speed.add_argument("--inception_batch_size", type=int, default=200)
    return parser.parse_args(argv)


def load_pipeline(args: argparse.Namespace, device: torch.device) -> tuple[FlexVARPipeline, dict]:
    """The pipeline on `device`, with the speed options applied, and those options as settings."""
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    pipe = FlexVARPipeline.from_pretrained(args.model, dtype=DTYPES[dtype_name]).to(device)
    pipe.set_progress_bar_config(disable=True)
    if args.float8 is not None:
        pipe.transformer.enable_float8_inference(fast_accumulation=args.float8 == "fast")
    if args.fast_sampling or args.compile:
        pipe.enable_fast_sampling(torch_compile=args.compile)
    return pipe, {"dtype": dtype_name, "float8": args.float8, "compile": args.compile}


def main(argv=None) -> int:
    args = parse_args(argv)
    state = process_state()
    pipe, run_settings = load_pipeline(args, state.device)
    classes = args.classes if args.classes is not None else range(pipe.transformer.config.num_classes)
    if args.num_samples is not None:
        plan = SamplePlan(tuple(classes), args.num_samples, args.seed)
    else:
        plan = SamplePlan.per_class(tuple(classes), args.images_per_class, args.seed)
    sampling = {name: getattr(args, name) for name in ("height", "width", "num_inference_steps", "scales",
                                                        "guidance_scale", "guidance_schedule", "top_k", "top_p",
                                                        "temperature")}
    report = evaluate_pipeline(
        pipe, args.output_dir, plan, sampling, reference=args.reference, inception_weights=args.inception_weights,
        batch_size=args.batch_size, shard_size=args.shard_size, inception_batch_size=args.inception_batch_size,
        run_settings=run_settings, model_name=args.model, state=state,
    )
    if report is not None:
        print(Path(report["outputs"]["report"]).read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
