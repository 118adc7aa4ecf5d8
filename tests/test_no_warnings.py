"""The common calls print no warning: loading with a dtype, moving, generating, editing, converting and saving.

Both kinds fail these tests: Python warnings (deprecations among them) are raised as errors, and records of WARNING
and above on the loggers of diffusers, huggingface_hub, transformers, accelerate or the root logger are collected
(diffusers' `logger.warning` prints to stderr without going through `warnings`).
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from flexvar_hf import FlexVARImg2ImgPipeline, FlexVARInpaintPipeline, FlexVAROutpaintPipeline, FlexVARPipeline
from flexvar_hf.conversion import convert_diffusers_to_original, convert_original_to_diffusers

from conftest import REPO_ROOT
from test_pipeline import make_tiny_pipe

SHIPPED_MODEL = REPO_ROOT / "models" / "flexvar-digits"
LOGGERS = ("diffusers", "huggingface_hub", "transformers", "accelerate", "")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def no_warnings():
    """Fail on any Python warning or logged warning inside the block."""
    handler = _Collect()
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not handler.messages, handler.messages


def quick(pipe):
    pipe.set_progress_bar_config(disable=True)
    return dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0))


def test_load_with_dtype_and_move():
    with no_warnings():
        pipe = FlexVARPipeline.from_pretrained(SHIPPED_MODEL, dtype=torch.bfloat16)
        pipe.to("cpu")
        pipe.to(torch.float32)
        pipe.to("cpu", torch.bfloat16)
        pipe.to(dtype=torch.bfloat16)
        FlexVARImg2ImgPipeline.from_pipe(pipe)
    assert pipe.transformer.dtype == pipe.vqvae.dtype == torch.bfloat16


def test_generate_and_edit():
    with no_warnings():
        pipe = FlexVARPipeline.from_pretrained(SHIPPED_MODEL, dtype=torch.float32)
        image = pipe(3, height=48, width=48, **quick(pipe)).images[0]
        img2img = FlexVARImg2ImgPipeline.from_pipe(pipe)
        img2img(image, 8, strength=0.5, **quick(img2img))
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (24, 0, 48, 48))
        inpaint = FlexVARInpaintPipeline.from_pipe(pipe)
        inpaint(image, mask, 8, preserve_unmasked=True, **quick(inpaint))
        outpaint = FlexVAROutpaintPipeline.from_pipe(pipe)
        outpaint(image, 3, width=96, **quick(outpaint))
        FlexVARPipeline.from_pipe(outpaint)(["seven"], height=48, width=48, output_type="np", **quick(pipe))


def test_convert_save_and_load(tmp_path, transformer_ckpt, vq_ckpt):
    with no_warnings():
        convert_original_to_diffusers(transformer_ckpt, vq_ckpt, tmp_path / "converted", dtype=torch.bfloat16)
        pipe = FlexVARPipeline.from_pretrained(tmp_path / "converted", dtype=torch.bfloat16)
        pipe.save_pretrained(tmp_path / "saved")
        convert_diffusers_to_original(tmp_path / "saved", tmp_path / "var.pth", tmp_path / "vae.pth")
    assert (tmp_path / "var.pth").is_file() and (tmp_path / "vae.pth").is_file()


def test_the_check_sees_diffusers_logged_warnings():
    """The test above would pass vacuously if diffusers' log records escaped the handler."""
    with pytest.raises(AssertionError, match="kept in float32"):
        with no_warnings():
            ModelMixin.to(make_tiny_pipe().vqvae, torch.float32)
