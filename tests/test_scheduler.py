"""FlexVARScaleScheduler: scale schedules, guidance schedules and token sampling against the original FlexVAR rules."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from flexvar_hf.schedulers import FlexVARScaleScheduler, FlexVARSchedulerOutput
from flexvar_hf.schedulers.scheduling_flexvar import default_num_steps, exponential_noise, top_k_top_p_candidates

ORIGINAL_10_STEPS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
ORIGINAL_TRAINED_SIDES = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 23, 24, 32]


@pytest.fixture
def scheduler() -> FlexVARScaleScheduler:
    return FlexVARScaleScheduler()


def long_sides(scales):
    return [max(scale) for scale in scales]


def assert_valid_schedule(scales, final):
    assert scales[-1] == final
    assert len(set(scales)) == len(scales)
    for (h0, w0), (h1, w1) in zip(scales, scales[1:]):
        assert h1 >= h0 and w1 >= w0


# ----------------------------------------------------------------------------------------------------------------
# Original code, re-implemented as reference (models/helpers.py, models/flexvar.py, trainer.py)


def original_top_k_top_p_mask(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """`sample_with_top_k_top_p_` up to the draw: True where a token stays possible."""
    logits = logits.clone()
    if top_k > 0:
        idx_to_remove = logits < logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(idx_to_remove, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        sorted_idx_to_remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        sorted_idx_to_remove[..., -1:] = False
        logits.masked_fill_(
            sorted_idx_to_remove.scatter(sorted_idx.ndim - 1, sorted_idx, sorted_idx_to_remove), -torch.inf
        )
    return logits > -torch.inf


def original_guided_logits(cond, uncond, cfg, step, scales, llamagen, max_pn=16):
    """`autoregressive_infer_cfg`'s guidance with its `cfg` (var mode) for square `scales` (sides)."""
    if llamagen:
        return uncond + (cond - uncond) * cfg
    ratio = step / min(len(scales) - 1, 9)
    t = cfg * ratio if scales[step] <= max_pn else cfg
    return (1 + t) * cond - t * uncond


def original_training_sides(rng: random.Random) -> list[int]:
    """`gen_curr_patch_nums` with an explicit `random.Random`."""
    if rng.random() < 0.05:
        sides = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]
    else:
        numbers = rng.sample(range(3, 11), 5) + rng.sample(range(11, 16), 2)
        numbers.sort()
        sides = [1, 2] + numbers + [16]
    x = rng.random()
    for threshold in (0.9, 0.95, 0.98, 0.99):
        if x > threshold:
            sides.pop(rng.choice(range(2, len(sides) - 1)))
    while sum(side**2 for side in sides) > 680:
        sides.pop(rng.choice(range(len(sides) - 4, len(sides))))
    return sides


# ----------------------------------------------------------------------------------------------------------------
# Scale schedules


@pytest.mark.parametrize(
    "size, steps, expected",
    [
        (256, 10, ORIGINAL_10_STEPS),
        (256, 13, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16]),
        (512, 15, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32]),
    ],
)
def test_published_schedules(scheduler, size, steps, expected):
    assert scheduler.get_scales(steps, size, size) == [(side, side) for side in expected]


@pytest.mark.parametrize(
    "size, expected",
    [
        (256, ORIGINAL_10_STEPS),
        (512, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32]),
        (64, [1, 2, 3, 4]),
        (128, [1, 2, 3, 4, 5, 6, 8]),
        (16, [1]),
    ],
)
def test_default_schedules(scheduler, size, expected):
    assert long_sides(scheduler.get_scales(None, size, size)) == expected


def test_default_step_count_grows_with_size():
    counts = [default_num_steps(side) for side in range(1, 129)]
    assert all(1 <= count <= side for side, count in zip(range(1, 129), counts))
    assert counts == sorted(counts)
    assert (counts[3], counts[7], counts[15], counts[31], counts[63]) == (4, 7, 10, 15, 20)


@pytest.mark.parametrize("final_side", [1, 2, 5, 8, 16, 23, 32, 48])
def test_every_step_count_gives_a_valid_schedule(scheduler, final_side):
    for steps in range(1, final_side + 1):
        sides = long_sides(scheduler.get_scales(steps, 16 * final_side, 16 * final_side))
        assert len(sides) == steps and sides[-1] == final_side
        assert all(b > a for a, b in zip(sides, sides[1:]))
        if steps > 1:
            assert sides[0] == 1


