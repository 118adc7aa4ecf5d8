"""
Training throughput: our training step against the original FlexVAR trainer's, side by side in one process, and
`examples/train.py` end to end.

Step mode (the default). One step is what a training loop does per batch once the batch is on the GPU: VQ encoding
(unless `cache`) and multi-scale quantisation at the step's scales (frozen VQ model, no gradients), the
teacher-forcing forward pass, cross-entropy, the backward pass, gradient clipping at 2.0 and an AdamW (0.9, 0.95)
step. Data loading and logging are left out. Random weights of the released sizes (vocabulary 8912, code dim 32, 1000
classes, the default VQ-16), random pixels in [-1, 1] and random labels; nothing is downloaded.

- ours: `flexvar_hf.training.flexvar_loss.training_loss` + `loss.backward()` + `clip_and_step` over
  `build_optimizer`, the functions `examples/train.py` runs per step, set up as under `--mixed_precision bf16
  --allow_tf32` (the forward under bfloat16 autocast, the VQ encoder in bfloat16, the codebook search in float32),
  with the original's stochastic depth (0.1 * depth / 24). A config names its speed options, joined by "+": the
  attention `sdpa` (one masked call; `plain` is `sdpa` alone), `flex` or `per_scale` (`--training_attention`),
  `fused` (`--fused_adamw`: fused AdamW, the clip factor applied inside its kernel as train.py does; `unfolded` adds
  the clipping's own pass back), `cache` (latents encoded once, as `--cache_latents`: the step starts from them),
  `compile` (`--torch_compile`: Inductor with `flexvar_hf.utils.inductor.wide_row_inductor`'s one-pass reductions of
  rows up to 2,048 wide), `autotune` (the same compilation in Inductor's "max-autotune-no-cudagraphs" mode),
  `autodynamic` (the blocks compiled with automatic dynamic shapes, only the sequence length symbolic after the first
  recompilation), `coordtune` (compiled with Inductor's coordinate-descent tuning of its own kernels' block sizes),
  `cppwrap` (compiled with Inductor's C++ wrapper, which launches the kernels of each compiled block from C++ rather
  than Python: less host time per kernel), `graphs` (compiled in Inductor's "reduce-overhead" mode: each block's
  forward and backward replayed as CUDA graphs, recorded once per sequence length), `combo` (compiled with
  Inductor's combo kernels: independent small kernels of a graph, such as the casts of each block's weights to
  bf16, launched as one), `defaulttiles` (FlexAttention with Inductor's default kernel settings, not the
  library's `FLEX_KERNEL_OPTIONS`), `stack` (the whole stack of blocks compiled as one graph,
  `torch.compile(transformer.run_blocks)`, instead of each block: one compiled call per step instead of one per
  layer; it takes the other compile flags' settings), `inductorrows` (compiled with Inductor's own limit of 1,024
  elements for one-pass row reductions: a d24 block's LayerNorm rows, 1,536 wide, read once for their statistics
  and again to apply them, forward and backward), `bf16weights` (`--bf16_weights`: the linear layers' weights kept
  in bfloat16 with float32 masters in the optimizer, no casts of the weights and their gradients in the forward and
  backward passes, the clip folded into the compiled update; instead of `fused`), `ckpt`
  (`--gradient_checkpointing`). The Inductor modes (`autotune`, `graphs`) compile with Inductor's own limit too.
  `unfolded`, `autotune`, `autodynamic`, `coordtune`, `cppwrap`, `graphs`, `combo`, `defaulttiles`, `stack` and
  `inductorrows` are experiments of the step mode alone (`STEP_ONLY_FLAGS`): train.py has no such option.
- original (`--original PATH`, a checkout of github.com/jiaosiyu1999/FlexVAR, never committed here): its
  `VARTrainer.train_step` on its own FlexVAR, VQ-16, `AmpOptimizer` and `filter_params` groups as its train.py builds
  them (fused AdamW, TF32, drop path 0.1 * depth / 24). Its published commands pass `--fp16=1` (float16 autocast, a
  GradScaler); `--original_amp bf16` times its bfloat16 setting too.

Every code runs the same list of random schedules, drawn by `FlexVARScaleScheduler.sample_training_scales(...,
keep_final_scale=False)`, which is the original's `gen_curr_patch_nums` distribution (tests/test_scheduler.py); the
original is handed each schedule in place of its own draw. Warm-up schedules first (new shapes cost more at first, and
compilation happens there: `first_step_s` is the first step's time), then the timed ones, each run once untimed
before it is timed (`--rehearse`, the default): a long run meets few new sequence lengths (the draw has a few hundred:
after 1,000 steps about 97% of the draws repeat one seen before), and the original pays a large cost at each length
it meets for the first time while ours compiles once for all, so unrehearsed timings (`--no-rehearse`, where 44 of
the first 48 timed schedules after 6 warm-up steps have a length neither code has run) overstate the ratio of a
long run (benchmarks/RESULTS.md, ninth session). tokens/s = tokens of the timed steps / their time. Peak memory =
`max_memory_reserved` over the timed steps
(what the process holds; `peak_allocated_gib` in the JSON: `max_memory_allocated`, what its tensors held).

MFU = model FLOPs per second / 989 TFLOP/s (the dense bf16 peak on the datasheets of the H100 SXM and the H200);
`of_790` divides by the ~790 TFLOP/s a large bf16 matrix product measured on these machines instead. Model FLOPs of a
step = 3 x the forward's (backward = 2 x forward): per token 2 x the weights of the blocks' four projections, the
code embedding and the head; per image 2 x the AdaLN weights; attention 4 x width x (query, key) pairs a block may
see (each scale's tokens times the tokens up to its scale's end, the block-causal pairs; not the masked ones) per
block. The frozen VQ encoder's FLOPs are not counted, in either code.

End-to-end mode (`--e2e`): `examples/train.py`'s `main` in this process on a folder of JPEG files of ImageNet's sizes
(`--e2e_data`, made if missing: smooth random images of about 500 x 375 in 10 class folders, by default enough for
every step to come from the first epoch, as in a run on ImageNet, whose epochs are thousands of steps long), with its
data loading (`--dataloader_num_workers`), augmentation, logging (train.py's default, read back every 10 steps) and
checkpointing included; tokens/s from the steps after `--e2e_warmup`, to compare with the step mode's figure for the
same options. `--data_rate` times one process decoding and augmenting those JPEG files.

    python benchmarks/bench_train.py --original .orig --runs d16:48 d24:24 --configs plain flex+fused+cache
    python benchmarks/bench_train.py --e2e --runs d16:48 --configs flex+fused --e2e_steps 120
    python benchmarks/bench_train.py --device cpu --tiny --original .orig --configs plain per_scale+cache
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch
import torch._inductor.config

from bench_generate import CODE_DIM, DEPTHS, NUM_CLASSES, VOCAB_SIZE
from flexvar_hf import FlexVARScaleScheduler, FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.models import block_causal
from flexvar_hf.models.block_causal import TRAINING_ATTENTION_BACKENDS
from flexvar_hf.training.flexvar_loss import build_teacher_inputs, training_loss
from flexvar_hf.training.optim import build_optimizer, clip_and_step
from flexvar_hf.utils.inductor import wide_row_inductor

LIBRARY_FLEX_KERNEL_OPTIONS = dict(block_causal.FLEX_KERNEL_OPTIONS)  # what "defaulttiles" turns off
LEARNING_RATE, WEIGHT_DECAY, BETAS, MAX_GRAD_NORM, CLASS_DROPOUT = 1e-4, 0.05, (0.9, 0.95), 2.0, 0.1
# The H100 SXM's dense bf16 peak, and the rate a large bf16 matrix product reaches on these GPUs in practice.
PEAK_FLOPS, MEASURED_FLOPS = 989e12, 790e12
AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Flags that are experiments of the step mode alone (train.py has no such option), and those that compile the blocks.
STEP_ONLY_FLAGS = (
    "unfolded", "autotune", "autodynamic", "coordtune", "cppwrap", "graphs", "combo", "defaulttiles", "stack",
    "inductorrows",
)
CONFIG_FLAGS = ("fused", "cache", "compile", "ckpt", "bf16weights", *STEP_ONLY_FLAGS)
COMPILE_FLAGS = (
    "compile", "autotune", "autodynamic", "coordtune", "cppwrap", "graphs", "combo", "stack", "inductorrows"
)
MIN_JPEG_FILES = 1300  # the e2e folder's smallest size, and what --data_rate decodes
TINY_VQ = {"base_channels": 16, "z_channels": 16, "norm_num_groups": 8}  # --tiny: a small VQ model for CPU checks
# The original train.py's `nowd_keys` (its parameter groups come from utils.lr_control.filter_params with these).
ORIGINAL_NOWD_KEYS = {
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runs", nargs="+", default=["d16:48", "d24:24"],
        help="SIZE:BATCH pairs (the original's published per-GPU batches: 768 over 16 GPUs for d16, 32 for d24).",
    )
    parser.add_argument("--configs", nargs="+", default=["plain"], help="Our configs (see above), in order.")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=15, help="Warm-up steps (random schedules).")
    parser.add_argument("--iters", type=int, default=20, help="Timed steps.")
    parser.add_argument(
        "--rehearse", action=argparse.BooleanOptionalAction, default=True,
        help="Run the timed schedules once untimed first (default), so that every timed step has a length each code "
             "has run before (the state of a long run) instead of a new length at nearly every timed step.",
    )
    parser.add_argument("--original", type=Path, default=None, help="Checkout of the original FlexVAR code.")
    parser.add_argument("--original_amp", nargs="+", default=["fp16"], choices=sorted(AMP_DTYPES))
    parser.add_argument(
        "--steps", action=argparse.BooleanOptionalAction, default=True, help="Time the step of every run and config."
    )
    parser.add_argument("--check", action="store_true", help="First compare each attention with sdpa (loss, grads).")
    parser.add_argument("--attention_micro", action="store_true", help="Time the attention call alone first.")
    parser.add_argument(
        "--profile", default=None,
        help="Profile a few steps of this config, or of the original trainer with 'original' (first run's size).",
    )
    parser.add_argument("--e2e", action="store_true", help="examples/train.py end to end (each config, first run).")
    parser.add_argument("--e2e_data", type=Path, default=Path("/tmp/flexvar-e2e-jpegs"))
    parser.add_argument(
        "--e2e_images", type=int, default=None,
        help=f"JPEG files to make (default: one per image the e2e run trains on, at least {MIN_JPEG_FILES}). A "
             "smaller folder starts a new epoch every few steps, which costs new data workers each time.",
    )
    parser.add_argument("--e2e_steps", type=int, default=100)
    parser.add_argument("--e2e_warmup", type=int, default=20)
    parser.add_argument("--e2e_workers", type=int, default=8)
    parser.add_argument("--e2e_checkpointing_steps", type=int, default=50)
    parser.add_argument("--data_rate", action="store_true", help="Time one process decoding + augmenting JPEGs.")
    parser.add_argument("--time_budget", type=float, default=None, help="Skip what is left after this many seconds.")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="Debug: depth 2, width 128, batch 2, 64x64.")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here (rewritten after each run).")
    args = parser.parse_args(argv)
    # The first step is always a warm-up, and the e2e step times are the gaps between logged steps, so the first
    # e2e step cannot be timed: at least one warm-up step and one timed step each.
    if args.warmup < 1 or args.iters < 1:
        parser.error(f"--warmup and --iters must be at least 1, got {args.warmup} and {args.iters}.")
    if args.e2e_warmup < 1 or args.e2e_steps <= args.e2e_warmup:
        parser.error(f"--e2e_warmup must be at least 1 and below --e2e_steps, got {args.e2e_warmup} and "
                     f"{args.e2e_steps}.")
    if args.profile == "original" and args.original is None:
        parser.error("--profile original needs --original (a checkout of the original code).")
    try:
        args.runs = [parse_run(run) for run in args.runs]
        for config in args.configs + ([args.profile] if args.profile not in (None, "original") else []):
            parse_config(config)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    if args.tiny:
        args.runs = [(size, min(batch, 2)) for size, batch in args.runs]
        args.resolution = min(args.resolution, 64)
        args.warmup, args.iters = min(args.warmup, 2), min(args.iters, 2)
    return args


def parse_run(text: str) -> tuple[str, int]:
    size, _, batch = text.partition(":")
    if size not in DEPTHS or not batch.isdigit():
        raise argparse.ArgumentTypeError(f"A run is SIZE:BATCH with SIZE in {sorted(DEPTHS)}, got {text!r}.")
    return size, int(batch)


def parse_config(spec: str) -> dict:
    """"flex+fused+cache" -> {"attention": "flex", "fused": True, "cache": True, ...}."""
    options = {"attention": "sdpa", **{flag: False for flag in CONFIG_FLAGS}}
    for token in spec.split("+"):
        if token in TRAINING_ATTENTION_BACKENDS:
            options["attention"] = token
        elif token in CONFIG_FLAGS:
            options[token] = True
        elif token != "plain":
            raise argparse.ArgumentTypeError(f"Unknown config option {token!r} in {spec!r}.")
    return options


def model_size(size: str, tiny: bool) -> tuple[int, int, int]:
    """(depth, width, heads)."""
    if tiny:
        return 2, 128, 2
    depth = DEPTHS[size]
    return depth, 64 * depth, depth


def random_transformer(depth: int, width: int, heads: int, device: torch.device) -> FlexVARTransformer2DModel:
    """A transformer of the released vocabulary, class count and code size on `device`, initialised from seed 0."""
    torch.manual_seed(0)
    return FlexVARTransformer2DModel(
        num_layers=depth, hidden_size=width, num_attention_heads=heads, num_classes=NUM_CLASSES,
        vocab_size=VOCAB_SIZE, code_dim=CODE_DIM,
    ).to(device)


def model_flops(depth: int, width: int, sides: list[int], batch: int) -> float:
    """Model FLOPs of one training step (forward + backward) on `batch` images at `sides` (see the module doc)."""
    counts = [side * side for side in sides]
    tokens = sum(counts)
    token_weights = depth * 12 * width * width + width * VOCAB_SIZE + CODE_DIM * width
    image_weights = depth * 6 * width * width + 2 * width * width
    pairs, seen = 0, 0
    for count in counts:
        seen += count
        pairs += count * seen
    forward = 2 * tokens * token_weights + 2 * image_weights + depth * 4 * width * pairs
    return 3 * forward * batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(
    step, schedules: list[list[int]], warmup: int, batch: int, device: torch.device, size, rehearse: bool = False
) -> dict:
    """`step(sides)` over `schedules`: the first `warmup` untimed (the very first timed alone), then the rest.
    `rehearse`: the rest also run once untimed before they are timed, so that no timed step meets a new length."""
    timed = schedules[warmup:]
    start = time.perf_counter()
    step(schedules[0])
    synchronize(device)
    first_step = time.perf_counter() - start
    for sides in schedules[1:warmup] + (timed if rehearse else []):
        step(sides)
    synchronize(device)
    release(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for sides in timed:
        last = step(sides)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = batch * sum(sum(side * side for side in sides) for sides in timed)
    flops = sum(model_flops(*size, sides, batch) for sides in timed)
    return {
        "ms_per_step": seconds / len(timed) * 1e3,
        "tokens_per_step": tokens / len(timed),
        "tokens_per_s": tokens / seconds,
        "images_per_s": batch * len(timed) / seconds,
        "model_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / PEAK_FLOPS,
        "of_790": flops / seconds / MEASURED_FLOPS,
        "peak_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "first_step_s": first_step,
        "last_grad_norm": float(last) if last is not None else None,
        "steps": len(timed),
        "rehearsed": rehearse,
    }


class OursTrainer:
    """Our transformer, VQ model and optimizer, one step as examples/train.py's under bf16 mixed precision."""

    def __init__(self, depth: int, width: int, heads: int, device: torch.device, options: dict, vq_config=None):
        self.device, self.options = device, options
        self.compiled = any(options[flag] for flag in COMPILE_FLAGS)
        self.transformer = random_transformer(depth, width, heads, device)
        self.transformer.train()
        self.transformer.set_training_attention(options["attention"])
        if options["ckpt"]:
            self.transformer.enable_gradient_checkpointing()
        # Experiments, not train.py options: "autotune", Inductor may pick Triton matrix-product templates with the
        # GELU, norm or residual fused in; "autodynamic", the blocks compiled for the first shape, then recompiled
        # with only the dimensions that changed (the sequence length) symbolic; "coordtune", Inductor tunes the
        # block sizes of its own (norm, GELU, cast) kernels by timing them; "cppwrap", Inductor's C++ wrapper launches
        # each compiled graph's kernels; "graphs", the blocks replayed as CUDA graphs; "combo", independent kernels
        # launched as one; "defaulttiles", FlexAttention without the library's kernel settings; "inductorrows", rows
        # over 1,024 elements reduced in two passes (Inductor's heuristic). Set by every trainer: module-wide.
        torch._inductor.config.coordinate_descent_tuning = options["coordtune"]
        torch._inductor.config.cpp_wrapper = options["cppwrap"]
        torch._inductor.config.combo_kernels = options["combo"]
        # Dynamo's cache does not key on Inductor's settings: without a reset, a config would reuse the blocks that an
        # earlier config of the process compiled under other settings.
        torch._dynamo.reset()
        block_causal.FLEX_KERNEL_OPTIONS.clear()
        if not options["defaulttiles"]:
            block_causal.FLEX_KERNEL_OPTIONS.update(LIBRARY_FLEX_KERNEL_OPTIONS)
        if self.compiled:
            modes = {"autotune": "max-autotune-no-cudagraphs", "graphs": "reduce-overhead"}
            mode = next((modes[flag] for flag in modes if options[flag]), None)
            compile_options = {"dynamic": None if options["autodynamic"] else True}
            if mode is not None:  # a backend of our own takes no Inductor mode
                compile_options["mode"] = mode
            elif not options["inductorrows"]:  # as train.py's --torch_compile
                compile_options["backend"] = wide_row_inductor
            if options["stack"]:  # all blocks as one graph: one call, one set of guards per step instead of 24
                self.transformer.run_blocks = torch.compile(self.transformer.run_blocks, **compile_options)
            else:
                self.transformer.compile_repeated_blocks(**compile_options)
        # accelerate's mixed precision: the prepared model's forward runs under autocast, parameters stay float32.
        self.transformer.forward = torch.autocast(device.type, dtype=torch.bfloat16)(self.transformer.forward)
        self.vqvae = FlexVQModel(num_codes=VOCAB_SIZE, code_dim=CODE_DIM, **(vq_config or {}))
        self.vqvae.requires_grad_(False).eval()
        self.vqvae.to(device, dtype=torch.bfloat16)
        self.vqvae.quantize.to(torch.float32)  # as examples/train.py: codebook search in float32
        self.optimizer = build_optimizer(
            self.transformer, LEARNING_RATE, weight_decay=WEIGHT_DECAY, betas=BETAS, fused=options["fused"] or None,
            bf16_weights=options["bf16weights"],
        )
        self.drop_path_rate = 0.1 * depth / 24
        self.generator = torch.Generator().manual_seed(1)
        self.latents = None
        self.loss = None

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, sides: list[int]) -> torch.Tensor:
        if self.options["graphs"]:  # a new iteration: the graphs may overwrite the last step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        latents = None
        if self.options["cache"]:  # as --cache_latents: encoded once, the latents come with the batch
            if self.latents is None:
                with torch.no_grad():
                    self.latents = self.vqvae.encode(pixels.to(torch.bfloat16)).latents
            pixels, latents = None, self.latents
        output = training_loss(
            self.transformer, self.vqvae, [(side, side) for side in sides], pixels, labels, NUM_CLASSES,
            CLASS_DROPOUT, generator=self.generator, latents=latents, drop_path_rate=self.drop_path_rate,
            compile_loss=self.compiled,
        )
        output.loss.backward()
        self.loss = output.loss.detach()
        fold_clip = (self.options["fused"] or self.options["bf16weights"]) and not self.options["unfolded"]
        return clip_and_step(self.optimizer, self.transformer.parameters(), MAX_GRAD_NORM, fold_clip=fold_clip)

    def tokenise(self, pixels: torch.Tensor, sides: list[int]):
        """The step's no-grad part alone: VQ encoding, quantisation at every scale, teacher-forcing inputs."""
        return build_teacher_inputs(self.vqvae, [(side, side) for side in sides], pixels=pixels)


