"""Conversion between the original FlexVAR checkpoints and flexvar-hf models.

Original formats: `FlexVAE.pth` is `{"model": state_dict}` of LlamaGen's VQ-16; `FlexVARd*.pth` is a raw state dict,
`{"model": state_dict}` or a trainer checkpoint `{"trainer": {"var_wo_ddp": state_dict, ...}}`; tensors may be float32
or float16. Every size is inferred from tensor shapes.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .models import FlexVARTransformer2DModel, FlexVQModel

StateDict = dict[str, torch.Tensor]

# Buffers of the original code that hold no weights.
VQ_DROPPED = ("quantize.codebook_used",)
VQ_CODEBOOK_USAGE_LENGTH = 65536  # size of LlamaGen's `codebook_used` buffer, recreated as zeros going back
TRANSFORMER_DROPPED = ("attn_bias_for_masking",)
DEFAULT_TRAIN_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)

# AdaLN rows: the original orders them gamma1, gamma2, scale1, scale2, shift1, shift2; diffusers' AdaLayerNormZero
# wants shift, scale, gate for attention then for the feed-forward.
ADALN_TO_DIFFUSERS = (4, 2, 0, 5, 3, 1)
ADALN_TO_ORIGINAL = tuple(ADALN_TO_DIFFUSERS.index(i) for i in range(6))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the expected layout."""