def test_generic_schedules_are_dense_at_small_sides(scheduler):
    assert long_sides(scheduler.get_scales(6, 256, 256)) == [1, 2, 3, 5, 9, 16]
    assert long_sides(scheduler.get_scales(10, 512, 512)) == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32]
    assert long_sides(scheduler.get_scales(12, 256, 256)) == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16]


def test_all_sides_and_too_many_steps(scheduler):
    assert long_sides(scheduler.get_scales(16, 256, 256)) == list(range(1, 17))
    with pytest.raises(ValueError, match="maximum is 16"):
        scheduler.get_scales(17, 256, 256)
    with pytest.raises(ValueError, match="maximum is 4"):
        scheduler.set_timesteps(5, height=64, width=64)


def test_non_square_schedules(scheduler):
    wide = scheduler.get_scales(None, 256, 512)
    assert_valid_schedule(wide, (16, 32))
    assert long_sides(wide) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 23, 32]  # published table on the long side
    assert all(h == max(1, int(w / 2 + 0.5)) for h, w in wide)
    assert scheduler.get_scales(None, 512, 256) == [(w, h) for h, w in wide]

    for height, width, steps in [(256, 512, 8), (64, 256, None), (208, 336, 9), (16, 512, 20)]:
        scales = scheduler.get_scales(steps, height, width)
        assert_valid_schedule(scales, (height // 16, width // 16))
        assert scales[0] == (1, 1)


def test_set_timesteps(scheduler):
    scheduler.set_timesteps(13, height=256, width=256)
    assert scheduler.num_inference_steps == 13 and len(scheduler.scales) == 13
    assert scheduler.timesteps.dtype == torch.long and torch.equal(scheduler.timesteps, torch.arange(13))
    assert all(isinstance(side, int) for scale in scheduler.scales for side in scale)

    scheduler.set_timesteps(scales=[1, 2, 4, 6, 8])
    assert scheduler.scales == [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8)] and scheduler.num_inference_steps == 5
    scheduler.set_timesteps(3, scales=[(1, 1), (1, 2), [2, 4]], device="cpu")  # scales override the step count
    assert scheduler.scales == [(1, 1), (1, 2), (2, 4)] and torch.equal(scheduler.timesteps, torch.arange(3))


@pytest.mark.parametrize(
    "scales",
    [[], [0, 1], [1, -2], [1.5, 2], [(1, 2, 3)], [1, 3, 2], [(1, 2), (2, 1)], [2, 2], [(1, 1), (1, 1)], "1,2", [True]],
)
def test_bad_scales_are_rejected(scheduler, scales):
    with pytest.raises(ValueError, match="non-empty list of positive int sides or \\(h, w\\) pairs"):
        scheduler.set_timesteps(scales=scales)


@pytest.mark.parametrize("height, width", [(40, 256), (256, 0), (-16, 256), (256, 250), (256.0, 256)])
def test_bad_sizes_are_rejected(scheduler, height, width):
    with pytest.raises(ValueError, match="multiple of 16"):
        scheduler.set_timesteps(height=height, width=width)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_step_counts_are_rejected(scheduler, steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(steps)


# ----------------------------------------------------------------------------------------------------------------
# Guidance


def test_linear_guidance_ramp(scheduler):
    scheduler.set_timesteps(10)
    assert scheduler.guidance_scale_at(0, 3.5) == 1.0
    assert scheduler.guidance_scale_at(9, 3.5) == 3.5
    assert scheduler.guidance_scale_at(3, 3.5) == pytest.approx(1 + 2.5 * 3 / 9)
    assert scheduler.guidance_scale_at(4, 1.0) == 1.0


def test_linear_guidance_matches_original_var_mode(scheduler):
    cfg = 2.5
    for size, steps in [(512, 15), (256, 13), (256, 10), (64, 4), (256, 3)]:
        scheduler.set_timesteps(steps, height=size, width=size)
        sides = long_sides(scheduler.scales)
        for step, side in enumerate(sides):
            ratio = step / min(steps - 1, 9)
            expected = 1 + (cfg * ratio if side <= 16 else cfg)
            assert scheduler.guidance_scale_at(step, 1 + cfg) == pytest.approx(expected, abs=1e-12)
    scheduler.set_timesteps(15, height=512, width=512)
    assert [scheduler.guidance_scale_at(step, 3.5) for step in (13, 14)] == [3.5, 3.5]  # sides 23 and 32
    assert scheduler.guidance_scale_at(12, 3.5) == pytest.approx(1 + 2.5 * 12 / 9)  # beyond the ramp, as original


def test_constant_guidance_and_single_step(scheduler):
    scheduler.set_timesteps(10)
    assert [scheduler.guidance_scale_at(step, 2.5, "constant") for step in range(10)] == [2.5] * 10
    scheduler.set_timesteps(1, height=256, width=256)
    assert scheduler.scales == [(16, 16)]
    assert scheduler.guidance_scale_at(0, 3.5) == 3.5


def test_config_guidance_schedule_is_the_default():
    scheduler = FlexVARScaleScheduler(guidance_schedule="constant")
    scheduler.set_timesteps(10)
    assert [scheduler.guidance_scale_at(step, 2.5) for step in range(10)] == [2.5] * 10
    assert scheduler.guidance_scale_at(0, 2.5, "linear") == 1.0  # an explicit schedule wins
    logits = torch.randn(2, 1, 7)
    cond, uncond = logits.chunk(2)
    torch.testing.assert_close(scheduler.apply_guidance(logits, 0, 2.5), uncond + 2.5 * (cond - uncond))
    with pytest.raises(ValueError, match="guidance_schedule.*linear"):
        FlexVARScaleScheduler(guidance_schedule="cosine")
    with pytest.raises(ValueError, match="guidance_schedule"):
        FlexVARScaleScheduler(guidance_schedule=None)  # the config needs a schedule; calls may pass None


def test_guidance_ramp_length_is_configurable():
    scheduler = FlexVARScaleScheduler(guidance_ramp_steps=4)
    scheduler.set_timesteps(10)
    assert scheduler.guidance_scale_at(2, 3.0) == pytest.approx(2.0)


@pytest.mark.parametrize("llamagen", [False, True])
def test_guidance_combination_matches_original(scheduler, llamagen):
    torch.manual_seed(0)
    cfg = 2.5
    sides = [1, 2, 4, 6, 8, 20]
    scheduler.set_timesteps(scales=sides)
    guidance_scale, schedule = (cfg, "constant") if llamagen else (1 + cfg, "linear")
    for step, side in enumerate(sides):
        cond, uncond = torch.randn(2, 3, side * side, 11).unbind(0)
        logits = scheduler.apply_guidance(torch.cat([cond, uncond]), step, guidance_scale, schedule)
        expected = original_guided_logits(cond, uncond, cfg, step, sides, llamagen)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        g = scheduler.guidance_scale_at(step, guidance_scale, schedule)
        exact = cond if g == 1 else uncond + g * (cond - uncond)  # g = 1 (first linear step): conditional logits
        torch.testing.assert_close(logits, exact, rtol=0, atol=0)


def test_guidance_changes_the_chosen_token(scheduler):
    # uncond + g (cond - uncond) = [0, 2 - g, 0.5 g]: token 1 wins for g < 4/3, token 2 above.
    cond = torch.tensor([[[0.0, 1.0, 0.5]]])
    uncond = torch.tensor([[[0.0, 2.0, 0.0]]])
    scheduler.set_timesteps(scales=[1])
    chosen = [
        scheduler.step(
            torch.cat([cond, uncond]), 0, guidance_scale=g, guidance_schedule="constant", top_k=1
        ).indices.item()
        for g in (0.0, 1.2, 1.5, 4.0)
    ]
    assert chosen == [1, 1, 2, 2]
    assert scheduler.step(cond, 0, top_k=1).indices.item() == 1  # guidance_scale 1: conditional logits only


def test_guidance_output_is_float32(scheduler):
    scheduler.set_timesteps(scales=[2])
    logits = torch.randn(4, 4, 7, dtype=torch.bfloat16)
    assert scheduler.apply_guidance(logits, 0, 2.0, "constant").dtype == torch.float32
    assert scheduler.apply_guidance(logits, 0, 2.0, "constant").shape == (2, 4, 7)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def test_top_k_one_is_argmax(scheduler):
    torch.manual_seed(0)
    scheduler.set_timesteps(scales=[1, 2, 4])
    logits = torch.randn(3, 16, 100)
    output = scheduler.step(logits, 2, top_k=1, top_p=0.9, temperature=5.0, generator=torch.Generator().manual_seed(1))
    assert isinstance(output, FlexVARSchedulerOutput)
    assert output.indices.dtype == torch.long and output.indices.shape == (3, 4, 4)
    assert torch.equal(output.indices, logits.argmax(-1).view(3, 4, 4))


def sample_support(scheduler, logits_row, draws=4000, **kwargs) -> set[int]:
    """Tokens drawn for one logit row repeated over a (B, 16) batch at side 4."""
    scheduler.set_timesteps(scales=[4])
    batch = draws // 16
    logits = logits_row.expand(batch, 16, -1).contiguous()
    indices = scheduler.step(logits, 0, generator=torch.Generator().manual_seed(0), **kwargs).indices
    return set(indices.flatten().tolist())


def test_top_k_restricts_samples_to_the_k_best(scheduler):
    torch.manual_seed(0)
    row = torch.randn(50) * 0.3  # flat enough that every kept token gets drawn
    best = set(row.topk(5).indices.tolist())
    assert sample_support(scheduler, row, top_k=5) == best
    assert len(sample_support(scheduler, row)) > 40  # no filter: almost every token appears


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.8, 0.95])
def test_top_p_keeps_exactly_the_original_tokens(scheduler, top_p):
    row = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.9, 0.5, 0.0, -0.5, -1.0, -3.0])
    kept = set(original_top_k_top_p_mask(row.view(1, 1, -1), 0, top_p).nonzero()[:, -1].tolist())
    assert 1 <= len(kept) < len(row)
    assert sample_support(scheduler, row, top_p=top_p) == kept


