"""The fast sampling path (static buffers, CUDA graphs on a GPU) gives the plain path's tokens.

On CPU the static-buffer loop runs eagerly; graph capture itself is checked on the GPU by
`benchmarks/bench_generate.py --check`.
"""

from __future__ import annotations

import threading

import pytest
import torch

from flexvar_hf import FlexVQModel
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


def test_a_reused_loop_samples_for_the_new_labels(tiny_pipe):
    """The second call of a setting replays the first call's loop with new class labels of the same batch size: its
    tokens are the plain path's for those labels, not the labels the loop was built with. Sampling from the 5 best
    tokens, so that the labels, not only the noise, decide the tokens of this random model (its probabilities are
    nearly uniform)."""

    def tokens(labels, seed):
        generator = torch.Generator().manual_seed(seed)
        return tiny_pipe(labels, height=64, width=64, top_k=5, generator=generator, output_type="latent").images

    plain = [tokens([1, 4, 7], 0), tokens([2, 3, 9], 1), tokens([9, 9, 0], 2)]
    assert not torch.equal(plain[1], tokens([1, 4, 7], 1))  # the labels decide the tokens
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    fast = [tokens([1, 4, 7], 0), tokens([2, 3, 9], 1), tokens([9, 9, 0], 2)]
    assert len(tiny_pipe.fast_token_generator.loops) == 1
    for got, expected in zip(fast, plain):
        assert torch.equal(got, expected)


def test_callbacks_take_the_plain_path(tiny_pipe):
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    seen = []
    generate(tiny_pipe, height=64, width=64, callback_on_step_end=lambda p, i, t, kw: seen.append(i) or {})
    assert seen == list(range(len(tiny_pipe.scheduler.scales)))
    assert len(tiny_pipe.fast_token_generator.loops) == 0


def test_cuda_graphs_need_a_cuda_pipeline_and_the_arguments_are_checked(tiny_pipe):
    with pytest.raises(ValueError, match="CUDA"):
        tiny_pipe.enable_fast_sampling(use_cuda_graph=True)
    for kwargs, match in [(dict(max_graphs=0), "`max_graphs` must be a positive int"),
                          (dict(max_graphs=True), "`max_graphs`"), (dict(torch_compile="yes"), "`torch_compile`"),
                          (dict(use_cuda_graph=1), "`use_cuda_graph` must be True or False")]:
        with pytest.raises(ValueError, match=match):
            tiny_pipe.enable_fast_sampling(**kwargs)
    assert tiny_pipe.fast_token_generator is None


def test_fast_calls_do_not_walk_the_modules_for_their_device(tiny_pipe, monkeypatch):
    """diffusers' `_execution_device`, `device` and `dtype` walk every module for offload hooks (about 3 ms for d24 on
    a CPU host, after the call has waited for the GPU); around its graph replay, a fast call reads its device off one
    weight instead. (What runs inside the graph, here the eager `_run`, costs nothing on the host when replayed.)"""
    from diffusers import DiffusionPipeline, ModelMixin

    reads, inside_graph = [], []

    def counted(name, prop):
        def read(self):
            if not inside_graph:
                reads.append(name)
            return prop.fget(self)

        return property(read)

    for cls, name in ((DiffusionPipeline, "_execution_device"), (ModelMixin, "device"), (ModelMixin, "dtype")):
        monkeypatch.setattr(cls, name, counted(name, getattr(cls, name)))
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    fast = tiny_pipe.fast_token_generator
    run = fast._run

    def replay(*args):
        inside_graph.append(True)
        run(*args)
        inside_graph.clear()

    monkeypatch.setattr(fast, "_run", replay)
    generate(tiny_pipe, height=64, width=64)  # the first call of a setting also builds its loop
    reads.clear()
    generate(tiny_pipe, seed=1, height=64, width=64)
    assert reads == []
    generate(tiny_pipe, height=64, width=64, callback_on_step_end=lambda *args: {})  # the plain path
    assert reads.count("_execution_device") == 1


