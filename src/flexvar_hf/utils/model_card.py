"""Model cards for FlexVAR pipeline folders: the hub's `README.md`, a YAML metadata header and a Markdown body."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

# Tags of every FlexVAR card; callers add their own (e.g. "diffusers-training").
MODEL_CARD_TAGS = ("flexvar", "class-conditional", "image-generation", "autoregressive")
# The hub has no class-conditional generation task; class-conditional ImageNet generators are listed under this one.
PIPELINE_TAG = "unconditional-image-generation"
PAPER_URL = "https://arxiv.org/abs/2502.20313"


def model_summary(pipeline) -> str:
    """One paragraph on what the pipeline is, read off its configs: classes, transformer size, tokenizer, default
    image size."""
    transformer, vqvae = pipeline.transformer.config, pipeline.vqvae.config
    parameters = sum(p.numel() for p in pipeline.transformer.parameters()) / 1e6
    side = pipeline.default_sample_size
    return (
        f"A [FlexVAR]({PAPER_URL}) class-conditional image generator: {transformer.num_classes} classes, a "
        f"{transformer.num_layers}-layer transformer of width {transformer.hidden_size} ({parameters:.1f}M "
        f"parameters) over the tokens of a VQ tokenizer with {vqvae.num_codes} codes and "
        f"{pipeline.vae_scale_factor} pixels per token. It generates an image scale by scale, each step predicting "
        f"the whole token map of the next scale, so one model draws any size and aspect ratio in any number of steps; "
        f"by default {side}x{side}, the size it was trained at."
    )


def usage_snippet(model_id: str, class_label: int | str = 0) -> str:
    """The card's "how to use" section for a folder or hub id."""
    return f"""With the flexvar-hf package installed:

```python
import torch
from flexvar_hf import FlexVARPipeline

pipe = FlexVARPipeline.from_pretrained("{model_id}")
image = pipe({json.dumps(class_label)}, generator=torch.Generator().manual_seed(0)).images[0]
```

diffusers' generic loader finds the class through the folder's `flexvar_pipeline.py`, which imports it from the
installed package: `DiffusionPipeline.from_pretrained("{model_id}", trust_remote_code=True)`."""


def flexvar_model_card(
    pipeline,
    model_id: str,
    title: str,
    description: str,
    results: str,
    license: str | None = None,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """
    The model card of a FlexVAR pipeline.

    Args:
        pipeline ([`FlexVARPipeline`]): The pipeline the card describes (its configs give the summary).
        model_id (`str`): Hub id or folder the usage snippet loads.
        title (`str`): The card's heading.
        description (`str`): Markdown on where the weights come from (converted, trained on what, for how long).
        results (`str`): Markdown for the "Numbers" section: the model's numbers and how they were measured, or
            what was not measured and how to measure it.
        license (`str`, *optional*): A hub license identifier ("mit", "apache-2.0", "other", ...).
        base_model (`str`, *optional*): Hub id of the model these weights were converted or fine-tuned from.
        datasets (`list[str]`, *optional*): Hub ids of the training data.
        tags (`list[str]`, *optional*): Tags added to `MODEL_CARD_TAGS`.

    Returns:
        `huggingface_hub.ModelCard` with `library_name: diffusers` and `pipeline_tag` set; `.save(path)` writes it.
    """
    card_data = ModelCardData(
        license=license,
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=[*MODEL_CARD_TAGS, *tags],
    )
    label = next(iter(pipeline.id2label.values()), "0").split(",")[0].strip() if pipeline.id2label else 0
    body = "\n\n".join(
        [
            f"# {title}",
            model_summary(pipeline),
            description.strip(),
            "## How to use",
            usage_snippet(model_id, label),
            "## Numbers",
            results.strip(),
        ]
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}\n")


# The released checkpoints' ImageNet 256x256 numbers as the FlexVAR repository reports them: depth -> (FID, IS).
PUBLISHED_IMAGENET_256 = {16: (3.05, 291.3), 20: (2.41, 299.3), 24: (2.21, 299.1)}
ORIGINAL_REPO = "jiaosiyu1999/FlexVAR"


def converted_model_card(pipeline, model_id: str, transformer_file: str, vq_file: str) -> ModelCard:
    """
    The card that `convert/convert_flexvar_to_diffusers.py` writes: where the weights come from, the authors'
    ImageNet numbers for the released depths (none for other checkpoints), and how the conversion was checked.

    Args:
        pipeline ([`FlexVARPipeline`]): The converted pipeline.
        model_id (`str`): Hub id (or folder) the usage snippet loads.
        transformer_file (`str`), vq_file (`str`): Names of the original checkpoints, e.g. "FlexVARd24-epo349.pth".
    """
    config = pipeline.transformer.config
    depth = config.num_layers
    released = (
        depth in PUBLISHED_IMAGENET_256 and config.hidden_size == 64 * depth and config.num_classes == 1000
    )
    description = (
        f"Converted with flexvar-hf's `convert/convert_flexvar_to_diffusers.py` from the original checkpoints "
        f"`{transformer_file}` and `{vq_file}` of [FlexVAR](https://github.com/{ORIGINAL_REPO}) (Siyu Jiao et al., "
        "MIT license). The conversion renames, reshapes and reorders tensors and drops only buffers that hold no "
        "weights; converting back gives the original tensors bit for bit."
    )
    if released:
        fid, inception_score = PUBLISHED_IMAGENET_256[depth]
        results = (
            f"As reported by the FlexVAR authors for the released d{depth} checkpoint: FID {fid} and Inception "
            f"Score {inception_score} on ImageNet 256x256, 50,000 images (50 per class) in 10 steps, scored with "
            "OpenAI's guided-diffusion evaluation suite against its ImageNet 256x256 reference batch. The pipeline's "
            "defaults are that evaluation's settings (guidance 3.5 with the linear schedule, top-k 900, top-p 0.95)."
        )
    else:
        results = "No sample-quality numbers are published for this checkpoint."
    results += (
        " flexvar-hf's tests check the conversion against the original code's outputs on the same weights: "
        "identical token indices at every scale and logits within the tests' tolerance of 1e-4 relative error."
    )
    return flexvar_model_card(
        pipeline,
        model_id,
        title=Path(model_id).name,
        description=description,
        results=results,
        license="mit",
        base_model=ORIGINAL_REPO,
        datasets=["ILSVRC/imagenet-1k"] if config.num_classes == 1000 else None,
    )