def import_original(checkout: Path):
    """The original's modules from `checkout`. Its utils.misc (imported by trainer.py for MetricLogger and
    TensorboardLogger, which train_step only uses to log) needs pytz and typed-argument-parser; where those are
    missing it is replaced by a stub, as this benchmark never logs."""
    sys.path.insert(0, str(checkout.resolve()))
    try:
        import utils.misc  # noqa: F401
    except ImportError:
        stub = types.ModuleType("utils.misc")
        stub.MetricLogger = stub.TensorboardLogger = object
        sys.modules["utils.misc"] = stub
    import trainer
    import utils.lr_control as lr_control
    from models.flexvar import FlexVAR
    from models.vq_llama import VQ_models
    from utils.amp_sc import AmpOptimizer

    return types.SimpleNamespace(
        FlexVAR=FlexVAR, VQ_models=VQ_models, AmpOptimizer=AmpOptimizer, lr_control=lr_control,
        VARTrainer=trainer.VARTrainer,
    )


class OriginalTrainer:
    """The original FlexVAR, VQ-16 and trainer as its train.py builds them for `--depth d --fp16 1|2`, random
    weights; one step is `VARTrainer.train_step` (VQ encoding, forward, loss, backward, clipping and AdamW step
    through `AmpOptimizer`) on the schedule it is handed."""

    def __init__(self, checkout: Path, depth: int, width: int, heads: int, amp: str, device: torch.device,
                 patch_nums: tuple[int, ...]):
        orig = import_original(checkout)
        torch.manual_seed(0)
        self.vqvae = orig.VQ_models["VQ-16"](codebook_size=VOCAB_SIZE, codebook_embed_dim=CODE_DIM)
        self.vqvae.eval().requires_grad_(False).to(device)
        # build_vae_var's arguments (models/__init__.py), with train.sh's --alng=1e-3 for d16/d20.
        self.model = orig.FlexVAR(
            vae_local=self.vqvae, num_classes=NUM_CLASSES, depth=depth, embed_dim=width, num_heads=heads,
            drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1 * depth / 24, norm_eps=1e-6, shared_aln=False,
            cond_drop_rate=CLASS_DROPOUT, token_dropout_p=0.05, attn_l2_norm=True, patch_nums=patch_nums,
            flash_if_available=True, fused_if_available=True,
        ).to(device)
        self.model.init_weights(init_adaln=0.5, init_adaln_gamma=1e-3, init_head=0.02, init_std=-1)
        self.model.train()
        orig.lr_control.print = lambda *args, **kwargs: None  # filter_params prints with dist's `force=` keyword
        names, params, groups = orig.lr_control.filter_params(self.model, nowd_keys=ORIGINAL_NOWD_KEYS)
        for group in groups:  # what its lr_wd_annealing sets each step, here at the peak
            group["lr"], group["weight_decay"] = LEARNING_RATE, WEIGHT_DECAY * group["wd_sc"]
        optimizer = torch.optim.AdamW(
            groups, lr=LEARNING_RATE, weight_decay=0.0, betas=BETAS, fused=device.type == "cuda"
        )
        var_opt = orig.AmpOptimizer(
            mixed_precision={"fp16": 1, "bf16": 2}[amp], optimizer=optimizer, names=names, paras=params,
            grad_clip=MAX_GRAD_NORM, n_gradient_accumulation=1,
        )
        self.trainer = orig.VARTrainer(
            device=device, patch_nums=patch_nums, resos=tuple(16 * pn for pn in patch_nums), vae_local=self.vqvae,
            var_wo_ddp=self.model, var=self.model, var_opt=var_opt, label_smooth=0.0,
        )
        self.metric_logger = types.SimpleNamespace(log_iters=10**9, update=lambda **kwargs: None)

    def step(self, pixels: torch.Tensor, labels: torch.Tensor, sides: list[int]) -> torch.Tensor:
        self.trainer.gen_curr_patch_nums = lambda: list(sides)
        grad_norm, _ = self.trainer.train_step(
            it=1, g_it=1, stepping=True, metric_lg=self.metric_logger, tb_lg=None, inp_B3HW=pixels,
            label_B=labels, prog_si=-1, prog_wp_it=1.0,
        )
        return grad_norm