def test_fast_sampling_refuses_offloaded_pipelines(tiny_pipe, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(ValueError, match=r"executes on cuda:0, as with CPU offloading.*pipe\.to"):
        tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    assert tiny_pipe.fast_token_generator is None


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


def test_compiled_blocks_and_decoder_give_the_plain_path_images_without_recompiling_per_scale(tiny_pipe):
    from torch._dynamo.utils import counters

    def images(**kwargs):
        return tiny_pipe([1, 4, 7], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images

    settings = [dict(height=128, width=128), dict(height=64, width=128, num_inference_steps=4)]
    plain = [images(**setting) for setting in settings]
    torch._dynamo.reset()  # graphs compiled earlier in this process would not be counted
    counters.clear()
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True)
    compiled = [images(**settings[0])]
    graphs_after_first_setting = counters["stats"]["unique_graphs"]
    compiled.append(images(**settings[1]))
    # Blocks: a graph before and after the cached attention, for the one-token first scale and for every other
    # scale, and another graph before it for the first layer, which has no previous update to add (6, whatever the
    # depth or number of scales); then the decoder.
    assert 6 < graphs_after_first_setting <= 8, graphs_after_first_setting
    # A new size and number of steps reuses the blocks' graphs; only the decoder may recompile for the new shape.
    assert counters["stats"]["unique_graphs"] - graphs_after_first_setting <= 1
    for got, expected in zip(compiled, plain):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)  # the same tokens; fused float sums


def test_compile_mode_reaches_both_compiles_and_cuda_graph_modes_are_refused(tiny_pipe, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(tiny_pipe.transformer, "compile_repeated_blocks", lambda **kw: calls.append(("blocks", kw)))
    monkeypatch.setattr(tiny_pipe.vqvae.decoder, "compile", lambda **kw: calls.append(("decoder", kw)))
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert calls == [
        ("blocks", {"dynamic": True, "mode": "max-autotune-no-cudagraphs"}),
        ("decoder", {"mode": "max-autotune-no-cudagraphs"}),
    ]
    # The compiled decoder runs on channels-last weights; saving writes the same values in the usual layout.
    conv_weight = tiny_pipe.vqvae.decoder.conv_in.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last) and not conv_weight.is_contiguous()
    assert tiny_pipe.vqvae.encoder.conv_in.weight.is_contiguous()  # eager encoding keeps its layout
    tiny_pipe.vqvae.save_pretrained(tmp_path)
    reloaded = FlexVQModel.from_pretrained(tmp_path)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, tiny_pipe.vqvae.state_dict()[name]) and tensor.is_contiguous()
    with pytest.raises(ValueError, match="reduce-overhead.*own CUDA graphs"):
        tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True, compile_mode="reduce-overhead")
    with pytest.raises(ValueError, match="needs `torch_compile=True`"):
        tiny_pipe.enable_fast_sampling(use_cuda_graph=False, compile_mode="default")
    assert len(calls) == 2


def test_query_key_normalisation_matches_f_normalize():
    from flexvar_hf.models.transformer_flexvar import normalize_queries_keys

    torch.manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 4, 8)
    qkv[0, 0, 0] = 0  # a zero query stays zero (F.normalize's eps), not NaN
    temperature = torch.rand(1, 1, 4, 1) + 0.5
    out = normalize_queries_keys(qkv, temperature)
    query, key, value = qkv.view(2, 5, 3, 4, 8).unbind(2)
    normalize = torch.nn.functional.normalize
    expected = torch.cat((normalize(query, dim=-1) * temperature, normalize(key, dim=-1), value), dim=2)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out[:, :, 8:], value)  # values multiplied by exactly 1


def test_wide_row_heuristic_makes_rows_up_to_2048_persistent_and_is_scoped():
    import sympy
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.sizevars import SizeVarAllocator
    from torch._inductor.virtualized import V

    from flexvar_hf.utils.inductor import WideRowChoices, wide_row_persistent_reductions

    class Features:  # what the heuristic reads of a kernel
        def __init__(self, numel, hint=ReductionHint.INNER):
            self.reduction_numel, self.hint = sympy.Integer(numel), hint

        def get_reduction_hint(self):
            return self.hint

    def persistent(choices, numel, **kwargs):
        return choices.should_use_persistent_reduction(Features(numel, **kwargs), False)

    with V.set_graph_handler(type("Graph", (), {"sizevars": SizeVarAllocator()})()):
        # d16's 1024-wide rows were already one pass; d24's 1536 and d30's 1920 become so; wider rows do not.
        assert [persistent(InductorChoices, n) for n in (1024, 1536, 1920)] == [True, False, False]
        assert [persistent(WideRowChoices, n) for n in (1024, 1536, 1920, 4096)] == [True, True, True, False]
        assert not persistent(WideRowChoices, 1536, hint=ReductionHint.OUTER)  # only row reductions change

    def in_a_new_thread(function):
        seen = []
        thread = threading.Thread(target=lambda: seen.append(function()))
        thread.start()
        thread.join()
        return seen[0]

    default = type(V.choices)
    with wide_row_persistent_reductions():
        assert type(V.choices) is WideRowChoices
    assert type(V.choices) is default  # nothing leaks to other compiled code of the process

    def first_use_inside():  # a thread whose first compilation is inside keeps nothing of it either
        with wide_row_persistent_reductions():
            inside = type(V.choices)
        return inside, type(V.choices)

    assert in_a_new_thread(first_use_inside) == (WideRowChoices, default)