def _permute_rows(order: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reorder the six row blocks of an AdaLN weight or bias: block j of the output is block order[j] of the input."""

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        chunks = tensor.chunk(6, dim=0)
        return torch.cat([chunks[i] for i in order])

    return gather


def _squeeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1) if tensor.ndim == 4 else tensor


def _unsqueeze_1x1(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


@dataclass(frozen=True)
class RenameRule:
    """Maps keys that start with `original` to keys that start with `ours` (and back). `{a}`, `{b}` stand for block
    numbers. `to_ours` / `to_original` transform the tensors of matching keys."""

    original: str
    ours: str
    to_ours: Callable[[torch.Tensor], torch.Tensor] | None = None
    to_original: Callable[[torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def _regex(template: str) -> re.Pattern:
        pattern = re.escape(template).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
        return re.compile("^" + pattern)

    def apply(self, key: str, reverse: bool) -> tuple[str, Callable | None] | None:
        source, target = (self.ours, self.original) if reverse else (self.original, self.ours)
        match = self._regex(source).match(key)
        if match is None:
            return None
        new_key = target.format(**match.groupdict()) + key[match.end() :]
        transform = self.to_original if reverse else self.to_ours
        return new_key, transform


def _vq_rules() -> list[RenameRule]:
    attention_leaves = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    rules = []
    for part, blocks, sampler, new_sampler in (
        ("encoder", "down_blocks", "downsample", "downsamplers.0"),
        ("decoder", "up_blocks", "upsample", "upsamplers.0"),
    ):
        attentions = [
            (f"{part}.conv_blocks.{{a}}.attn.{{b}}.", f"{part}.{blocks}.{{a}}.attentions.{{b}}."),
            (f"{part}.mid.1.", f"{part}.mid_block.attentions.0."),
        ]
        resnets = [
            (f"{part}.conv_blocks.{{a}}.res.{{b}}.", f"{part}.{blocks}.{{a}}.resnets.{{b}}."),
            (f"{part}.mid.0.", f"{part}.mid_block.resnets.0."),
            (f"{part}.mid.2.", f"{part}.mid_block.resnets.1."),
        ]
        for original, ours in attentions:
            rules += [
                RenameRule(original + leaf, ours + new_leaf, _squeeze_1x1, _unsqueeze_1x1)
                for leaf, new_leaf in attention_leaves
            ]
        for original, ours in resnets:
            rules += [RenameRule(original + "nin_shortcut.", ours + "conv_shortcut."), RenameRule(original, ours)]
        rules += [
            RenameRule(f"{part}.conv_blocks.{{a}}.{sampler}.", f"{part}.{blocks}.{{a}}.{new_sampler}."),
            RenameRule(f"{part}.norm_out.", f"{part}.conv_norm_out."),
            RenameRule(f"{part}.conv_in.", f"{part}.conv_in."),
            RenameRule(f"{part}.conv_out.", f"{part}.conv_out."),
        ]
    rules += [RenameRule(name, name) for name in ("quant_conv.", "post_quant_conv.", "quantize.embedding.")]
    return rules


def _transformer_rules() -> list[RenameRule]:
    block = "blocks.{a}."
    return [
        RenameRule("word_embed.", "code_embed."),
        RenameRule("class_emb.", "class_embed."),
        RenameRule("pos_start", "start_token"),
        RenameRule("pos_1LC", "pos_grid"),
        RenameRule(block + "attn.mat_qkv.", block + "attn.to_qkv."),
        RenameRule(block + "attn.q_bias", block + "attn.q_bias"),
        RenameRule(block + "attn.v_bias", block + "attn.v_bias"),
        RenameRule(block + "attn.scale_mul_1H11", block + "attn.log_scale"),
        RenameRule(block + "attn.proj.", block + "attn.to_out."),
        RenameRule(block + "ffn.fc1.", block + "ff.net.0.proj."),
        RenameRule(block + "ffn.fc2.", block + "ff.net.2."),
        RenameRule(
            block + "ada_lin.1.",
            block + "norm1.linear.",
            _permute_rows(ADALN_TO_DIFFUSERS),
            _permute_rows(ADALN_TO_ORIGINAL),
        ),
        RenameRule("head_nm.ada_lin.1.", "norm_out.linear."),
        RenameRule("head.", "proj_out."),
    ]


VQ_RULES = _vq_rules()
TRANSFORMER_RULES = _transformer_rules()


def _apply_rules(
    state_dict: StateDict, rules: Iterable[RenameRule], reverse: bool
) -> tuple[StateDict, dict[str, str], list[str]]:
    """Rename every key by the first rule that matches.

    Returns the renamed dict, a map from each new key to its source key, and the keys no rule matched."""
    renamed, sources, unmatched = {}, {}, []
    for key, tensor in state_dict.items():
        for rule in rules:
            result = rule.apply(key, reverse)
            if result is not None:
                new_key, transform = result
                renamed[new_key] = transform(tensor) if transform is not None else tensor
                sources[new_key] = key
                break
        else:
            unmatched.append(key)
    return renamed, sources, unmatched


def _original_name(key: str, rules: Iterable[RenameRule]) -> str:
    for rule in rules:
        result = rule.apply(key, reverse=True)
        if result is not None:
            return result[0]
    return key


def _short_list(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_keys(
    kind: str,
    produced: StateDict,
    sources: dict[str, str],
    unmatched: list[str],
    expected: Iterable[str],
    rules: Sequence[RenameRule],
) -> None:
    """Raise a CheckpointError naming, in the original's key names, every missing and every left-over key."""
    expected = set(expected)
    missing = [_original_name(key, rules) for key in expected - produced.keys()]
    leftover = set(unmatched) | {sources[key] for key in produced.keys() - expected}
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if leftover:
        problems.append(f"left-over keys with no place in the model: {_short_list(leftover)}")
    if problems:
        raise CheckpointError(f"This is not an original FlexVAR {kind} checkpoint ({'; '.join(problems)}).")


# ----------------------------------------------------------------------------------------------------------------
# Reading original files


def load_torch_file(path: str | Path, allow_unsafe_pickle: bool = False) -> object:
    """`torch.load` on CPU with `weights_only=True`; full unpickling only when `allow_unsafe_pickle` (warns)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {str(path)!r} does not exist.")
    if allow_unsafe_pickle:
        warnings.warn(
            f"Loading {path} with full unpickling: this runs any code the file contains. Only do this for files "
            "you trust.",
            stacklevel=2,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except Exception as error:  # torch raises many types for truncated or foreign files
        hint = (
            ""
            if allow_unsafe_pickle
            else " If the file is trusted and holds non-tensor objects, pass allow_unsafe_pickle."
        )
        raise CheckpointError(f"Could not read {str(path)!r} as a PyTorch checkpoint ({error}).{hint}") from error


def unwrap_state_dict(checkpoint: object, source: str = "checkpoint") -> StateDict:
    """Accept a raw state dict, `{"model": sd}` or `{"trainer": {"var_wo_ddp": sd}}`; return the state dict."""
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("trainer"), dict):
        checkpoint = checkpoint["trainer"].get("var_wo_ddp")
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        checkpoint = checkpoint["model"]
    if (
        not isinstance(checkpoint, dict)
        or not checkpoint
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in checkpoint.items())
    ):
        raise CheckpointError(
            f"{source} is not a state dict: expected a dict of tensors, {{'model': state_dict}} or "
            "{'trainer': {'var_wo_ddp': state_dict}}."
        )
    # DDP / torch.compile prefixes
    for prefix in ("module.", "_orig_mod."):
        if all(key.startswith(prefix) for key in checkpoint):
            checkpoint = {key[len(prefix) :]: value for key, value in checkpoint.items()}
    return checkpoint


def _require(state_dict: StateDict, key: str, kind: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"This is not an original FlexVAR {kind} checkpoint: key {key!r} is missing.")
    return state_dict[key]


def _count_indices(state_dict: StateDict, pattern: str) -> int:
    regex = re.compile(pattern)
    found = {int(m.group(1)) for key in state_dict if (m := regex.match(key))}
    return max(found) + 1 if found else 0


# ----------------------------------------------------------------------------------------------------------------
# VQ tokenizer


def vq_config_from_original(state_dict: StateDict) -> dict:
    """Infer the `FlexVQModel` config from an original VQ-16 state dict."""
    kind = "VQ tokenizer"
    conv_in = _require(state_dict, "encoder.conv_in.weight", kind)
    base = conv_in.shape[0]
    num_levels = _count_indices(state_dict, r"encoder\.conv_blocks\.(\d+)\.")
    if num_levels == 0:
        raise CheckpointError(f"This is not an original FlexVAR {kind} checkpoint: no encoder.conv_blocks.* keys.")
    multipliers = []
    for level in range(num_levels):
        width = _require(state_dict, f"encoder.conv_blocks.{level}.res.0.conv1.weight", kind).shape[0]
        if width % base:
            raise CheckpointError(f"Encoder level {level} has {width} channels, not a multiple of {base}.")
        multipliers.append(width // base)
    return {
        "in_channels": conv_in.shape[1],
        "out_channels": _require(state_dict, "decoder.conv_out.weight", kind).shape[0],
        "base_channels": base,
        "channel_multipliers": tuple(multipliers),
        "layers_per_block": _count_indices(state_dict, r"encoder\.conv_blocks\.0\.res\.(\d+)\."),
        "z_channels": _require(state_dict, "encoder.conv_out.weight", kind).shape[0],
        "num_codes": _require(state_dict, "quantize.embedding.weight", kind).shape[0],
        "code_dim": _require(state_dict, "quant_conv.weight", kind).shape[0],
    }


def convert_vq_state_dict(original: StateDict) -> tuple[dict, StateDict]:
    """Original VQ-16 state dict -> (FlexVQModel config, state dict)."""
    config = vq_config_from_original(original)
    kept = {k: v for k, v in original.items() if k not in VQ_DROPPED}
    converted, sources, unmatched = _apply_rules(kept, VQ_RULES, reverse=False)
    expected = FlexVQModel.from_config(config).state_dict().keys()
    _check_keys("VQ tokenizer", converted, sources, unmatched, expected, VQ_RULES)
    return config, converted


def vq_state_dict_to_original(state_dict: StateDict) -> dict:
    """FlexVQModel state dict -> the original's `{"model": state_dict}` (codebook usage buffer reset to zeros)."""
    original, _, unmatched = _apply_rules(state_dict, VQ_RULES, reverse=True)
    if unmatched:
        raise CheckpointError(f"Keys with no original counterpart: {_short_list(unmatched)}")
    dtype = state_dict["quantize.embedding.weight"].dtype
    original["quantize.codebook_used"] = torch.zeros(VQ_CODEBOOK_USAGE_LENGTH, dtype=dtype)
    return {"model": original}


# ----------------------------------------------------------------------------------------------------------------
# Transformer


def transformer_config_from_original(state_dict: StateDict) -> dict:
    """Infer the `FlexVARTransformer2DModel` config from an original FlexVAR state dict."""
    kind = "transformer"
    word_embed = _require(state_dict, "word_embed.weight", kind)
    hidden, code_dim = word_embed.shape
    pos_grid = _require(state_dict, "pos_1LC", kind)
    if pos_grid.shape[-1] != pos_grid.shape[-2]:
        raise CheckpointError(
            f"Only square position grids are supported, got pos_1LC of shape {tuple(pos_grid.shape)}."
        )
    if "shared_ada_lin.1.weight" in state_dict:
        raise CheckpointError(
            "Checkpoints trained with shared_aln=True are not supported (no released model uses it)."
        )
    return {
        "num_classes": _require(state_dict, "class_emb.weight", kind).shape[0] - 1,
        "vocab_size": _require(state_dict, "head.weight", kind).shape[0],
        "code_dim": code_dim,
        "num_layers": _count_indices(state_dict, r"blocks\.(\d+)\."),
        "hidden_size": hidden,
        "num_attention_heads": _require(state_dict, "blocks.0.attn.scale_mul_1H11", kind).shape[1],
        "mlp_ratio": _require(state_dict, "blocks.0.ffn.fc1.weight", kind).shape[0] / hidden,
        "pos_grid_size": pos_grid.shape[-1],
    }


def convert_transformer_state_dict(original: StateDict) -> tuple[dict, StateDict]:
    """Original FlexVAR state dict -> (FlexVARTransformer2DModel config, state dict)."""
    config = transformer_config_from_original(original)
    kept = {}
    for key, tensor in original.items():
        if key in TRANSFORMER_DROPPED:
            continue
        if key.endswith("attn.zero_k_bias"):
            if torch.count_nonzero(tensor):
                raise CheckpointError(f"{key} is not zero; FlexVAR's attention has no key bias.")
            continue
        kept[key] = tensor
    converted, sources, unmatched = _apply_rules(kept, TRANSFORMER_RULES, reverse=False)
    expected = FlexVARTransformer2DModel.from_config(config).state_dict().keys()
    _check_keys("transformer", converted, sources, unmatched, expected, TRANSFORMER_RULES)
    return config, converted


def block_causal_bias(patch_nums: Sequence[int]) -> torch.Tensor:
    """The original's `attn_bias_for_masking` buffer (1, 1, L, L): 0 where a token may attend, -inf elsewhere."""
    ids = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)])
    allowed = ids[:, None] >= ids[None, :]
    return torch.where(allowed, 0.0, -torch.inf)[None, None]


