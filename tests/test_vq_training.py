"""Tokenizer training: straight-through quantisation, VQ losses, multi-scale reconstruction, codebook upkeep and
`examples/train_vq.py` end to end (a short run, then resuming it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flexvar_hf import FlexVQModel
from flexvar_hf.training.vq_losses import (
    CodeUsageTracker,
    FlexVQTrainingModule,
    codebook_usage,
    multiscale_vq_loss,
    quantize_straight_through,
    reconstruction_loss,
    restart_dead_codes,
    sample_extra_scales,
)

from conftest import load_example

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = dict(base_channels=32, channel_multipliers=(1, 2, 2), layers_per_block=1, z_channels=32, num_codes=64,
            code_dim=4, norm_num_groups=8)


def tiny_vq(seed: int = 0) -> FlexVQModel:
    torch.manual_seed(seed)
    return FlexVQModel(**TINY)


# ----------------------------------------------------------------------------------------------------------------
# Straight-through quantisation and the losses


def test_straight_through_matches_inference_and_passes_gradients():
    model = tiny_vq()
    latents = torch.randn(2, 4, 5, 3, requires_grad=True)
    out = quantize_straight_through(model.quantize, latents)
    # Same codes as inference, and the forward value is exactly the normalised code vectors.
    assert torch.equal(out.indices, model.quantize(latents))
    assert torch.allclose(out.codes, model.indices_to_codes(out.indices), atol=1e-6)
    # Backward: the identity onto the normalised latents (straight-through), nothing into the codebook.
    weights = torch.randn_like(out.codes)
    (out.codes * weights).sum().backward()
    expected, = torch.autograd.grad((F.normalize(latents, dim=1) * weights).sum(), latents)
    assert torch.allclose(latents.grad, expected, atol=1e-6) and latents.grad.abs().sum() > 0
    assert model.quantize.embedding.weight.grad is None


def test_codebook_and_commitment_losses_reach_their_own_side():
    model = tiny_vq()
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantize_straight_through(model.quantize, latents)
    out.codebook_loss.backward(retain_graph=True)
    assert latents.grad is None and model.quantize.embedding.weight.grad.abs().sum() > 0
    model.quantize.embedding.weight.grad = None
    out.commitment_loss.backward()
    assert model.quantize.embedding.weight.grad is None and latents.grad.abs().sum() > 0
    # Both equal the mean squared distance between normalised latents and their codes.
    distance = (F.normalize(latents, dim=1) - out.codes).pow(2).mean()
    assert torch.allclose(out.codebook_loss, distance) and torch.allclose(out.commitment_loss, distance)


def test_losses_vanish_when_latents_are_codes():
    model = tiny_vq()
    indices = torch.randint(0, TINY["num_codes"], (2, 3, 4))
    # Latents pointing exactly at codes (any positive length: the quantizer normalises them).
    latents = model.indices_to_codes(indices).detach() * torch.rand(2, 1, 3, 4).add(0.5)
    out = quantize_straight_through(model.quantize, latents)
    assert torch.equal(out.indices, indices)
    assert out.commitment_loss.item() < 1e-12 and out.codebook_loss.item() < 1e-12


def test_reconstruction_loss_weights():
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.5)
    assert reconstruction_loss(a, b, 1.0, 0.0).item() == pytest.approx(0.5)
    assert reconstruction_loss(a, b, 0.0, 1.0).item() == pytest.approx(0.25)
    assert reconstruction_loss(a, b, 1.0, 2.0).item() == pytest.approx(1.0)
    assert reconstruction_loss(a, a).item() == 0


def test_sample_extra_scales():
    generator = torch.Generator().manual_seed(0)
    scales = sample_extra_scales((8, 16), 3, generator=generator)
    assert len(scales) == 3 and len(set(scales)) == 3
    for height, width in scales:  # the long side drawn, the short one following the aspect ratio (halves up)
        assert 1 <= width < 16 and height == max(1, (width + 1) // 2)
    assert scales == sample_extra_scales((8, 16), 3, generator=torch.Generator().manual_seed(0))
    assert sample_extra_scales((1, 1), 2) == [] and sample_extra_scales((4, 4), 0) == []
    assert all(2 <= h < 4 for h, _ in sample_extra_scales((4, 4), 5, min_side=2))
    assert len(sample_extra_scales((4, 4), 5)) == 3  # only sides 1, 2 and 3 exist


def test_multiscale_loss_decodes_each_scale_at_its_resolution_and_trains_everything():
    model = tiny_vq()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    out = multiscale_vq_loss(model, pixels, extra_scales=[(2, 2), (5, 5)])
    assert out.scales == [(8, 8), (2, 2), (5, 5)]
    assert out.reconstruction.shape == pixels.shape and out.indices.shape == (2, 8, 8)
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    # The total is the weighted mean of the scale terms; without extra scales it is the plain VQ loss.
    plain = multiscale_vq_loss(model, pixels, l1_weight=1.0, l2_weight=0.0, codebook_weight=1.0,
                               commitment_weight=0.25)
    st = quantize_straight_through(model.quantize, model.encode(pixels).latents)
    decoded = model.decode_codes(st.codes).sample
    expected = (decoded - pixels).abs().mean() + st.codebook_loss + 0.25 * st.commitment_loss
    assert torch.allclose(plain.loss, expected, atol=1e-5)


def test_training_module_wraps_the_loss_and_leaves_inference_alone():
    model = tiny_vq()
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    before = model(pixels).sample
    module = FlexVQTrainingModule(model, l2_weight=0.0)
    out = module(pixels, [(1, 1)])
    assert out.scales == [(4, 4), (1, 1)] and torch.equal(model(pixels).sample, before)


def test_codebook_upkeep():
    model = tiny_vq()
    tracker = CodeUsageTracker(TINY["num_codes"])
    tracker.update(torch.tensor([[0, 1], [1, 5]]))
    assert tracker.counts[:6].tolist() == [1, 2, 0, 0, 0, 1]
    usage, perplexity = codebook_usage(torch.tensor([0, 1, 1, 5]), TINY["num_codes"])
    assert usage == pytest.approx(3 / 64) and 2.5 < perplexity < 3
    before = model.quantize.embedding.weight.detach().clone()
    latents = torch.randn(2, 4, 3, 3)
    moved = restart_dead_codes(model.quantize, tracker.counts, latents, torch.Generator().manual_seed(0), noise=0.0)
    after = model.quantize.embedding.weight.detach()
    assert moved == TINY["num_codes"] - 3
    assert torch.equal(after[[0, 1, 5]], before[[0, 1, 5]])
    # Every moved code now points at one of the latent vectors.
    vectors = F.normalize(latents.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    similarity = F.normalize(after[2:5], dim=-1) @ vectors.T
    assert torch.allclose(similarity.max(dim=1).values, torch.ones(3), atol=1e-5)
    tracker.reset()
    assert tracker.counts.sum() == 0


# ----------------------------------------------------------------------------------------------------------------
# examples/train_vq.py


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "data"
    load_example("make_digits_dataset").main(
        ["--output_dir", str(root), "--resolution", "32", "--train_per_class", "2", "--test_per_class", "1",
         "--num_workers", "1"])
    return root


def train_vq_args(data: Path, output: Path, steps: int, *extra: str) -> list[str]:
    return ["--train_data_dir", str(data), "--resolution", "32", "--base_channels", "32", "--channel_multipliers",
            "1", "2", "2", "--layers_per_block", "1", "--z_channels", "32", "--num_codes", "64", "--code_dim", "4",
            "--norm_num_groups", "8", "--train_batch_size", "4", "--max_train_steps", str(steps),
            "--lr_warmup_steps", "1", "--checkpointing_steps", "2", "--validation_steps", "100",
            "--num_validation_images", "4", "--report_to", "none", "--output_dir", str(output), "--seed", "3",
            "--cache_dir", str(data.parent / "cache"), *extra]


def test_train_vq_runs_resumes_and_matches_an_uninterrupted_run(digits_dir, tmp_path):
    train_vq = load_example("train_vq")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_vq.main(train_vq_args(digits_dir, straight, 4, "--restart_dead_codes_steps", "3",
                                       "--restart_dead_codes_until", "0")) == 0
    # Stopped by its time limit after one step (same schedule as the uninterrupted run), then resumed.
    assert train_vq.main(train_vq_args(digits_dir, split, 4, "--max_train_minutes", "0")) == 0
    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-1"]
    assert train_vq.main(train_vq_args(digits_dir, split, 4, "--resume_from_checkpoint", "latest",
                                       "--checkpoints_total_limit", "1")) == 0

    assert sorted(p.name for p in split.glob("checkpoint-*")) == ["checkpoint-4"]  # pruned to the limit
    summary = json.loads((split / "vqvae" / "training_summary.json").read_text())
    assert summary["global_step"] == 4
    assert {"psnr", "codebook_usage", "psnr_scale_2x2"} <= set(summary["validation"])
    assert (split / "validation" / "step-0000004.png").is_file()

    resumed = FlexVQModel.from_pretrained(split / "vqvae")
    uninterrupted = FlexVQModel.from_pretrained(straight / "vqvae")
    assert resumed.downsample_factor == 4 and resumed.config.num_codes == 64
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
