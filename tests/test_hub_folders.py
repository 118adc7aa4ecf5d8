"""Saved pipeline folders in the hub's conventions: diffusers' generic loader, and model cards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import dynamic_modules_utils
from huggingface_hub import ModelCard

from flexvar_hf import FlexVARImg2ImgPipeline, FlexVARPipeline
from flexvar_hf.conversion import convert_original_to_diffusers
from flexvar_hf.pipelines.generic_loading import PIPELINE_MODULE
from flexvar_hf.utils.model_card import PIPELINE_TAG, flexvar_model_card

from conftest import REPO_ROOT
from test_pipeline import make_tiny_pipe

SHIPPED_MODEL = REPO_ROOT / "models" / "flexvar-digits"


@pytest.fixture(autouse=True)
def modules_cache(tmp_path, monkeypatch):
    """diffusers copies a folder's pipeline module into its modules cache before importing it: a temporary one."""
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    make_tiny_pipe().save_pretrained(folder)
    return folder


def tokens(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe([1, 2], num_inference_steps=3, output_type="latent", generator=torch.Generator().manual_seed(0)).images


def test_saved_folder_names_its_module(saved_dir):
    index = json.loads((saved_dir / "model_index.json").read_text())
    assert index["_class_name"] == [PIPELINE_MODULE, "FlexVARPipeline"]
    assert index["transformer"] == ["flexvar_hf.models.transformer_flexvar", "FlexVARTransformer2DModel"]
    assert "from flexvar_hf import FlexVARPipeline" in (saved_dir / f"{PIPELINE_MODULE}.py").read_text()


def test_generic_loader_loads_a_saved_folder(saved_dir):
    expected = tokens(FlexVARPipeline.from_pretrained(saved_dir))
    pipe = DiffusionPipeline.from_pretrained(saved_dir, trust_remote_code=True, dtype=torch.float32)
    assert type(pipe) is FlexVARPipeline
    assert pipe.id2label[1] == "class 1, synonym 1"
    assert torch.equal(tokens(pipe), expected)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # diffusers' own rule for code in a folder
        DiffusionPipeline.from_pretrained(saved_dir)


def test_generic_loader_keeps_the_saved_class(saved_dir, tmp_path):
    FlexVARImg2ImgPipeline.from_pretrained(saved_dir).save_pretrained(tmp_path / "img2img")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "img2img", trust_remote_code=True)) is (
        FlexVARImg2ImgPipeline
    )
    # A named class loads any FlexVAR folder as itself, without remote code.
    assert type(FlexVARPipeline.from_pretrained(tmp_path / "img2img")) is FlexVARPipeline


def test_generic_loader_loads_the_shipped_model():
    pipe = DiffusionPipeline.from_pretrained(SHIPPED_MODEL, trust_remote_code=True)
    assert type(pipe) is FlexVARPipeline and pipe.get_label_ids(["seven"]) == [7]
    assert pipe.scheduler.config.guidance_schedule == "constant"


def test_folders_saved_before_keep_loading(saved_dir, tmp_path):
    """A folder whose model_index.json names the class plainly (as every version before generic loading wrote it)
    loads with flexvar-hf's classes; saving it again adds what the generic loader needs."""
    old = tmp_path / "old"
    shutil.copytree(saved_dir, old)
    (old / f"{PIPELINE_MODULE}.py").unlink()
    index = json.loads((old / "model_index.json").read_text())
    (old / "model_index.json").write_text(json.dumps({**index, "_class_name": "FlexVARPipeline"}))
    expected = tokens(FlexVARPipeline.from_pretrained(saved_dir))
    assert torch.equal(tokens(FlexVARPipeline.from_pretrained(old)), expected)
    assert type(FlexVARImg2ImgPipeline.from_pretrained(old)) is FlexVARImg2ImgPipeline
    FlexVARPipeline.from_pretrained(old).save_pretrained(tmp_path / "resaved")
    resaved = DiffusionPipeline.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    assert torch.equal(tokens(resaved), expected)


def test_converter_writes_a_card_and_a_generic_folder(tmp_path, transformer_ckpt, vq_ckpt):
    output = tmp_path / "flexvar-d2"
    convert_original_to_diffusers(transformer_ckpt, vq_ckpt, output, model_id="someone/flexvar-d2")
    card = ModelCard.load(output / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == PIPELINE_TAG and "flexvar" in card.data.tags
    assert card.data.base_model == "jiaosiyu1999/FlexVAR"
    assert 'FlexVARPipeline.from_pretrained("someone/flexvar-d2")' in card.text
    assert "transformer_original.pth" in card.text and "No sample-quality numbers" in card.text  # not a release
    assert type(DiffusionPipeline.from_pretrained(output, trust_remote_code=True)) is FlexVARPipeline


def test_card_of_a_released_depth_quotes_the_published_numbers():
    from flexvar_hf.utils.model_card import converted_model_card

    pipe = make_tiny_pipe(num_classes=1000)
    pipe.transformer.register_to_config(num_layers=16, hidden_size=1024)  # the config a d16 conversion has
    card = converted_model_card(pipe, "flexvar-d16", "FlexVARd16-epo179.pth", "FlexVAE.pth")
    assert "FID 3.05" in card.text and "Inception Score 291.3" in card.text
    assert card.data.datasets == ["ILSVRC/imagenet-1k"]


def test_card_metadata_round_trips(tmp_path):
    card = flexvar_model_card(
        make_tiny_pipe(), "me/tiny", title="tiny", description="Trained on *shapes*.", results="Loss 1.0.",
        license="apache-2.0", datasets=["me/shapes"], tags=["diffusers-training"],
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == {
        "license": "apache-2.0",
        "library_name": "diffusers",
        "pipeline_tag": PIPELINE_TAG,
        "datasets": ["me/shapes"],
        "tags": ["flexvar", "class-conditional", "image-generation", "autoregressive", "diffusers-training"],
    }
    assert "## How to use" in loaded.text and "## Numbers\n\nLoss 1.0." in loaded.text
    assert 'pipe("class 0", generator' in loaded.text  # a class name the pipeline knows


def test_shipped_model_card():
    card = ModelCard.load(SHIPPED_MODEL / "README.md")
    assert card.data.license == "mit" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == PIPELINE_TAG
    assert "96x96, 10 steps" in card.text and "| **generate (its setting)** | 96x96 | 10 |" in card.text