def transformer_state_dict_to_original(
    state_dict: StateDict, train_patch_nums: Sequence[int] = DEFAULT_TRAIN_PATCH_NUMS
) -> StateDict:
    """FlexVARTransformer2DModel state dict -> the original's raw state dict, with its non-weight buffers
    (`zero_k_bias`, and `attn_bias_for_masking` built for `train_patch_nums`)."""
    original, _, unmatched = _apply_rules(state_dict, TRANSFORMER_RULES, reverse=True)
    if unmatched:
        raise CheckpointError(f"Keys with no original counterpart: {_short_list(unmatched)}")
    dtype = original["word_embed.weight"].dtype
    original["attn_bias_for_masking"] = block_causal_bias(train_patch_nums).to(dtype)
    for key in [k for k in original if k.endswith("attn.q_bias")]:
        original[key.replace("q_bias", "zero_k_bias")] = torch.zeros_like(original[key])
    return original


# ----------------------------------------------------------------------------------------------------------------
# Building models


def _build(model_class, config: dict, state_dict: StateDict, dtype: torch.dtype | None, kind: str):
    model = model_class.from_config(config)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"The {kind} checkpoint's tensors do not fit the inferred config: {error}") from error
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_original_vq(
    path: str | Path, dtype: torch.dtype | None = None, allow_unsafe_pickle: bool = False
) -> FlexVQModel:
    """Read an original `FlexVAE.pth` into a `FlexVQModel` (kept in float32 unless `dtype` is given)."""
    state_dict = unwrap_state_dict(load_torch_file(path, allow_unsafe_pickle), source=str(path))
    config, converted = convert_vq_state_dict(state_dict)
    return _build(FlexVQModel, config, converted, dtype, "VQ tokenizer")


