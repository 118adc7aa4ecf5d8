"""Converting original FlexVAR checkpoints to diffusers folders and back."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flexvar_hf import FlexVARTransformer2DModel, FlexVQModel
from flexvar_hf.conversion import (
    CheckpointError,
    convert_diffusers_to_original,
    convert_original_to_diffusers,
    convert_vq_state_dict,
    load_original_transformer,
    load_original_vq,
    transformer_state_dict_to_original,
    vq_state_dict_to_original,
)
from flexvar_hf.pipelines import FlexVARPipeline

from conftest import RELATIVE_TOLERANCE, REPO_ROOT, relative_error

TRAIN_SCALES = [1, 2, 3, 4]


@pytest.fixture(scope="module")
def original_transformer_sd(transformer_ckpt):
    return torch.load(transformer_ckpt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def original_vq_checkpoint(vq_ckpt):
    return torch.load(vq_ckpt, map_location="cpu", weights_only=True)


def _logits(model, reference):
    with torch.no_grad():
        return model(reference["labels"], TRAIN_SCALES, reference["teacher_inputs"]).logits


@pytest.mark.parametrize("wrap", ["raw", "model", "trainer"])
def test_every_transformer_wrapping_reproduces_reference(tmp_path, original_transformer_sd, reference, wrap):
    wrapped = {
        "raw": original_transformer_sd,
        "model": {"model": original_transformer_sd},
        "trainer": {
            "trainer": {"var_wo_ddp": original_transformer_sd, "var_opt": {"scale": torch.tensor(1.0)}},
            "epoch": 3,
            "args": {"depth": 2, "patch_nums": (1, 2, 3, 4)},
        },
    }[wrap]
    path = tmp_path / "var.pth"
    torch.save(wrapped, path)
    model = load_original_transformer(path)
    assert relative_error(_logits(model, reference), reference["teacher_logits"]) < RELATIVE_TOLERANCE


def test_float16_checkpoints_convert_to_their_exact_values(
    tmp_path, original_transformer_sd, original_vq_checkpoint, parity_transformer, parity_vq, reference
):
    half_var, half_vq = tmp_path / "var16.pth", tmp_path / "vq16.pth"
    torch.save({k: v.half() for k, v in original_transformer_sd.items()}, half_var)
    torch.save({"model": {k: v.half() for k, v in original_vq_checkpoint["model"].items()}}, half_vq)
    transformer = load_original_transformer(half_var)
    vqvae = load_original_vq(half_vq)
    # Loaded in float32 (as the original does): every weight is the float16 rounding of the float32 one.
    for model, full in ((transformer, parity_transformer), (vqvae, parity_vq)):
        assert next(model.parameters()).dtype == torch.float32
        for key, value in full.state_dict().items():
            assert torch.equal(model.state_dict()[key], value.half().float()), key
    # and the outputs stay close to the float32 reference
    assert relative_error(_logits(transformer, reference), reference["teacher_logits"]) < 5e-3
    with torch.no_grad():
        latents = vqvae.encode(reference["image"]).latents
    assert relative_error(latents, reference["latent"]) < 5e-3


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, transformer_ckpt, vq_ckpt):
    output = tmp_path_factory.mktemp("converted") / "flexvar-d2"
    convert_original_to_diffusers(transformer_ckpt, vq_ckpt, output)
    return output


def test_converted_folder_is_a_diffusers_pipeline(converted_dir, reference):
    names = {p.name for p in converted_dir.iterdir()}
    assert {"model_index.json", "transformer", "vqvae", "scheduler"} <= names
    assert (converted_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (converted_dir / "vqvae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (converted_dir / "scheduler" / "scheduler_config.json").is_file()
    pipe = FlexVARPipeline.from_pretrained(converted_dir)
    assert pipe.transformer.config.num_layers == 2 and pipe.vqvae.config.base_channels == 32
    assert pipe.id2label[0].startswith("tench") and pipe.get_label_ids(["goldfish"]) == [1]
    assert relative_error(_logits(pipe.transformer, reference), reference["teacher_logits"]) < RELATIVE_TOLERANCE
    # no temporary folders left beside the output
    assert [p.name for p in converted_dir.parent.iterdir()] == [converted_dir.name]


def test_round_trip_to_original_is_bit_exact(tmp_path, converted_dir, original_transformer_sd, original_vq_checkpoint):
    var_out, vq_out = tmp_path / "var.pth", tmp_path / "vae.pth"
    convert_diffusers_to_original(converted_dir, var_out, vq_out, train_patch_nums=TRAIN_SCALES)
    back_var = torch.load(var_out, weights_only=True)
    back_vq = torch.load(vq_out, weights_only=True)
    assert back_var.keys() == original_transformer_sd.keys()
    for key, value in original_transformer_sd.items():
        assert back_var[key].dtype == value.dtype and torch.equal(back_var[key], value), key
    assert back_vq.keys() == {"model"} and back_vq["model"].keys() == original_vq_checkpoint["model"].keys()
    for key, value in original_vq_checkpoint["model"].items():
        assert torch.equal(back_vq["model"][key], value), key


def test_float16_output_dtype(tmp_path, transformer_ckpt, vq_ckpt):
    pipe = convert_original_to_diffusers(transformer_ckpt, vq_ckpt, tmp_path / "half", dtype=torch.float16)
    assert pipe.transformer.dtype == torch.float16
    stored = load_file(tmp_path / "half" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    # diffusers loads float32 unless dtype is given; the stored half weights then load exactly.
    reloaded = FlexVARPipeline.from_pretrained(tmp_path / "half", dtype=torch.float16)
    assert reloaded.transformer.dtype == torch.float16 and reloaded.vqvae.dtype == torch.float16
    for name, tensor in reloaded.transformer.state_dict().items():
        assert torch.equal(tensor, pipe.transformer.state_dict()[name]), name


SMALL_TRANSFORMERS = [
    dict(num_classes=10, vocab_size=100, code_dim=8, num_layers=3, hidden_size=192, num_attention_heads=3),
    dict(
        num_classes=1000,
        vocab_size=4096,
        code_dim=16,
        num_layers=1,
        hidden_size=64,
        num_attention_heads=1,
        pos_grid_size=16,
    ),
]
SMALL_VQS = [
    dict(base_channels=32, channel_multipliers=(1, 2, 2, 4), z_channels=16, num_codes=50, code_dim=8),
    dict(
        base_channels=64, channel_multipliers=(1, 1, 2), layers_per_block=1, z_channels=32, num_codes=300, code_dim=4
    ),
]


def public_config(model) -> dict:
    return {key: value for key, value in model.config.items() if not key.startswith("_")}


@pytest.mark.parametrize("config", SMALL_TRANSFORMERS)
@pytest.mark.parametrize("half", [False, True])
def test_transformer_sizes_are_inferred_from_tensors(tmp_path, config, half):
    torch.manual_seed(0)
    ours = FlexVARTransformer2DModel(**config)
    original = transformer_state_dict_to_original(ours.state_dict())
    if half:
        original = {k: v.half() for k, v in original.items()}
    path = tmp_path / "var.pth"
    torch.save({"trainer": {"var_wo_ddp": original}}, path)
    loaded = load_original_transformer(path)
    assert public_config(loaded) == public_config(ours)
    for key, value in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float() if half else value), key


@pytest.mark.parametrize("config", SMALL_VQS)
def test_vq_sizes_are_inferred_from_tensors(config):
    torch.manual_seed(0)
    ours = FlexVQModel(**config)
    inferred, converted = convert_vq_state_dict(vq_state_dict_to_original(ours.state_dict())["model"])
    assert {k: tuple(v) if isinstance(v, tuple) else v for k, v in inferred.items()} == {
        k: ours.config[k] for k in inferred
    }
    for key, value in ours.state_dict().items():
        assert torch.equal(converted[key], value), key


def _assert_fails_cleanly(tmp_path, transformer_path, vq_path, match):
    output = tmp_path / "out" / "pipeline"
    with pytest.raises(CheckpointError, match=match):
        convert_original_to_diffusers(transformer_path, vq_path, output)
    assert not output.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_truncated_file_is_rejected_and_nothing_written(tmp_path, transformer_ckpt, vq_ckpt):
    truncated = tmp_path / "truncated.pth"
    data = transformer_ckpt.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    _assert_fails_cleanly(tmp_path, truncated, vq_ckpt, "Could not read")


def test_foreign_state_dict_is_rejected(tmp_path, vq_ckpt):
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, foreign)
    _assert_fails_cleanly(tmp_path, foreign, vq_ckpt, "word_embed.weight")
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_a_state_dict)
    _assert_fails_cleanly(tmp_path, not_a_state_dict, vq_ckpt, "not a state dict")


def test_renamed_key_is_named_in_the_error(
    tmp_path, original_transformer_sd, original_vq_checkpoint, vq_ckpt, transformer_ckpt
):
    renamed = dict(original_transformer_sd)
    renamed["blocks.1.ffn.fc9.weight"] = renamed.pop("blocks.1.ffn.fc2.weight")
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    _assert_fails_cleanly(tmp_path, path, vq_ckpt, r"missing keys: blocks\.1\.ffn\.fc2\.weight.*blocks\.1\.ffn\.fc9")

    vq_sd = dict(original_vq_checkpoint["model"])
    vq_sd["decoder.conv_blocks.0.attn.2.qq.weight"] = vq_sd.pop("decoder.conv_blocks.0.attn.2.q.weight")
    vq_path = tmp_path / "vq_renamed.pth"
    torch.save({"model": vq_sd}, vq_path)
    _assert_fails_cleanly(tmp_path, transformer_ckpt, vq_path, r"decoder\.conv_blocks\.0\.attn\.2\.q\.weight")


def test_wrong_shape_is_a_clear_error(tmp_path, original_transformer_sd, vq_ckpt):
    broken = dict(original_transformer_sd)
    broken["blocks.0.ffn.fc1.bias"] = torch.zeros(7)
    path = tmp_path / "shape.pth"
    torch.save(broken, path)
    _assert_fails_cleanly(tmp_path, path, vq_ckpt, "do not fit")


def test_pickled_objects_need_the_explicit_flag(tmp_path, original_transformer_sd, reference):
    path = tmp_path / "pickled.pth"
    torch.save({"trainer": {"var_wo_ddp": original_transformer_sd}, "args": argparse.Namespace(depth=2)}, path)
    with pytest.raises(CheckpointError, match="allow_unsafe_pickle"):
        load_original_transformer(path)
    with pytest.warns(UserWarning, match="full unpickling"):
        model = load_original_transformer(path, allow_unsafe_pickle=True)
    assert relative_error(_logits(model, reference), reference["teacher_logits"]) < RELATIVE_TOLERANCE


def test_mismatched_tokenizer_is_rejected(tmp_path, vq_ckpt):
    torch.manual_seed(0)
    other = FlexVARTransformer2DModel(
        num_classes=10, vocab_size=100, code_dim=8, num_layers=1, hidden_size=64, num_attention_heads=1
    )
    path = tmp_path / "var.pth"
    torch.save(transformer_state_dict_to_original(other.state_dict()), path)
    _assert_fails_cleanly(tmp_path, path, vq_ckpt, "expects 100 codes")


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "convert" / name), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, check=False)


def test_command_line_round_trip(tmp_path, transformer_ckpt, vq_ckpt, original_transformer_sd):
    output = tmp_path / "cli"
    to_diffusers = ("--transformer_ckpt", transformer_ckpt, "--vq_ckpt", vq_ckpt, "--output_dir", output)
    run = run_script("convert_flexvar_to_diffusers.py", *to_diffusers, "--dtype", "bfloat16")
    assert run.returncode == 0, run.stderr
    assert "depth 2, width 128, 1000 classes" in run.stdout
    assert FlexVARPipeline.from_pretrained(output, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16
    again = run_script("convert_flexvar_to_diffusers.py", *to_diffusers)
    assert again.returncode == 1 and "already exists" in again.stderr
    back = run_script(
        "convert_diffusers_to_flexvar.py",
        "--pipeline_dir", output, "--transformer_out", tmp_path / "var.pth", "--vq_out", tmp_path / "vae.pth",
    )
    assert back.returncode == 0, back.stderr
    restored = torch.load(tmp_path / "var.pth", weights_only=True)
    assert restored["attn_bias_for_masking"].shape == (1, 1, 680, 680)  # the original's default training scales
    assert torch.equal(restored["head.weight"], original_transformer_sd["head.weight"].bfloat16())


# ----------------------------------------------------------------------------------------------------------------
# Nothing a user owns is deleted or overwritten


def load_converter(name: str):
    """The module `convert/{name}.py` (a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"flexvar_convert_{name}", REPO_ROOT / "convert" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_overwrite_replaces_only_a_pipeline_folder_of_ours(tmp_path, converted_dir, transformer_ckpt, vq_ckpt,
                                                           monkeypatch, capsys):
    to_diffusers = load_converter("convert_flexvar_to_diffusers").main
    ours = tmp_path / "ours"
    shutil.copytree(converted_dir, ours)
    (ours / "README.md").write_text("model card")  # a pipeline folder of ours may hold its model card

    def convert(output, *extra) -> int:
        return to_diffusers(["--transformer_ckpt", str(transformer_ckpt), "--vq_ckpt", str(vq_ckpt),
                             "--output_dir", str(output), *extra])

    # Without --overwrite nothing existing is touched.
    before = snapshot(ours)
    assert convert(ours) == 1 and "already exists" in capsys.readouterr().err
    assert snapshot(ours) == before
    # A folder of ours holding a user's file, a folder of someone else, a regular file, the working directory.
    mixed = tmp_path / "mixed"
    shutil.copytree(converted_dir, mixed)
    (mixed / "transformer" / "notes.txt").write_text("mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"jpeg")
    regular = tmp_path / "model.pth"
    regular.write_bytes(b"weights")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "draft.txt").write_text("mine")
    monkeypatch.chdir(workdir)
    for output, message in [
        (mixed, r"holds files flexvar-hf did not write \(transformer/notes\.txt\)"),
        (foreign, "not a diffusers folder written by flexvar-hf"),
        (regular, "is a file, not a folder"),
        (".", "is the working directory or holds it"),
        (tmp_path, "is the working directory or holds it"),
    ]:
        contents = snapshot(tmp_path)
        assert convert(output, "--overwrite") == 1
        assert re.search(message, capsys.readouterr().err), message
        assert snapshot(tmp_path) == contents  # nothing changed, no temporary folder left anywhere

    # --overwrite replaces a pipeline folder of ours, and only once the new one is complete.
    (ours / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"stale")
    assert convert(ours, "--overwrite") == 0
    assert FlexVARPipeline.from_pretrained(ours).transformer.config.num_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mixed", "model.pth", "ours", "photos", "workdir"]


def test_a_failed_conversion_leaves_no_temporary_files(tmp_path, converted_dir, transformer_ckpt, vq_ckpt,
                                                      monkeypatch):
    output = tmp_path / "out"
    shutil.copytree(converted_dir, output)
    before = snapshot(output)

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "model_index.json").write_text("{}")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(FlexVARPipeline, "save_pretrained", broken_save)
        with pytest.raises(OSError, match="disk full"):
            convert_original_to_diffusers(transformer_ckpt, vq_ckpt, output, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and snapshot(output) == before

    # The final rename failing (as renaming onto a busy folder does) restores the old folder and removes the new one.
    rename = Path.rename

    def busy(self, target):
        if Path(target) == output and ".tmp-" in self.name:
            raise OSError(16, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", busy)
    with pytest.raises(OSError, match="busy"):
        convert_original_to_diffusers(transformer_ckpt, vq_ckpt, output, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and snapshot(output) == before


def test_back_conversion_refuses_existing_and_equal_outputs(tmp_path, converted_dir, monkeypatch, capsys):
    to_original = load_converter("convert_diffusers_to_flexvar").main

    def convert(transformer_out, vq_out, *extra) -> int:
        return to_original(["--pipeline_dir", str(converted_dir), "--transformer_out", str(transformer_out),
                            "--vq_out", str(vq_out), "--train_patch_nums", "1_2_3_4", *extra])

    same = tmp_path / "same.pth"
    assert convert(same, same) == 1 and "must be distinct" in capsys.readouterr().err
    assert convert(same, tmp_path / "." / "same.pth", "--overwrite") == 1
    assert "must be distinct" in capsys.readouterr().err and not same.exists()

    var_out, vq_out = tmp_path / "var.pth", tmp_path / "vae.pth"
    var_out.write_bytes(b"my weights")
    assert convert(var_out, vq_out) == 1 and "already exists" in capsys.readouterr().err
    assert var_out.read_bytes() == b"my weights" and not vq_out.exists()  # neither output was written
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    assert convert(folder, vq_out, "--overwrite") == 1 and "not a regular file" in capsys.readouterr().err
    assert convert(var_out, vq_out, "--train_patch_nums", "1_x") == 1
    assert "--train_patch_nums" in capsys.readouterr().err

    # A failure while writing the second file replaces neither and leaves no temporary file.
    save = torch.save
    calls = []

    def failing_second_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save(obj, path)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", failing_second_save)
        assert convert(var_out, vq_out, "--overwrite") == 1
    assert var_out.read_bytes() == b"my weights" and sorted(p.name for p in tmp_path.iterdir()) == [
        "folder.pth", "var.pth"]

    assert convert(var_out, vq_out, "--overwrite") == 0 and "Wrote" in capsys.readouterr().out
    assert torch.load(var_out, weights_only=True)["attn_bias_for_masking"].shape == (1, 1, 30, 30)
    assert set(torch.load(vq_out, weights_only=True)) == {"model"}


def test_only_folders_written_by_flexvar_hf_count_as_ours(tmp_path):
    from flexvar_hf.utils.io import check_output_path, foreign_entries

    model = tmp_path / "vqvae"
    FlexVQModel(**SMALL_VQS[0]).save_pretrained(model)
    (model / "training_summary.json").write_text("{}")  # examples/train_vq.py's summary
    (model / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")  # weight variants and shards
    assert foreign_entries(model) == [] and check_output_path(model, overwrite=True) == model
    (model / "notes.md").write_text("mine")
    assert foreign_entries(model) == ["notes.md"]
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text('{"_class_name": "UNet2DModel"}')  # a diffusers folder, not ours
    assert foreign_entries(other) is None and foreign_entries(tmp_path / "missing") is None
    # A pipeline saved for diffusers' generic loading names its class as [module, class] and holds module.py.
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text('{"_class_name": ["flexvar_pipeline", "FlexVARPipeline"]}')
    (pipeline / "flexvar_pipeline.py").write_text("from flexvar_hf import FlexVARPipeline  # noqa: F401\n")
    shutil.copytree(model, pipeline / "vqvae", ignore=shutil.ignore_patterns("notes.md"))
    assert foreign_entries(pipeline) == []
    (pipeline / "other.py").write_text("")
    assert foreign_entries(pipeline) == ["other.py"]
    link = tmp_path / "link"
    link.symlink_to(model)
    with pytest.raises(ValueError, match="symbolic link"):
        check_output_path(link, overwrite=True)
    assert check_output_path(tmp_path / "new", overwrite=False) == tmp_path / "new"


def test_an_output_made_during_the_write_is_checked_before_it_is_replaced(tmp_path):
    from flexvar_hf.utils.io import atomic_directory, atomic_files

    folder = tmp_path / "out"
    with pytest.raises(ValueError, match="already exists"), atomic_directory(folder) as staging:
        (staging / "model_index.json").write_text("{}")
        folder.mkdir()  # a user's folder appears at the output path while the result is written
        (folder / "mine.txt").write_text("keep")
    assert (folder / "mine.txt").read_text() == "keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]  # the staging folder is gone

    target = tmp_path / "weights.pth"
    with pytest.raises(ValueError, match="already exists"), atomic_files(target) as (temporary,):
        temporary.write_bytes(b"new")
        target.write_bytes(b"user")
    assert target.read_bytes() == b"user"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "weights.pth"]


def test_a_failed_rename_puts_back_the_files_already_replaced(tmp_path, monkeypatch):
    from flexvar_hf.utils import io

    first, second = tmp_path / "transformer.pth", tmp_path / "vq.pth"
    first.write_bytes(b"old transformer")
    rename = Path.rename

    def failing(self, target):
        if Path(target) == second:  # the second file's rename into place fails
            raise OSError("disk gone")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"), io.atomic_files(first, second, overwrite=True) as staging:
        for temporary in staging:
            temporary.write_bytes(b"new")
    assert first.read_bytes() == b"old transformer"  # not the new file without its partner
    assert sorted(path.name for path in tmp_path.iterdir()) == ["transformer.pth"]
