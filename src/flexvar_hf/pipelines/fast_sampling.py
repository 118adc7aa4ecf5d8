"""Graph-replayed token generation for FlexVARPipeline: the whole scale loop as one CUDA graph per setting."""

from __future__ import annotations

from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from ..schedulers.scheduling_flexvar import GeneratorLike, check_generator, exponential_noise


def loop_device(pipeline) -> torch.device:
    """Where fast sampling runs the loop: the device of the transformer's weights. Read off one weight, since
    diffusers' `device`, `dtype` and `_execution_device` each walk every module for offload hooks, a cost paid
    before every replay."""
    return pipeline.transformer.proj_out.weight.device


@dataclass(eq=False)
class _StaticLoop:
    """The buffers one setting's loop reads and writes, and its graph (None when it runs eagerly)."""

    class_labels: torch.Tensor
    noise: list[torch.Tensor | None]
    decode: bool
    indices: torch.Tensor | None = None
    pixels: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class FastTokenGenerator:
    """
    Runs `FlexVARPipeline.generate_tokens` (and, if asked, the VQ decoding) from static buffers, captured once per
    setting into a CUDA graph.

    A setting is the batch size, the scales, the sampling arguments, whether to decode, dtype and device. Its first
    call captures the loop (one warm-up run and the capture); every call copies the class labels in, draws the
    sampling noise with the caller's generator (outside the graph, in the order and shapes `scheduler.step` would
    draw it, so the tokens equal the plain path's for the same generator), replays the graph and copies the tokens
    (and pixels) out. One replay launches the whole loop, which removes the per-kernel launch and Python cost that
    dominates small batches.

    Graphs keep their own memory (key/value cache, logits) while they are cached; at most `max_graphs` are kept,
    the least recently used dropped first. With `use_cuda_graph=False` the same static-buffer path runs eagerly
    (what the tests check on CPU).
    """

    def __init__(self, pipeline, use_cuda_graph: bool = True, max_graphs: int = 4, compiled: bool = False):
        if max_graphs < 1:
            raise ValueError(f"`max_graphs` must be >= 1, got {max_graphs}.")
        self.pipeline = pipeline
        self.use_cuda_graph = use_cuda_graph
        self.max_graphs = max_graphs
        self.compiled = compiled
        self.loops: OrderedDict[tuple, _StaticLoop] = OrderedDict()

    @property
    def device(self) -> torch.device:
        """Where the loop runs, `loop_device(pipeline)`."""
        return loop_device(self.pipeline)

    def _noise_shapes(self, batch_size: int, top_k: int) -> list[tuple[int, int, int] | None]:
        scheduler = self.pipeline.scheduler
        vocab_size = self.pipeline.transformer.config.vocab_size
        steps = range(len(scheduler.scales))
        return [scheduler.sampling_noise_shape(step, batch_size, vocab_size, top_k) for step in steps]

    def _draw_noise(self, loop: _StaticLoop, generator: GeneratorLike) -> None:
        for buffer in loop.noise:
            if buffer is not None:
                exponential_noise(buffer.shape, generator, buffer.device, out=buffer)

    def _run(self, loop: _StaticLoop, sampling: tuple) -> None:
        with self._compile_heuristics():
            self._generate(loop, sampling)

    def _compile_heuristics(self) -> AbstractContextManager:
        """With `compiled` modules, which compile at their first call of a new shape (in `_run`): one-pass
        LayerNorms over rows up to 2048 wide (d24 and d30), see `utils.inductor`."""
        if not self.compiled:
            return nullcontext()
        from ..utils.inductor import wide_row_persistent_reductions  # imports Inductor (about 0.8 s)

        return wide_row_persistent_reductions()

    def _generate(self, loop: _StaticLoop, sampling: tuple) -> None:
        guidance_scale, guidance_schedule, top_k, top_p, temperature = sampling
        loop.indices = self.pipeline.generate_tokens(
            loop.class_labels,
            guidance_scale,
            guidance_schedule,
            top_k,
            top_p,
            temperature,
            generator=None,
            step_noise=loop.noise,
        )
        if loop.decode:
            loop.pixels = self.pipeline.vqvae.decode_indices(loop.indices).sample

    def _capture(self, loop: _StaticLoop, sampling: tuple) -> None:
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):  # warm-up: library handles and workspaces are made outside the graph
            self._run(loop, sampling)
        torch.cuda.current_stream().wait_stream(side_stream)
        loop.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(loop.graph):
            self._run(loop, sampling)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: torch.LongTensor,
        guidance_scale: float,
        guidance_schedule: str | None,
        top_k: int,
        top_p: float,
        temperature: float,
        generator: GeneratorLike = None,
        decode: bool = False,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        """Same arguments as `generate_tokens` without known tokens or callbacks (`generator` one generator or one
        per image). Returns the (B, h, w) tokens and, with `decode`, their (B, 3, 16h, 16w) pixels from
        `vqvae.decode_indices` (else None)."""
        check_generator(generator, len(class_labels))
        transformer, scales = self.pipeline.transformer, tuple(self.pipeline.scheduler.scales)
        sampling = (float(guidance_scale), guidance_schedule, int(top_k), float(top_p), float(temperature))
        key = (len(class_labels), scales, sampling, decode, transformer.proj_out.weight.dtype, self.device)
        loop = self.loops.pop(key, None)
        if loop is None:
            loop = self._new_loop(class_labels, sampling, decode)
        self.loops[key] = loop  # most recently used last
        while len(self.loops) > self.max_graphs:
            self.loops.popitem(last=False)

        loop.class_labels.copy_(class_labels)
        self._draw_noise(loop, generator)
        if loop.graph is not None:
            loop.graph.replay()
        else:
            self._run(loop, sampling)
        return loop.indices.clone(), None if loop.pixels is None else loop.pixels.clone()

    def _new_loop(self, class_labels: torch.LongTensor, sampling: tuple, decode: bool) -> _StaticLoop:
        shapes = self._noise_shapes(len(class_labels), sampling[2])
        noise = [None if shape is None else torch.ones(shape, device=class_labels.device) for shape in shapes]
        loop = _StaticLoop(class_labels=class_labels.clone(), noise=noise, decode=decode)
        if self.use_cuda_graph:
            self._capture(loop, sampling)
        return loop