def load_original_transformer(
    path: str | Path, dtype: torch.dtype | None = None, allow_unsafe_pickle: bool = False
) -> FlexVARTransformer2DModel:
    """Read an original `FlexVARd*.pth` into a `FlexVARTransformer2DModel`."""
    state_dict = unwrap_state_dict(load_torch_file(path, allow_unsafe_pickle), source=str(path))
    config, converted = convert_transformer_state_dict(state_dict)
    return _build(FlexVARTransformer2DModel, config, converted, dtype, "transformer")


# ----------------------------------------------------------------------------------------------------------------
# Whole pipelines


def pipeline_from_original(
    transformer_ckpt: str | Path,
    vq_ckpt: str | Path,
    dtype: torch.dtype | None = None,
    allow_unsafe_pickle: bool = False,
):
    """Build a `FlexVARPipeline` from the original `.pth` files (ImageNet class names attached for 1000 classes)."""
    from .imagenet import imagenet_id2label
    from .pipelines import FlexVARPipeline
    from .schedulers import FlexVARScaleScheduler

    transformer = load_original_transformer(transformer_ckpt, dtype, allow_unsafe_pickle)
    vqvae = load_original_vq(vq_ckpt, dtype, allow_unsafe_pickle)
    if transformer.config.vocab_size != vqvae.config.num_codes or transformer.config.code_dim != vqvae.config.code_dim:
        raise CheckpointError(
            f"The transformer expects {transformer.config.vocab_size} codes of size {transformer.config.code_dim} but "
            f"the VQ tokenizer has {vqvae.config.num_codes} of size {vqvae.config.code_dim}."
        )
    id2label = imagenet_id2label() if transformer.config.num_classes == 1000 else None
    return FlexVARPipeline(transformer, vqvae, FlexVARScaleScheduler(), id2label=id2label)