def test_top_k_then_top_p_matches_original(scheduler):
    row = torch.tensor([2.0, 1.9, 1.5, 1.0, 0.8, 0.5, 0.0, -0.5])
    kept = set(original_top_k_top_p_mask(row.view(1, 1, -1), 5, 0.7).nonzero()[:, -1].tolist())
    assert sample_support(scheduler, row, top_k=5, top_p=0.7) == kept


def test_candidates_equal_the_original_on_random_logits():
    torch.manual_seed(0)
    logits = torch.randn(4, 64, 300) * 3
    for top_k, top_p in [(0, 0.5), (0, 0.95), (20, 0.0), (20, 0.9), (299, 0.99), (0, 1.0), (0, 0.0)]:
        probs, token_ids = top_k_top_p_candidates(logits, top_k, top_p)
        ours = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, token_ids, probs > 0)
        assert torch.equal(ours, original_top_k_top_p_mask(logits, top_k, top_p)), (top_k, top_p)
        # The kept tokens keep their relative probabilities (the original's softmax over the filtered logits).
        expected = logits.masked_fill(~ours, -torch.inf).softmax(-1).gather(-1, token_ids)
        torch.testing.assert_close(probs / probs.sum(-1, keepdim=True), expected, rtol=1e-5, atol=1e-7)