class Budget:
    """Wall-clock budget of the whole call: `left()` seconds, or infinity without one."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()


@contextmanager
def reported(name: str, results: dict):
    """Run a part, print and record its failure instead of stopping the call."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - a benchmark part failing must not lose the others' numbers
        message = f"{type(error).__name__}: {error}"
        print(f"!! {name} failed: {message[:2000]}", flush=True)
        results.setdefault("failures", {})[name] = message[:4000]


def draw_schedules(resolution: int, count: int, seed: int = 0) -> list[list[int]]:
    """Random training schedules (long sides) with the original's distribution."""
    scheduler = FlexVARScaleScheduler()
    generator = torch.Generator().manual_seed(seed)
    return [
        [h for h, _ in scheduler.sample_training_scales(resolution, resolution, generator, keep_final_scale=False)]
        for _ in range(count)
    ]


def step_runs(args, results: dict, budget: Budget, device: torch.device, save) -> None:
    schedules = draw_schedules(args.resolution, args.warmup + args.iters)
    for size, batch in args.runs:
        dims = model_size(size, args.tiny)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.rand(batch, 3, args.resolution, args.resolution, generator=generator).mul(2).sub(1).to(device)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
        runs = [(f"original_{amp}", amp) for amp in args.original_amp] if args.original else []
        runs += [(config, None) for config in args.configs]
        for name, amp in runs:
            if budget.left() < (120 if "compile" in name else 30):
                print(f"-- skipped {size} {name}: out of time", flush=True)
                continue
            with reported(f"{size} {name}", results):
                if amp is not None:
                    trainer = OriginalTrainer(args.original, *dims, amp, device, tuple(schedules[0]))
                else:
                    trainer = OursTrainer(*dims, device, parse_config(name), TINY_VQ if args.tiny else None)

                def step(sides, trainer=trainer, pixels=pixels, labels=labels):
                    return trainer.step(pixels, labels, sides)

                stats = timed_steps(step, schedules, args.warmup, batch, device, dims[:2], args.rehearse)
                stats["params_m"] = sum(p.numel() for p in trainer.model.parameters()) / 1e6 if amp else (
                    sum(p.numel() for p in trainer.transformer.parameters()) / 1e6
                )
                run = {"size": size, "batch": batch, "mode": name, **stats}
                results["runs"].append(run)
                print(json.dumps(run), flush=True)
                save()
            trainer = step = None
            release(device)


