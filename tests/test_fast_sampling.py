"""The fast sampling path (static buffers, CUDA graphs on a GPU) gives the plain path's tokens.

On CPU the static-buffer loop runs eagerly; graph capture itself is checked on the GPU by
`benchmarks/bench_generate.py --check`.
"""

from __future__ import annotations

import pytest
import torch

from flexvar_hf.conversion import pipeline_from_original

from test_pipeline import make_tiny_pipe


def generate(pipe, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipe([1, 4, 7], generator=generator, output_type="latent", **kwargs).images


@pytest.fixture()
def tiny_pipe():
    return make_tiny_pipe()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(height=128, width=128),
        dict(height=64, width=128, num_inference_steps=4, guidance_scale=2.0, guidance_schedule="constant"),
        dict(scales=[1, 2, 3, 4], guidance_scale=1.0, top_k=0, top_p=0.0, temperature=0.7),
    ],
)
def test_fast_path_samples_the_same_tokens_as_the_plain_path(tiny_pipe, kwargs):
    plain = [generate(tiny_pipe, seed, **kwargs) for seed in (0, 1)]
    assert not torch.equal(plain[0], plain[1])  # sampling is on, so the check below is not vacuous
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    fast = [generate(tiny_pipe, seed, **kwargs) for seed in (0, 1)]
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])


def test_loops_are_reused_per_setting_and_bounded(tiny_pipe):
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, max_graphs=2)
    loops = tiny_pipe.fast_token_generator.loops
    generate(tiny_pipe, height=64, width=64)
    first = next(iter(loops.values()))
    generate(tiny_pipe, seed=3, height=64, width=64)
    assert len(loops) == 1 and next(iter(loops.values())) is first
    generate(tiny_pipe, height=64, width=128)
    generate(tiny_pipe, height=64, width=64, top_k=5)
    assert len(loops) == 2 and all(loop is not first for loop in loops.values())  # least recently used dropped
    tiny_pipe.disable_fast_sampling()
    assert tiny_pipe.fast_token_generator is None


def test_callbacks_take_the_plain_path(tiny_pipe):
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    seen = []
    generate(tiny_pipe, height=64, width=64, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or {})
    assert seen == list(range(len(tiny_pipe.scheduler.scales)))
    assert len(tiny_pipe.fast_token_generator.loops) == 0


def test_cuda_graphs_need_a_cuda_pipeline(tiny_pipe):
    with pytest.raises(ValueError, match="CUDA"):
        tiny_pipe.enable_fast_sampling(use_cuda_graph=True)


def test_fast_greedy_generation_matches_original(transformer_ckpt, vq_ckpt, reference, reference_info):
    pipe = pipeline_from_original(transformer_ckpt, vq_ckpt)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_fast_sampling(use_cuda_graph=False)
    for run in reference_info["inference_runs"]:
        if not run["key"].endswith("_var"):
            continue
        tokens = pipe(reference["labels"], scales=run["infer_patch_nums"], top_k=1, output_type="latent").images
        last = len(run["infer_patch_nums"]) - 1
        assert torch.equal(tokens.flatten(1), reference[f"{run['key']}_step_{last}_indices"]), run["key"]


def test_fast_path_decodes_the_same_images(tiny_pipe):
    def images(seed):
        return tiny_pipe(3, height=64, width=64, generator=torch.Generator().manual_seed(seed), output_type="pt")

    plain = images(0).images
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    fast = images(0).images
    assert fast.shape == (1, 3, 64, 64) and torch.equal(fast, plain)


def test_elementwise_ops_are_swapped_and_restored(tiny_pipe):
    from flexvar_hf.models.transformer_flexvar import EAGER_OPS, modulated_layer_norm, normalize_queries_keys

    blocks = tiny_pipe.transformer.blocks
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, compile_elementwise=True)
    ops = blocks[0].ops
    assert ops is not EAGER_OPS and all(block.ops is ops and block.attn.ops is ops for block in blocks)
    assert ops.modulated_layer_norm is not modulated_layer_norm
    assert ops.normalize_queries_keys is not normalize_queries_keys
    tiny_pipe.disable_fast_sampling()
    assert all(block.ops is EAGER_OPS and block.attn.ops is EAGER_OPS for block in blocks)


def test_query_key_normalisation_matches_f_normalize():
    from flexvar_hf.models.transformer_flexvar import normalize_queries_keys

    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 4, 8)
    temperature = torch.rand(1, 1, 4, 1) + 0.5
    out = normalize_queries_keys(qkv, temperature)
    query, key, value = qkv.view(2, 5, 3, 4, 8).unbind(2)
    normalize = torch.nn.functional.normalize
    expected = torch.cat((normalize(query, dim=-1) * temperature, normalize(key, dim=-1), value), dim=2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