def convert_original_to_diffusers(
    transformer_ckpt: str | Path,
    vq_ckpt: str | Path,
    output_dir: str | Path,
    dtype: torch.dtype | None = None,
    allow_unsafe_pickle: bool = False,
    overwrite: bool = False,
    model_id: str | None = None,
):
    """
    Convert the original checkpoints into a diffusers pipeline folder with a model card (`README.md`, whose usage
    snippet loads `model_id`, by default `output_dir`), written atomically (a temporary folder beside `output_dir`,
    removed on failure, renamed into place when complete). Returns the pipeline.

    An existing `output_dir` is refused unless `overwrite`, and even then replaced only when it is a pipeline folder
    written by flexvar-hf with nothing else in it (`utils.io.check_output_path`): never a folder holding other files,
    a regular file or the working directory.
    """
    from .utils.io import atomic_directory, check_output_path
    from .utils.model_card import converted_model_card

    check_output_path(output_dir, overwrite, folder=True)  # before the slow loading
    pipeline = pipeline_from_original(transformer_ckpt, vq_ckpt, dtype, allow_unsafe_pickle)
    card = converted_model_card(pipeline, model_id or str(output_dir), Path(transformer_ckpt).name, Path(vq_ckpt).name)
    with atomic_directory(output_dir, overwrite=overwrite) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        card.save(staging / "README.md")
    return pipeline


def convert_diffusers_to_original(
    pipeline_dir: str | Path,
    transformer_out: str | Path,
    vq_out: str | Path,
    train_patch_nums: Sequence[int] = DEFAULT_TRAIN_PATCH_NUMS,
    overwrite: bool = False,
) -> None:
    """
    Write a diffusers FlexVAR folder back as the original `FlexVARd*.pth` (raw state dict) and `FlexVAE.pth`
    (`{"model": state_dict}`) files. Both are written to temporary names and renamed into place only when both are
    complete; on failure the temporary files are removed and nothing is replaced.

    Existing outputs are refused unless `overwrite` (then only regular files are replaced), and so are two equal
    output paths.
    """
    from .pipelines import FlexVARPipeline
    from .utils.io import atomic_files

    with atomic_files(transformer_out, vq_out, overwrite=overwrite) as (transformer_tmp, vq_tmp):
        pipeline = FlexVARPipeline.from_pretrained(pipeline_dir)
        transformer_sd = transformer_state_dict_to_original(pipeline.transformer.state_dict(), train_patch_nums)
        torch.save(transformer_sd, transformer_tmp)
        torch.save(vq_state_dict_to_original(pipeline.vqvae.state_dict()), vq_tmp)
