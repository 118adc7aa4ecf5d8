"""
Speed and memory of class-conditional generation, ours against the original FlexVAR sampler.

Builds pipelines of the released sizes with random weights (nothing is downloaded), generates at the paper's
settings (guidance on, top-k 900, top-p 0.95, VQ decode included) and reports latency, images/s, peak memory and a
breakdown into transformer steps, sampling and decoding. With `--original PATH` (a checkout of
github.com/jiaosiyu1999/FlexVAR, never committed here) the original sampler runs in the same process on the same
GPU, under its own float16 autocast, and the ratio is printed.

    python benchmarks/bench_generate.py --sizes d16 d24 --batches 1 16 64 --original .orig --json results.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

from flexvar_hf import FlexVARPipeline, FlexVARScaleScheduler, FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.utils.precision import without_tf32  # full float32 inside (`main` turns TF32 on for the timings)

DEPTHS = {"d16": 16, "d20": 20, "d24": 24, "d30": 30}
VOCAB_SIZE, CODE_DIM, NUM_CLASSES = 8912, 32, 1000
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["d16", "d24"], choices=sorted(DEPTHS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="None: the published schedule for the resolution.")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--fast", action="store_true", help="Time `pipe.enable_fast_sampling()` too.")
    parser.add_argument("--compile", action="store_true", help="Time fast sampling with compiled blocks and decoder.")
    parser.add_argument(
        "--compile_mode", default=None, help="torch.compile mode for --compile, e.g. max-autotune-no-cudagraphs."
    )
    parser.add_argument(
        "--float8",
        choices=["exact", "fast"],
        default=None,
        help="Run the transformer's block products in float8 (`enable_float8_inference`), with exact or fast "
        "accumulation. Every mode of the process is then quantised.",
    )
    parser.add_argument("--check", action="store_true", help="Check fast == plain tokens in float32 first.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Print the top CUDA kernels of a plain run at the last batch size, after the timings (one size only).",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--original", type=Path, default=None, help="Checkout of the original FlexVAR code.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    args = parser.parse_args(argv)
    if args.profile and len(args.sizes) > 1:
        parser.error("--profile takes one size per process: a profile would run before the next size's timings.")
    return args


def build_transformer(depth: int) -> FlexVARTransformer2DModel:
    """A randomly initialised transformer of a released size (width 64 per layer, one head per layer), float32."""
    torch.manual_seed(0)
    return FlexVARTransformer2DModel(
        num_layers=depth,
        hidden_size=64 * depth,
        num_attention_heads=depth,
        num_classes=NUM_CLASSES,
        vocab_size=VOCAB_SIZE,
        code_dim=CODE_DIM,
    )


def build_pipeline(depth: int, dtype: torch.dtype, device: str) -> FlexVARPipeline:
    transformer = build_transformer(depth)
    vqvae = FlexVQModel(num_codes=VOCAB_SIZE, code_dim=CODE_DIM)
    pipe = FlexVARPipeline(transformer=transformer, vqvae=vqvae, scheduler=FlexVARScaleScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def timed(fn, warmup: int, iters: int) -> tuple[float, float]:
    """(mean seconds per call, peak GiB) of `fn()` after `warmup` calls. The peak is the most memory the caching
    allocator held (reserved), which also counts what captured CUDA graphs keep in their private pools."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters, torch.cuda.max_memory_reserved() / 2**30