def test_draws_follow_the_candidate_probabilities(scheduler):
    """argmax(probs / Exp(1) noise) is an exact sample: token frequencies match the probabilities."""
    scheduler.set_timesteps(scales=[4])
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, -4.0])
    logits = row.expand(2500, 16, -1).contiguous()
    indices = scheduler.step(logits, 0, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(0)).indices
    frequencies = torch.bincount(indices.flatten(), minlength=len(row)).double() / indices.numel()
    probs, token_ids = top_k_top_p_candidates(row.view(1, -1), 5, 0.9)
    probs = probs[0].double() / probs[0].sum()
    expected = torch.zeros(len(row), dtype=torch.double).scatter(0, token_ids[0], probs)
    assert expected[-1] == 0 and expected[-2] == 0  # removed by top-k and by top-p
    torch.testing.assert_close(frequencies, expected, atol=0.005, rtol=0)


def test_given_noise_replaces_the_generator(scheduler):
    torch.manual_seed(0)
    scheduler.set_timesteps(scales=[1, 8])
    logits = torch.randn(3, 64, 500)
    shape = scheduler.sampling_noise_shape(1, batch_size=3, vocab_size=500, top_k=100)
    assert shape == (3, 64, 100)
    assert scheduler.sampling_noise_shape(1, batch_size=3, vocab_size=500, top_k=1) is None
    noise = exponential_noise(shape, torch.Generator().manual_seed(5), "cpu")
    drawn = scheduler.step(logits, 1, top_k=100, top_p=0.9, generator=torch.Generator().manual_seed(5)).indices
    given = scheduler.step(logits, 1, top_k=100, top_p=0.9, noise=noise).indices
    assert torch.equal(drawn, given)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(logits, 1, top_k=50, noise=noise)


