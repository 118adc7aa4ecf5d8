"""`examples/train.py` under FSDP, through accelerate's own config file, on two CPU processes.

accelerate runs FSDP only on accelerators: on CPU processes it sets up plain multi-process training (gloo) and
ignores the FSDP settings. `FSDP_ON_CPU` below turns that state into FSDP before the script builds its
`Accelerator`, so that everything else is accelerate's and the script's own code path, as on GPUs:
`examples/accelerate_configs/fsdp.yaml`, FSDP2 sharding of the blocks and the head's norm, sharded checkpoints,
gathering the weights for validation and for the saved pipeline. PyTorch's FSDP2 itself runs on CPU with gloo.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT
from test_training import assets, fresh_accelerate, reset_accelerate, scratch_args, train_script  # noqa: F401

FSDP_ON_CPU = """
import importlib.util, os, sys, torch
import accelerate.state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

plain_init = accelerate.state.AcceleratorState.__init__

def init(self, *args, **kwargs):
    plain_init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

accelerate.state.AcceleratorState.__init__ = init
spec = importlib.util.spec_from_file_location("train", sys.argv[2])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
result = train.main(train.parse_args(sys.argv[3:]))
torch.save(result["losses"], os.path.join(sys.argv[1], f"losses-{os.environ['RANK']}.pt"))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_fsdp(tmp_path, name: str, args: list[str]) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file examples/accelerate_configs/fsdp.yaml` of train.py on 2 CPU processes."""
    wrapper = tmp_path / "fsdp_on_cpu.py"
    wrapper.write_text(FSDP_ON_CPU)
    (tmp_path / name).mkdir(exist_ok=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO_ROOT / "examples" / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port()), str(wrapper), str(tmp_path / name),
        str(REPO_ROOT / "examples" / "train.py"), *args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_trains_like_one_process_saves_a_full_pipeline_and_resumes(assets, tmp_path, train_script,  # noqa: F811
                                                                         fresh_accelerate):  # noqa: F811
    """FSDP on 2 processes of 2 images == 1 process on the same global batches of 4 (losses, final weights); the
    saved pipeline holds the full trained weights; a run killed after its sharded checkpoint resumes to the same
    end. Class-label dropout is off: its draws depend on the process."""
    options = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--class_dropout_prob", "0",
               "--validation_steps", "3", "--validation_class_labels", "1", "--validation_num_inference_steps", "2"]
    completed = launch_fsdp(tmp_path, "a", scratch_args(assets, tmp_path / "a", "--train_batch_size", "2", *options))
    assert completed.returncode == 0, completed.stderr[-3000:]
    losses = [torch.load(tmp_path / "a" / f"losses-{rank}.pt") for rank in (0, 1)]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    # FSDP's sharded checkpoint (as the config asks), one file of each weight shard per process
    assert len(list((tmp_path / "a" / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))) == 2
    assert (tmp_path / "a" / "validation" / "step-0000003" / "00-1.png").is_file()

    single = train_script.main(train_script.parse_args(
        scratch_args(assets, tmp_path / "single", "--train_batch_size", "4", *options)))
    assert losses[0] == pytest.approx(single["losses"], rel=1e-5)
    assert len(set(single["losses"])) == 3
    saved = load_file(tmp_path / "a" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = single["transformer"].state_dict()
    assert saved.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-5, msg=name)

    # The same command killed after the checkpoint at step 2, then run again with --resume_from_checkpoint latest.
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("pipeline", "validation", "*.pt"))
    resumed = launch_fsdp(tmp_path, "b", scratch_args(assets, tmp_path / "b", "--train_batch_size", "2", *options,
                                                      "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(tmp_path / "b" / "losses-0.pt") == pytest.approx(losses[0][2:], rel=1e-6)
    again = load_file(tmp_path / "b" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(again[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp_refuses_ema_before_training(assets, tmp_path):  # noqa: F811
    completed = launch_fsdp(tmp_path, "ema", scratch_args(assets, tmp_path / "ema", "--max_train_steps", "1",
                                                          "--use_ema"))
    assert completed.returncode != 0
    assert "--use_ema is not supported when FSDP" in completed.stderr
    assert not list((tmp_path / "ema").glob("checkpoint-*"))


def test_gather_model_without_sharding_is_the_unwrapped_model(fresh_accelerate):  # noqa: F811
    from accelerate import Accelerator

    from flexvar_hf import FlexVARTransformer2DModel
    from flexvar_hf.training.distributed import gather_model, shards_weights

    accelerator = Accelerator(cpu=True)
    model = FlexVARTransformer2DModel(num_classes=3, vocab_size=16, code_dim=4, num_layers=1, hidden_size=16,
                                      num_attention_heads=2, pos_grid_size=4)
    prepared = accelerator.prepare(model)
    assert not shards_weights(accelerator)
    assert gather_model(accelerator, prepared, FlexVARTransformer2DModel) is model
    reset_accelerate()


def test_end_training_frees_the_prepared_objects_before_the_process_group(fresh_accelerate, monkeypatch):  # noqa: F811
    """Once the script drops its own references, `end_training` leaves nothing alive that `prepare` made (a DDP
    wrapper alive past the process group's destruction can hang the process at exit), and only then ends the run."""
    import gc
    import weakref

    from accelerate import Accelerator

    from flexvar_hf.training.distributed import end_training

    accelerator = Accelerator(cpu=True)
    module = torch.nn.Linear(4, 4)
    module.self_reference = [module]  # a reference cycle, as hooks can make: freed only by the garbage collector
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    prepared_module, prepared_optimizer = accelerator.prepare(module, optimizer)
    left_alive = [weakref.ref(prepared_module), weakref.ref(prepared_optimizer)]
    ended = []
    monkeypatch.setattr(Accelerator, "end_training",
                        lambda self: ended.append([reference() is not None for reference in left_alive]))
    gc.disable()  # the collection must come from end_training itself
    try:
        module = optimizer = prepared_module = prepared_optimizer = None
        end_training(accelerator)
    finally:
        gc.enable()
    assert ended == [[False, False]]
    reset_accelerate()