@contextmanager
def phase_timers(pipe: FlexVARPipeline, totals: dict[str, float]):
    """Synchronising wrappers around the transformer, the sampler and the decoder that add seconds to `totals`."""
    targets = [
        (pipe.transformer, "forward", "transformer"),
        (pipe.scheduler, "step", "sampling"),
        (pipe.vqvae, "decode_indices", "decoding"),
    ]
    originals = []
    for owner, name, phase in targets:
        function = getattr(owner, name)
        originals.append((owner, name))

        def wrapper(*args, _function=function, _phase=phase, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = _function(*args, **kwargs)
            torch.cuda.synchronize()
            totals[_phase] += time.perf_counter() - start
            return result

        setattr(owner, name, wrapper)
    try:
        yield
    finally:
        for owner, name in originals:
            delattr(owner, name)


def bench_ours(pipe: FlexVARPipeline, batch: int, args: argparse.Namespace) -> dict:
    labels = torch.arange(batch) % NUM_CLASSES
    generator = torch.Generator("cuda").manual_seed(0)

    def generate():
        return pipe(
            labels,
            height=args.resolution,
            width=args.resolution,
            num_inference_steps=args.steps,
            generator=generator,
            output_type="pt",
        )

    torch.cuda.synchronize()
    start = time.perf_counter()
    generate()  # with fast sampling, this call captures the graph
    torch.cuda.synchronize()
    first_call = time.perf_counter() - start
    seconds, peak = timed(generate, args.warmup, args.iters)
    totals: dict[str, float] = defaultdict(float)
    with phase_timers(pipe, totals):
        generate()
    return {
        "latency_ms": seconds * 1e3,
        "images_per_s": batch / seconds,
        "peak_gib": peak,
        "first_call_ms": first_call * 1e3,
        "breakdown_ms": {phase: value * 1e3 for phase, value in totals.items()},
    }


class OriginalSampler:
    """The original FlexVAR model and VQ tokenizer of one size, random weights, sampling as its eval_c2i.py."""

    def __init__(self, checkout: Path, depth: int, patch_nums: tuple[int, ...]):
        sys.path.insert(0, str(checkout.resolve()))
        from models.flexvar import FlexVAR
        from models.vq_llama import VQ_models

        torch.manual_seed(0)
        self.vqvae = VQ_models["VQ-16"](codebook_size=VOCAB_SIZE, codebook_embed_dim=CODE_DIM).cuda().eval()
        self.model = FlexVAR(
            vae_local=self.vqvae,
            num_classes=NUM_CLASSES,
            depth=depth,
            embed_dim=64 * depth,
            num_heads=depth,
            attn_l2_norm=True,
            patch_nums=patch_nums,
            drop_path_rate=0.1 * depth / 24,
        ).cuda()
        self.model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)
        self.model.eval()
        self.model.update_patch_related(patch_nums)
        self.patch_nums = patch_nums

    @torch.inference_mode()
    def __call__(self, batch: int) -> torch.Tensor:
        labels = torch.arange(batch, device="cuda") % NUM_CLASSES
        with torch.autocast("cuda", dtype=torch.float16):
            return self.model.autoregressive_infer_cfg(
                vqvae=self.vqvae,
                B=batch,
                label_B=labels,
                infer_patch_nums=self.patch_nums,
                cfg=2.5,
                top_k=900,
                top_p=0.95,
                g_seed=0,
            )

    def release(self) -> None:
        del self.model, self.vqvae
        torch.cuda.empty_cache()