def test_temperature_sharpens_sampling(scheduler):
    row = torch.tensor([1.0, 0.5, 0.0, -0.5])
    assert sample_support(scheduler, row, temperature=1e-3) == {0}
    assert sample_support(scheduler, row, temperature=10.0) == {0, 1, 2, 3}


def test_seeded_sampling_is_reproducible(scheduler):
    torch.manual_seed(0)
    scheduler.set_timesteps(10)
    logits = torch.randn(4, 13 * 13, 1000) * 0.1

    def draw(seed):
        return scheduler.step(logits, 8, top_k=900, top_p=0.95, generator=torch.Generator().manual_seed(seed)).indices

    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))


@pytest.mark.parametrize("scales, step", [([1, 2, 7], 2), ([1, 20], 1), ([1, 24], 1), ([(1, 1), (7, 14)], 1)])
def test_untrained_scales_are_greedy(scheduler, scales, step):
    scheduler.set_timesteps(scales=scales)
    h, w = scheduler.scales[step]
    assert scheduler.is_greedy_scale((h, w))
    logits = torch.randn(2, h * w, 1000) * 0.1
    indices = scheduler.step(logits, step, top_k=900, top_p=0.95, generator=torch.Generator().manual_seed(0)).indices
    assert torch.equal(indices, logits.argmax(-1).view(2, h, w))


def test_trained_scales_and_disabled_policy_sample():
    """At trained sides, and at every side with the policy off, `step` draws from the top-k candidates: the draw of
    `argmax(probs / noise)` with the noise given, which is not the greedy choice. The logits fall with the token id
    (at a random rate per position), so the candidates' order by logit is their order by id and the expected draw
    does not depend on which of the two orders the scheduler hands the noise out in."""
    torch.manual_seed(0)
    policy_off = FlexVARScaleScheduler(greedy_untrained_scales=False)
    for scheduler, scales in [(FlexVARScaleScheduler(), [1, 8]), (policy_off, [1, 7]), (policy_off, [1, 20])]:
        scheduler.set_timesteps(scales=scales)
        side = scales[-1]
        logits = -torch.arange(1000.0) * (torch.rand(2, side * side, 1) * 0.01 + 1e-3)
        assert not scheduler.is_greedy_scale((side, side))
        noise = exponential_noise((2, side * side, 900), torch.Generator().manual_seed(0), "cpu")
        indices = scheduler.step(logits, 1, top_k=900, noise=noise).indices
        probs, token_ids = top_k_top_p_candidates(logits, top_k=900)
        drawn = token_ids.gather(-1, (probs / noise).argmax(-1, keepdim=True)).view(2, side, side)
        assert torch.equal(indices, drawn)
        assert not torch.equal(indices, logits.argmax(-1).view(2, side, side))
    original_greedy = [side for side in range(1, 40) if side > 16 or side not in ORIGINAL_TRAINED_SIDES]
    ours_greedy = [side for side in range(1, 40) if FlexVARScaleScheduler().is_greedy_scale((side, side))]
    assert ours_greedy == original_greedy
    assert not FlexVARScaleScheduler().is_greedy_scale((8, 16))


def test_step_accepts_tensor_timestep_and_tuple_output(scheduler):
    scheduler.set_timesteps(scales=[1, 2])
    logits = torch.randn(3, 4, 20)
    (indices,) = scheduler.step(logits, scheduler.timesteps[1], top_k=1, return_dict=False)
    assert torch.equal(indices, logits.argmax(-1).view(3, 2, 2))