def test_wide_row_backend_compiles_the_backward_under_the_heuristic_on_any_thread(monkeypatch, tmp_path):
    """`wide_row_inductor` (train.py's `--torch_compile`): the forward and the backward graph get the wide-row
    heuristic, also when the backward compiles later on another thread (the autograd engine's, on a GPU); the
    gradients are Inductor's; graphs that Inductor cached without the heuristic are not reused."""
    import torch._inductor.graph as inductor_graph
    from torch._inductor.virtualized import V

    from flexvar_hf.utils.inductor import WideRowChoices, wide_row_inductor

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # caches on, and empty
    compiled_graphs = []
    lowering_init = inductor_graph.GraphLowering.__init__

    def spy(self, *args, **kwargs):
        compiled_graphs.append((threading.current_thread().name, type(V.choices), kwargs.get("is_backward")))
        lowering_init(self, *args, **kwargs)

    monkeypatch.setattr(inductor_graph.GraphLowering, "__init__", spy)

    def loss_and_grad(backend):
        torch._dynamo.reset()
        weight = torch.linspace(0.5, 1.5, 48, requires_grad=True)

        def loss(x):  # static shapes: the backward compiles when it first runs
            return (torch.nn.functional.layer_norm(x, (48,), weight) * x).relu().square().sum()

        value = torch.compile(loss, backend=backend)(torch.linspace(-2, 2, 8 * 48).reshape(8, 48))
        thread = threading.Thread(target=value.backward, name="backward")
        thread.start()
        thread.join()
        return value.detach(), weight.grad

    default = type(V.choices)
    reference = loss_and_grad("inductor")
    assert [graph[1] for graph in compiled_graphs] == [default, default]
    compiled_graphs.clear()
    value, grad = loss_and_grad(wide_row_inductor)
    assert compiled_graphs == [("MainThread", WideRowChoices, False), ("backward", WideRowChoices, True)]
    assert type(V.choices) is default
    torch.testing.assert_close((value, grad), reference)


def test_compiled_fast_sampling_generates_under_the_wide_row_heuristic(tiny_pipe, monkeypatch):
    from torch._inductor.virtualized import V

    from flexvar_hf.utils.inductor import WideRowChoices

    default = type(V.choices)
    seen = []
    generate_tokens = tiny_pipe.generate_tokens

    def spy(*args, **kwargs):
        seen.append(type(V.choices))
        return generate_tokens(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe, "generate_tokens", spy)
    monkeypatch.setattr(tiny_pipe.transformer, "compile_repeated_blocks", lambda **kw: None)
    monkeypatch.setattr(tiny_pipe.vqvae.decoder, "compile", lambda **kw: None)
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True)
    generate(tiny_pipe, height=64, width=64)
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False)
    generate(tiny_pipe, height=64, width=64)
    tiny_pipe.transformer.enable_float8_inference()
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True)
    generate(tiny_pipe, height=64, width=64)
    assert seen == [WideRowChoices, default, WideRowChoices]  # float8 models too (their GELU is a kernel of ours)


def test_compiled_fast_sampling_falls_back_to_inductors_heuristics_on_other_torch_versions(tiny_pipe, monkeypatch):
    from flexvar_hf.utils import inductor

    monkeypatch.setattr(inductor, "SUPPORTED", False)  # as on a torch whose Inductor has other extension points
    monkeypatch.setattr(tiny_pipe.transformer, "compile_repeated_blocks", lambda **kw: None)
    monkeypatch.setattr(tiny_pipe.vqvae.decoder, "compile", lambda **kw: None)
    tiny_pipe.enable_fast_sampling(use_cuda_graph=False, torch_compile=True)
    with pytest.warns(UserWarning, match="Inductor's own heuristics"):
        fast = generate(tiny_pipe, height=64, width=64)
    tiny_pipe.disable_fast_sampling()
    assert torch.equal(fast, generate(tiny_pipe, height=64, width=64))