def profile_kernels(pipe: FlexVARPipeline, batch: int, args: argparse.Namespace) -> str:
    """Table of the CUDA kernels of one plain generation, by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    labels = torch.arange(batch) % NUM_CLASSES
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pipe(labels, height=args.resolution, width=args.resolution, num_inference_steps=args.steps, output_type="pt")
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)


@without_tf32()
def check_fast_path(depth: int, torch_compile: bool, batch: int = 4) -> dict:
    """Float32 without TF32: the graph-replayed loop against the plain one, greedy and sampled with the same seed.
    The plain path decodes with the eager NCHW decoder and the compiled fast path with the compiled channels-last
    one, so their images differ by float32 rounding (2e-5 in run 47 of RESULTS.md; 6e-3 with TF32, run 46)."""
    pipe = build_pipeline(depth, torch.float32, "cuda")
    labels = torch.arange(batch)

    def run(**kwargs):
        generator = torch.Generator("cuda").manual_seed(0)
        tokens = pipe(labels, generator=generator, output_type="latent", **kwargs).images
        return tokens, pipe.decode(tokens, output_type="pt")

    plain = {mode: run(top_k=top_k) for mode, top_k in (("greedy", 1), ("sampled", 900))}
    torch._dynamo.reset()
    pipe.enable_fast_sampling(torch_compile=torch_compile)
    fast = {mode: [run(top_k=top_k) for _ in range(2)] for mode, top_k in (("greedy", 1), ("sampled", 900))}
    report = {"size": f"d{depth}", "batch": batch, "compiled": torch_compile}
    for mode in plain:
        tokens, images = plain[mode]
        report[f"{mode}_tokens_equal"] = all(torch.equal(tokens, fast_tokens) for fast_tokens, _ in fast[mode])
        report[f"{mode}_image_max_abs_diff"] = max((images - img).abs().max().item() for _, img in fast[mode])
    return report


def bench_original(sampler: OriginalSampler, batch: int, args: argparse.Namespace) -> dict:
    seconds, peak = timed(lambda: sampler(batch), args.warmup, args.iters)
    return {"latency_ms": seconds * 1e3, "images_per_s": batch / seconds, "peak_gib": peak}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("This benchmark needs a CUDA GPU.")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(args), "runs": []}
    results["args"] = {key: str(value) for key, value in vars(args).items()}

    if args.check:
        compile_modes = [False, True] if args.compile else [False]
        results["checks"] = [check_fast_path(DEPTHS[args.sizes[0]], compiled) for compiled in compile_modes]
        print(json.dumps(results["checks"]), flush=True)
        torch.cuda.empty_cache()

    for size in args.sizes:
        depth = DEPTHS[size]
        pipe = build_pipeline(depth, DTYPES[args.dtype], "cuda")
        pipe.scheduler.set_timesteps(args.steps, height=args.resolution, width=args.resolution)
        scales = pipe.scheduler.scales
        params = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
        suffix = ""
        if args.float8:  # after counting: the float8 weights are buffers
            pipe.transformer.enable_float8_inference(fast_accumulation=args.float8 == "fast")
            suffix = f"_fp8_{args.float8}"
        # (name, fast sampling, compiled). Compilation is permanent, so compiled modes come last; the plain loop
        # over the compiled modules is timed too because only the plain loop gives the per-phase breakdown.
        modes = [("ours", False, False)] + ([("ours_fast", True, False)] if args.fast else [])
        modes += [("ours_compiled", True, True), ("ours_plain_compiled", False, True)] if args.compile else []
        for mode, fast, compiled in modes:
            if fast:
                if compiled:
                    torch._dynamo.reset()  # other sizes and dtypes would count towards recompile_limit
                pipe.enable_fast_sampling(torch_compile=compiled, compile_mode=args.compile_mode if compiled else None)
            else:
                pipe.disable_fast_sampling()
            for batch in args.batches:
                run = {"size": size, "params_m": params, "mode": mode + suffix, "batch": batch}
                run.update(bench_ours(pipe, batch, args))
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
        if args.profile:
            # Last, after every timing: the profiler leaves CUDA's tracing (CUPTI) set up in the process
            # (pytorch/pytorch#144455). Run 11 found no effect on compiled blocks, but a timing taken after it is
            # no longer a plain one. With --compile this is the plain loop over the compiled modules (their kernels,
            # without a graph), else the eager loop.
            print(profile_kernels(pipe, args.batches[-1], args), flush=True)
        del pipe
        gc.collect()
        torch.cuda.empty_cache()

        if args.original is not None:
            sampler = OriginalSampler(args.original, depth, tuple(h for h, _ in scales))
            for batch in args.batches:
                run = {"size": size, "mode": "original", "batch": batch, **bench_original(sampler, batch, args)}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
            sampler.release()

    print_table(results["runs"])
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def print_table(runs: list[dict]) -> None:
    print(f"\n{'size':5} {'mode':20} {'batch':>5} {'latency ms':>11} {'img/s':>8} {'peak GiB':>9} {'vs original':>12}")
    original = {(run["size"], run["batch"]): run for run in runs if run["mode"] == "original"}
    for run in runs:
        base = original.get((run["size"], run["batch"]))
        ratio = f"{run['images_per_s'] / base['images_per_s']:.2f}x" if base and run["mode"] != "original" else ""
        print(
            f"{run['size']:5} {run['mode']:20} {run['batch']:5d} {run['latency_ms']:11.1f} "
            f"{run['images_per_s']:8.1f} {run['peak_gib']:9.2f} {ratio:>12}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