def test_step_before_set_timesteps_is_an_error(scheduler):
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.randn(1, 1, 10), 0)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.guidance_scale_at(0, 2.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=-1), "top_k.*>= 0"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=-0.1), r"top_p.*\[0, 1\]"),
        (dict(top_p=1.5), r"top_p.*\[0, 1\]"),
        (dict(temperature=0.0), "temperature.*> 0"),
        (dict(temperature=-1.0), "temperature"),
        (dict(guidance_scale=-0.5), "guidance_scale.*>= 0"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(guidance_scale=2.0, guidance_schedule="cosine"), "guidance_schedule.*linear"),
    ],
)
def test_bad_sampling_args_are_rejected(scheduler, kwargs, match):
    scheduler.set_timesteps(scales=[1, 2])
    with pytest.raises(ValueError, match=match):
        scheduler.step(torch.randn(2, 4, 10), 1, **kwargs)
    with pytest.raises(ValueError, match=match):
        scheduler.check_sampling_args(**kwargs)


def test_bad_step_inputs_are_rejected(scheduler):
    scheduler.set_timesteps(scales=[1, 2])
    with pytest.raises(ValueError, match="step index in \\[0, 2\\)"):
        scheduler.step(torch.randn(1, 4, 10), 2)
    with pytest.raises(ValueError, match="step index"):
        scheduler.step(torch.randn(1, 4, 10), -1)
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(1, 9, 10), 1)  # logits for a 3x3 scale at a 2x2 step
    with pytest.raises(ValueError, match="model_output"):
        scheduler.step(torch.randn(4, 10), 1)
    with pytest.raises(ValueError, match="odd batch"):
        scheduler.step(torch.randn(3, 4, 10), 1, guidance_scale=2.0)
    with pytest.raises(ValueError, match="guidance_schedule"):
        scheduler.guidance_scale_at(1, 2.0, "cosine")


# ----------------------------------------------------------------------------------------------------------------
# Training schedules