def check_attention(args, results: dict, device: torch.device) -> None:
    """Loss and gradients of each attention against sdpa, on one batch and schedule, in float32 and bf16 autocast."""
    depth, width, heads = model_size(args.runs[0][0], args.tiny)
    model = random_transformer(min(depth, 4), width, heads, device)
    # Gates far from training's near-zero start (1e-5), so that the blocks, and so the attention, carry the loss.
    model.initialize_weights(adaln_gate_gain=20.0)
    sides = draw_schedules(args.resolution, 3, seed=5)[-1]
    scales = [(side, side) for side in sides]
    length = sum(side * side for side in sides)
    labels = torch.arange(4, device=device)
    inputs = torch.randn(4, length - 1, CODE_DIM, device=device)
    targets = torch.randint(0, VOCAB_SIZE, (4, length), device=device)
    checks = {}
    for dtype in (torch.float32, torch.bfloat16):
        reference = None
        for backend in TRAINING_ATTENTION_BACKENDS:
            model.zero_grad()
            model.set_training_attention(backend)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                logits = model(labels, scales, inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            if reference is None:
                reference = (loss.detach(), grads)
                continue
            checks[f"{backend} {dtype}"] = {
                "loss_rel": abs(loss.item() - reference[0].item()) / abs(reference[0].item()),
                "grad_rel": ((grads - reference[1]).norm() / reference[1].norm()).item(),
            }
    results["check"] = checks
    print("check vs sdpa:", json.dumps(checks), flush=True)


def attention_micro(args, results: dict, device: torch.device) -> None:
    """One attention call, forward + backward, per backend at the first run's batch and two schedules."""
    from flexvar_hf.models.block_causal import block_causal_attention, training_attention_mask

    _, width, heads = model_size(args.runs[0][0], args.tiny)
    batch = args.runs[0][1]
    timings = {}
    for sides in ([1, 2, 3, 4, 5, 6, 8, 10, 13, 16], [1, 2, 4, 5, 7, 9, 10, 12, 15]):
        scales = [(side, side) for side in sides]
        length = sum(side * side for side in sides)
        q, k, v = (
            torch.randn(batch, heads, length, width // heads, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(3)
        )
        grad = torch.randn_like(q)
        for backend in TRAINING_ATTENTION_BACKENDS:
            mask = training_attention_mask(scales, backend, device, width // heads)

            def call(q=q, k=k, v=v, mask=mask, grad=grad):
                block_causal_attention(q, k, v, mask).backward(grad)

            with reported(f"micro {backend} L{length}", results):
                for _ in range(3):
                    call()
                synchronize(device)
                start = time.perf_counter()
                for _ in range(10):
                    call()
                synchronize(device)
                timings[f"{backend} L{length}"] = (time.perf_counter() - start) / 10 * 1e3
    results["attention_micro_ms"] = timings
    print("attention fwd+bwd ms:", json.dumps(timings), flush=True)


# Kernel categories of `--profile`: the first category with a name fragment in a kernel's (lower-case) name. Order
# matters: cuDNN's convolution and attention kernels and the memory-efficient attention's are also named "gemm",
# "fprop" or "cutlass".
KERNEL_CATEGORIES = (
    ("convolutions", ("implicit_gemm", "convolution", "nchwtonhwc", "nhwctonchw")),
    ("attention backward", ("flex_attention_backward", "flash_bwd", "fmha_cutlassb", "bprop")),
    ("attention forward", ("flex_attention", "flash_fwd", "fmha", "sdpa")),
    ("matrix products", ("nvjet", "gemm", "cutlass", "xmma", "cublas")),
    ("optimizer", ("multi_tensor", "adam")),
    ("copies", ("memcpy", "memset")),
    ("inductor kernels", ("triton_",)),
)


def kernel_category(name: str) -> str:
    """The `KERNEL_CATEGORIES` entry of a GPU kernel's name, or "other" (ATen's own elementwise and reduction
    kernels: in the original, its norms, GELU and cross-entropy)."""
    lowered = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(fragment in lowered for fragment in fragments):
            return category
    return "other"


def device_kernels(events, device_type) -> list[tuple[str, float]]:
    """(name, microseconds) of the profiler's events that ran on `device_type`: kernels, copies and fills. Ranges of
    `record_function` annotations (such as the optimizer's "Optimizer.step#AdamW.step") also appear on the device's
    timeline, over kernels that are listed themselves, and are left out so that no time counts twice."""
    return [
        (event.name, event.device_time_total)
        for event in events
        if event.device_type == device_type and not getattr(event, "is_user_annotation", False)
    ]


def kernel_time_by_category(kernels, steps: int) -> dict[str, float]:
    """Milliseconds per step of each category, from (kernel name, microseconds) pairs of `steps` steps; "total"
    is their sum (GPU busy time, which is below the step's time where the GPU waits)."""
    totals = {category: 0.0 for category, _ in KERNEL_CATEGORIES} | {"other": 0.0}
    for name, microseconds in kernels:
        totals[kernel_category(name)] += microseconds / 1e3 / steps
    totals["total"] = sum(totals.values())
    return totals


# Host ranges of a training step that `gpu_idle_by_host_region` names (prefixes of the profiler's range names): the
# compiled blocks' forward and backward, the loss, the optimizer. Anything else is "outside" (the step's
# tokenisation, embeddings, masks, random draws).
HOST_REGIONS = (
    "Torch-Compiled Region", "CompiledFunctionBackward", "RowCrossEntropy", "Optimizer.step", "Optimizer.zero_grad",
)
GPU_ACTIVITY = ("kernel", "gpu_memcpy", "gpu_memset")


def _is_host_region(event: dict) -> bool:
    return (
        event.get("ph") == "X"
        and event.get("cat") in ("cpu_op", "user_annotation")
        and event["name"].startswith(HOST_REGIONS)
    )


def gpu_idle_by_host_region(trace_events: list[dict], steps: int, min_gap_us: float = 5.0) -> dict[str, float]:
    """Milliseconds per step that the GPU sat idle between its kernels, copies and fills (gaps longer than
    `min_gap_us`), by where the host was when it queued the work that ended each gap: the outermost profiler range
    named by `HOST_REGIONS` around that launch, or "outside"; "total" is their sum. A gap whose work was queued before
    the GPU went idle is the GPU waiting on something else (a synchronisation, another stream): "queued early".
    `trace_events`: a Chrome trace's "traceEvents" (`prof.export_chrome_trace`), whose GPU activity links to its
    launch by the "correlation" argument."""
    launches = {
        event["args"]["correlation"]: event["ts"]
        for event in trace_events
        if event.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in event.get("args", {})
    }
    regions = sorted((event for event in trace_events if _is_host_region(event)), key=lambda event: event["ts"])
    activity = sorted((event for event in trace_events if event.get("cat") in GPU_ACTIVITY), key=lambda e: e["ts"])
    idle: dict[str, float] = {}
    busy_until = None
    for event in activity:
        gap = event["ts"] - busy_until if busy_until is not None else 0.0
        if gap > min_gap_us:
            launched = launches.get(event.get("args", {}).get("correlation"))
            if launched is None or launched < busy_until:
                where = "queued early"
            else:
                where = next(
                    (region["name"].split("#")[0] for region in regions
                     if region["ts"] <= launched <= region["ts"] + region["dur"]),
                    "outside",
                )
            idle[where] = idle.get(where, 0.0) + gap / 1e3 / steps
        end = event["ts"] + event.get("dur", 0.0)
        busy_until = end if busy_until is None else max(busy_until, end)
    idle["total"] = sum(idle.values())
    return idle


def profile_config(args, results: dict, device: torch.device, out_dir: Path) -> None:
    """Kernel times of 3 steps of `--profile` (one of our configs, or "original" for the original trainer in its
    first `--original_amp`) on the first run's size and batch, after 10 warm-up steps (and, with `--rehearse`, the 3
    profiled schedules once): a table (the 80 ops of most device time), the milliseconds per step of each kernel
    category (`kernel_time_by_category`, in the JSON as `profile_ms_per_step`), the GPU's idle time by where the host
    was (`gpu_idle_by_host_region`, as `profile_gpu_idle_ms_per_step`) and a gzipped Chrome trace beside `--json`."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    size, batch = args.runs[0]
    dims = model_size(size, args.tiny)
    schedules = draw_schedules(args.resolution, 13, seed=3)
    if args.profile == "original":
        trainer = OriginalTrainer(args.original, *dims, args.original_amp[0], device, tuple(schedules[0]))
    else:
        trainer = OursTrainer(*dims, device, parse_config(args.profile), TINY_VQ if args.tiny else None)
    pixels = torch.rand(batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    profiled = schedules[10:]
    for sides in schedules[:10] + (profiled if args.rehearse else []):
        trainer.step(pixels, labels, sides)
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for sides in profiled:
            trainer.step(pixels, labels, sides)
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=80, max_name_column_width=70)
    name = f"profile-{args.profile.replace('+', '-')}"
    (out_dir / f"{name}.txt").write_text(table)
    trace = out_dir / f"{name}.json.gz"
    prof.export_chrome_trace(str(trace))  # gzipped: a few MiB for the 3 steps
    categories = kernel_time_by_category(device_kernels(prof.events(), DeviceType.CUDA), len(profiled))
    results["profile_ms_per_step"] = {"config": args.profile, **categories}
    with gzip.open(trace, "rt") as file:
        idle = gpu_idle_by_host_region(json.load(file)["traceEvents"], len(profiled))
    results["profile_gpu_idle_ms_per_step"] = idle
    print(table[:12000], flush=True)
    print("kernel ms per step:", json.dumps({key: round(value, 2) for key, value in categories.items()}), flush=True)
    print("GPU idle ms per step, by where the host was:", json.dumps({key: round(value, 2) for key, value in
                                                                       idle.items()}), flush=True)


def make_jpeg_folder(root: Path, num_images: int = MIN_JPEG_FILES, num_classes: int = 10, seed: int = 0) -> Path:
    """An imagefolder of `num_images` JPEGs (quality 90) of ImageNet's typical sizes (500 x 375, 375 x 500, 500 x
    333, ... ), smooth random colour fields with noise, in `num_classes` folders. A folder that already holds at least
    that many is kept as it is."""
    if root.is_dir() and len(list(root.glob("*/*.jpg"))) >= num_images:
        return root
    from concurrent.futures import ProcessPoolExecutor

    jobs = [
        (root / f"class{index % num_classes:02d}" / f"{index:05d}.jpg", seed + index) for index in range(num_images)
    ]
    for folder in {path.parent for path, _ in jobs}:
        folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=32))
    return root


def _write_jpeg(job: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image

    path, seed = job
    rng = np.random.default_rng(seed)
    size = [(500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (500, 500)][seed % 6]
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    noisy = np.asarray(base, dtype=np.int16) + rng.normal(0, 12, (size[1], size[0], 3)).astype(np.int16)
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def data_rate(args, results: dict) -> None:
    """Images per second one process decodes and augments (random crop 0.88 and flip at the resolution)."""
    from flexvar_hf.training.data import ImageDataset, ImageTransform

    files = sorted(make_jpeg_folder(args.e2e_data, args.e2e_images or MIN_JPEG_FILES).glob("*/*.jpg"))
    rows = [{"image": str(path), "label": 0} for path in files]
    transform = ImageTransform(args.resolution, crop="random", random_flip=True, min_crop_fraction=0.88)
    dataset = ImageDataset(ListDataset(rows), transform, "image", "label")
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < 5 and count < len(dataset):
        dataset[count]
        count += 1
    rate = count / (time.perf_counter() - start)
    mean_kb = sum(path.stat().st_size for path in files) / len(files) / 1024
    results["data_rate"] = {"images_per_s_one_process": rate, "mean_jpeg_kib": mean_kb}
    print(f"data: one process decodes + augments {rate:.0f} images/s (JPEGs of {mean_kb:.0f} KiB on average)")


class ListDataset(list):
    """A list of rows with the `column_names` that `ImageDataset` checks."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0])


def load_train_script():
    """examples/train.py as a module (the examples are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "train.py"
    spec = importlib.util.spec_from_file_location("flexvar_example_train", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for worker processes and dataclasses
    spec.loader.exec_module(module)
    return module


def e2e_runs(args, results: dict, budget: Budget, device: torch.device, save) -> None:
    """examples/train.py's main on the JPEG folder, per config, at the first run's size and batch."""
    train = load_train_script()
    size, batch = args.runs[0]
    depth = model_size(size, args.tiny)[0]
    data = make_jpeg_folder(args.e2e_data, args.e2e_images or max(MIN_JPEG_FILES, args.e2e_steps * batch))
    vq_dir = Path("/tmp/flexvar-e2e-vq" + ("-tiny" if args.tiny else ""))
    if not (vq_dir / "config.json").is_file():
        torch.manual_seed(0)
        FlexVQModel(num_codes=VOCAB_SIZE, code_dim=CODE_DIM, **(TINY_VQ if args.tiny else {})).save_pretrained(vq_dir)
    for config in args.configs:
        if budget.left() < 60:
            print(f"-- skipped e2e {config}: out of time", flush=True)
            continue
        options = parse_config(config)
        if any(options[flag] for flag in STEP_ONLY_FLAGS):
            print(f"-- skipped e2e {config}: a step-only experiment (train.py has no such option)")
            continue
        flags = ["--training_attention", options["attention"]]
        flags += ["--fused_adamw"] * options["fused"] + ["--torch_compile"] * options["compile"]
        flags += ["--gradient_checkpointing"] * options["ckpt"] + ["--bf16_weights"] * options["bf16weights"]
        # The original's augmentation (random crop keeping 88-100% of the short side, flips); the cache needs centre
        # crops.
        flags += ["--cache_latents", "--random_flip"] if options["cache"] else [
            "--random_crop", "--random_crop_min_fraction", "0.88", "--random_flip"]
        # A fresh folder per run: a folder of an earlier run would resume from its checkpoint and latent cache.
        output = Path(tempfile.mkdtemp(prefix=f"flexvar-e2e-{config.replace('+', '-')}-"))
        argv = [
            "--vqvae_model_name_or_path", str(vq_dir), "--depth", str(depth), "--num_classes", str(NUM_CLASSES),
            "--train_data_dir", str(data), "--resolution", str(args.resolution), "--train_batch_size", str(batch),
            "--max_train_steps", str(args.e2e_steps), "--allow_tf32",
            "--mixed_precision", "no" if args.tiny and not options["bf16weights"] else "bf16",
            "--dataloader_num_workers", str(args.e2e_workers), "--checkpointing_steps",
            str(args.e2e_checkpointing_steps), "--checkpoints_total_limit", "1", "--report_to", "none",
            "--output_dir", str(output), *flags,
        ]
        with reported(f"e2e {config}", results):
            stamps = []
            original_log = train.Accelerator.log

            def log(self, values, step=None, log_kwargs=None, stamps=stamps, original_log=original_log):
                stamps.append((time.perf_counter(), values["tokens_per_second"], values["num_scales"]))
                return original_log(self, values, step=step, log_kwargs=log_kwargs or {})

            train.Accelerator.log = log
            start = time.perf_counter()
            try:
                train.main(train.parse_args(argv))
            finally:
                train.Accelerator.log = original_log
                shutil.rmtree(output, ignore_errors=True)
                from accelerate.state import AcceleratorState, GradientState

                AcceleratorState._reset_state(True)
                GradientState._reset_state()
            total = time.perf_counter() - start
            # Step i's tokens: its logged rate times the time since the previous step's log.
            times = [stamp[0] for stamp in stamps]
            steps = [(now - before, rate * (now - before)) for (now, rate, _), before in zip(stamps[1:], times[:-1])]
            timed = steps[args.e2e_warmup - 1:]
            seconds = sum(duration for duration, _ in timed)
            run = {
                "size": size, "batch": batch, "mode": f"e2e {config}", "steps": len(timed),
                "tokens_per_s": sum(tokens for _, tokens in timed) / seconds,
                "ms_per_step": seconds / len(timed) * 1e3,
                # train.py logs every --logging_steps steps at once: the longest gap is a window of such steps.
                "slowest_log_gap_ms": max(duration for duration, _ in timed) * 1e3,
                "first_step_s": times[0] - start, "total_s": total,
            }
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()
        release(device)


def host_cpu() -> str:
    """The host processor's model name (Linux). Recorded with the results because the original trainer's step time
    varies far more than ours between machines of the same GPU (benchmarks/RESULTS.md), perhaps with the host."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.time_budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU: pass --device cpu (with --tiny) to check the code paths.")
    torch.backends.cuda.matmul.allow_tf32 = True  # ours: --allow_tf32; the original: its default --tf32=True
    torch.backends.cudnn.allow_tf32 = True
    results = {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "host_cpu": host_cpu(),
        "torch": torch.__version__,
        "args": {key: str(value) for key, value in vars(args).items()},
        "runs": [],
    }
    out_dir = args.json.parent if args.json else Path(".")

    def save() -> None:
        if args.json is not None:
            args.json.write_text(json.dumps(results, indent=2))

    if args.check:
        with reported("check", results):
            check_attention(args, results, device)
    if args.attention_micro:
        attention_micro(args, results, device)
    if args.steps:
        step_runs(args, results, budget, device, save)
    if args.profile and budget.left() > 60:
        with reported("profile", results):
            profile_config(args, results, device, out_dir)
    if args.data_rate:
        with reported("data rate", results):
            data_rate(args, results)
    if args.e2e:
        e2e_runs(args, results, budget, device, save)
    save()
    print_table(results["runs"])
    return 0


def print_table(runs: list[dict]) -> None:
    print(
        f"\n{'size':4} {'batch':>5} {'mode':28} {'ms/step':>8} {'tok/step':>9} {'tokens/s':>9} {'vs orig':>7} "
        f"{'MFU':>6} {'/790':>6} {'peak GiB':>8} {'alloc':>6} {'1st s':>6}"
    )
    for run in runs:
        base = next(
            (r for r in runs if r["mode"].startswith("original") and r["size"] == run["size"]), None
        )
        ratio = f"{run['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else ""
        mfu = f"{run['mfu']:.1%}" if "mfu" in run else ""
        of_790 = f"{run['of_790']:.1%}" if "of_790" in run else ""
        peak = f"{run['peak_gib']:.2f}" if run.get("peak_gib") is not None else "-"
        allocated = f"{run['peak_allocated_gib']:.2f}" if run.get("peak_allocated_gib") is not None else "-"
        print(
            f"{run['size']:4} {run['batch']:5d} {run['mode'][:28]:28} {run['ms_per_step']:8.1f} "
            f"{run.get('tokens_per_step', 0):9.0f} {run['tokens_per_s']:9.0f} {ratio:>7} {mfu:>6} {of_790:>6} "
            f"{peak:>8} {allocated:>6} {run.get('first_step_s', 0):6.1f}"
        )


if __name__ == "__main__":
    raise SystemExit(main())