def draw_training_scales(scheduler, count, seed, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return [scheduler.sample_training_scales(generator=generator, **kwargs) for _ in range(count)]


def test_training_schedules_follow_the_original_structure(scheduler):
    for scales in draw_training_scales(scheduler, 1500, seed=0):
        sides = long_sides(scales)
        assert all(h == w for h, w in scales)
        assert sides[0] == 1 and sides[-1] == 16
        assert all(b > a for a, b in zip(sides, sides[1:]))
        assert sum(side * side for side in sides) <= 680
        if not set(sides) <= set(ORIGINAL_10_STEPS):
            assert sum(3 <= side <= 10 for side in sides) <= 5 and sum(11 <= side <= 15 for side in sides) <= 2


def test_training_schedule_distribution_matches_the_original(scheduler):
    draws = 8000
    ours = [long_sides(scales) for scales in draw_training_scales(scheduler, draws, 0, keep_final_scale=False)]
    rng = random.Random(0)
    theirs = [original_training_sides(rng) for _ in range(draws)]

    def side_frequencies(schedules):
        counts = Counter(side for sides in schedules for side in sides)
        return torch.tensor([counts[side] / draws for side in range(1, 17)])

    def length_frequencies(schedules):
        counts = Counter(len(sides) for sides in schedules)
        return torch.tensor([counts[length] / draws for length in range(1, 12)])

    torch.testing.assert_close(side_frequencies(ours), side_frequencies(theirs), rtol=0, atol=0.025)
    torch.testing.assert_close(length_frequencies(ours), length_frequencies(theirs), rtol=0, atol=0.025)
    assert 0.25 < 1 - side_frequencies(ours)[-1] < 0.45  # the original's token cap drops the final scale often

    kept = draw_training_scales(scheduler, 2000, 0)  # default keep_final_scale=True
    assert all(scales[-1] == (16, 16) for scales in kept)


def test_training_schedules_are_reproducible(scheduler):
    assert draw_training_scales(scheduler, 20, seed=3) == draw_training_scales(scheduler, 20, seed=3)
    assert draw_training_scales(scheduler, 20, seed=3) != draw_training_scales(scheduler, 20, seed=4)


@pytest.mark.parametrize(
    "height, width", [(512, 512), (256, 512), (512, 256), (128, 128), (64, 64), (32, 32), (16, 16)]
)
def test_training_schedules_at_other_sizes(scheduler, height, width):
    grid = (height // 16, width // 16)
    max_tokens = 680 * grid[0] * grid[1] / 256
    lengths = set()
    for scales in draw_training_scales(scheduler, 300, seed=1, height=height, width=width):
        assert scales[0] == (1, 1)
        assert_valid_schedule(scales, grid)
        assert sum(h * w for h, w in scales) <= max_tokens
        lengths.add(len(scales))
    if max(grid) >= 16:
        assert len(lengths) > 1  # schedules really vary


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_config_round_trip(tmp_path):
    scheduler = FlexVARScaleScheduler(max_sampled_side=24, greedy_untrained_scales=False, guidance_ramp_steps=5)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = FlexVARScaleScheduler.from_pretrained(tmp_path)
    for key in ("vae_scale_factor", "max_sampled_side", "greedy_untrained_scales", "guidance_ramp_steps"):
        assert loaded.config[key] == scheduler.config[key]
    assert list(loaded.config.trained_sides) == ORIGINAL_TRAINED_SIDES
    assert (loaded.config.train_side, loaded.config.train_max_tokens) == (16, 680)
    assert loaded.config.guidance_ramp_steps == 5 and loaded.is_greedy_scale((7, 7)) is False


def test_config_defaults():
    config = FlexVARScaleScheduler().config
    assert config.vae_scale_factor == 16 and config.max_sampled_side == 16 and config.greedy_untrained_scales
    assert list(config.trained_sides) == ORIGINAL_TRAINED_SIDES
    assert (config.guidance_ramp_steps, config.train_side, config.train_max_tokens) == (9, 16, 680)


@pytest.mark.parametrize(
    "kwargs", [dict(vae_scale_factor=0), dict(guidance_ramp_steps=0), dict(trained_sides=(1, -2))]
)
def test_bad_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        FlexVARScaleScheduler(**kwargs)


def test_non_default_config_options_do_what_they_say():
    scheduler = FlexVARScaleScheduler(
        vae_scale_factor=8, trained_sides=(1, 2, 4, 6), max_sampled_side=4, train_side=8, train_max_tokens=100
    )
    # vae_scale_factor: pixels per token side
    assert scheduler.token_grid(64, 48) == (8, 6)
    with pytest.raises(ValueError, match="multiple of 8"):
        scheduler.token_grid(60, 64)
    scheduler.set_timesteps(3, height=64, width=64)
    assert scheduler.scales[-1] == (8, 8) and len(scheduler.scales) == 3
    # trained_sides and max_sampled_side: where the original's policy takes the best token (6 is trained but above
    # the largest sampled side)
    assert [side for side in range(1, 9) if scheduler.is_greedy_scale((side, side))] == [3, 5, 6, 7, 8]
    # max_sampled_side: the linear guidance ramp uses the full scale above it
    scheduler.set_timesteps(scales=[1, 2, 6, 7])
    ramp = [scheduler.guidance_scale_at(step, 3.0, "linear") for step in range(4)]
    assert ramp == pytest.approx([1.0, 1 + 2 / 3, 3.0, 3.0])
    default_ramp = FlexVARScaleScheduler(vae_scale_factor=8)
    default_ramp.set_timesteps(scales=[1, 2, 6, 7])
    assert default_ramp.guidance_scale_at(2, 3.0, "linear") == pytest.approx(1 + 2 * 2 / 3)
    # train_side and train_max_tokens: the training cap, train_max_tokens * area / train_side**2 tokens
    sums = [sum(h * w for h, w in scales) for scales in draw_training_scales(scheduler, 300, 0, height=128, width=128)]
    assert max(sums) <= 100 * 16 * 16 // 8**2
    uncapped = draw_training_scales(FlexVARScaleScheduler(vae_scale_factor=8), 300, 0, height=128, width=128)
    assert max(sum(h * w for h, w in scales) for scales in uncapped) > 400  # the cap bound the draws above
