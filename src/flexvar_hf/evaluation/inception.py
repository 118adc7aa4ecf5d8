"""The Inception-v3 feature network of FID, IS and precision/recall: torch-fidelity's port of the TensorFlow graph.

The ADM suite feeds uint8 images to TensorFlow's `classify_image_graph_def.pb` (Inception-v3 of 2015-12-05), which
resizes them to 299x299 with TensorFlow 1.x's bilinear resize and reads the 2048 pool features and the 1008 logits.
torch-fidelity (`pip install flexvar-hf[eval]`, or `torch-fidelity` alone) ports that graph to PyTorch layer by layer
(the TF resize included) with the converted weights `weights-inception-2015-12-05-6726825d.pth`; it is what
torchmetrics uses and what MAR and others check against the ADM suite. Only its network is used here, not its
metric code (the metrics follow the ADM's definitions, `evaluation.metrics`).

Nothing is downloaded: the weights come from a path, or from the torch hub cache where torch-fidelity's own download
puts them. torch-fidelity's package `__init__` imports torchvision (for its datasets and other networks); where
torchvision cannot be imported, the Inception module and the four modules it needs, which use only torch, are loaded
without that `__init__`.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..utils.precision import without_tf32

INCEPTION_MODULE = "torch_fidelity.feature_extractor_inceptionv3"
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# torch-fidelity's file name, then pytorch-fid's name for the same converted graph (the same layer names).
WEIGHTS_FILE_NAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
POOL_FEATURES = "2048"  # pool_3, FID's and precision/recall's features
LOGITS = "logits_unbiased"  # pool features times the classifier's weight, no bias: the ADM's IS logits
NUM_POOL_FEATURES, NUM_LOGITS = 2048, 1008


def _is_torch_fidelity(module_name: str) -> bool:
    return module_name == "torch_fidelity" or module_name.startswith("torch_fidelity.")


@functools.cache
def inception_module():
    """torch-fidelity's `feature_extractor_inceptionv3` module; raises ImportError naming the extra to install."""
    before = {name for name in sys.modules if _is_torch_fidelity(name)}
    try:
        return importlib.import_module(INCEPTION_MODULE)
    except ModuleNotFoundError as error:
        if error.name is None or not error.name.startswith("torchvision"):
            if error.name is not None and _is_torch_fidelity(error.name):
                raise ImportError(
                    "Evaluation needs torch-fidelity's Inception-v3: `pip install flexvar-hf[eval]` (or "
                    "`pip install torch-fidelity`)."
                ) from error
            raise
    # Without torchvision: an empty `torch_fidelity` package (its __init__ not run) to import the module from, taken
    # out of sys.modules again afterwards so that a later `import torch_fidelity` is a normal one.
    spec = importlib.util.find_spec("torch_fidelity")
    sys.modules["torch_fidelity"] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(INCEPTION_MODULE)
    finally:
        for name in [name for name in sys.modules if _is_torch_fidelity(name) and name not in before]:
            del sys.modules[name]


def default_weights_paths() -> list[Path]:
    """Where the weights are looked for without a path: the torch hub cache's `checkpoints` folder
    (`torch.hub.get_dir()`, `~/.cache/torch/hub` unless `TORCH_HOME` says otherwise), under each known file name."""
    return [Path(torch.hub.get_dir()) / "checkpoints" / name for name in WEIGHTS_FILE_NAMES]


def find_inception_weights(path: str | Path | None = None) -> Path:
    """
    The weights file: `path` if given, else the first of `default_weights_paths()` that exists. Raises ValueError
    naming the file needed, where to get it and where to put it.
    """
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(
                f"Inception weights {str(path)!r} do not exist. Evaluation needs torch-fidelity's Inception-v3 "
                f"weights, {WEIGHTS_FILE_NAMES[0]} (from {WEIGHTS_URL})."
            )
        return Path(path)
    for candidate in default_weights_paths():
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"No Inception-v3 weights found, and nothing is downloaded at run time. Evaluation needs torch-fidelity's "
        f"port of the TensorFlow FID Inception, the file {WEIGHTS_FILE_NAMES[0]}: download it once from "
        f"{WEIGHTS_URL} and put it at {default_weights_paths()[0]} (where torch-fidelity keeps it), or pass its "
        "path (`--inception_weights`)."
    )


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights at `path`, read with `torch.load(weights_only=True)`; ValueError unless they are a state dict
    with the Inception-v3 classifier `fc` of 2048 -> 1008."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"Cannot read Inception weights {str(path)!r} as a PyTorch state dict: {error}") from error
    fc = state_dict.get("fc.weight") if isinstance(state_dict, dict) else None
    if not isinstance(fc, torch.Tensor) or tuple(fc.shape) != (NUM_LOGITS, NUM_POOL_FEATURES):
        raise ValueError(
            f"{str(path)!r} is not the Inception-v3 FID weights ({WEIGHTS_FILE_NAMES[0]}): no `fc.weight` of shape "
            f"({NUM_LOGITS}, {NUM_POOL_FEATURES})."
        )
    return state_dict


def inception_network(features: list[str], state_dict: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """torch-fidelity's `FeatureExtractorInceptionV3` giving `features`, with `state_dict` loaded (strictly; a
    ValueError for weights of another layout) or, if None, its random initialisation. torch-fidelity's constructor
    unpickles its weights file with `weights_only=False`, so it is only ever given an empty file of ours; the
    weights are loaded here."""
    module = inception_module()

    class Network(module.FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):  # the constructor's load of the empty file
            return None

    with tempfile.TemporaryDirectory() as folder:
        empty = Path(folder) / "empty.pt"
        torch.save({}, empty)
        network = Network("inception-v3-compat", features, feature_extractor_weights_path=str(empty))
    network.__class__ = module.FeatureExtractorInceptionV3  # torch-fidelity's own class from here on
    if state_dict is not None:
        try:
            network.load_state_dict(state_dict)
        except RuntimeError as error:  # missing, unexpected or misshapen tensors
            raise ValueError(
                f"The weights are not the Inception-v3 FID weights ({WEIGHTS_FILE_NAMES[0]}): {error}"
            ) from error
    return network


class InceptionFeatures(torch.nn.Module):
    """
    uint8 images -> the ADM's Inception features: pool features `(B, 2048)` and IS logits `(B, 1008)`, float32.

    Images of any size (resized to 299x299 inside, as TensorFlow did); computed in float32 without TF32.

    Args:
        weights_path (`str` or `Path`, *optional*): The weights file; None looks in `default_weights_paths()`.
    """

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        path = find_inception_weights(weights_path)
        self.network = inception_network([POOL_FEATURES, LOGITS], load_inception_state_dict(path))
        self.weights_path = path

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`images`: uint8 `(B, 3, H, W)` (channels first) or `(B, H, W, 3)` (as in npz files)."""
        if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        with without_tf32():
            pool, logits = self.network(images.contiguous())
        return pool, logits

    def extract(
        self, batches: Iterable[np.ndarray], total: int | None = None, description: str = "Inception features"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool features `(N, 2048)` and logits `(N, 1008)`, float32 on the network's device, of uint8 `(B, H, W, 3)`
        batches, with a progress bar of `total` images."""
        device = next(self.parameters()).device
        pools, logits = [], []
        with tqdm(total=total, desc=description, unit="img") as progress:
            for batch in batches:
                pool, logit = self(torch.from_numpy(np.ascontiguousarray(batch)).to(device, non_blocking=True))
                pools.append(pool)
                logits.append(logit)
                progress.update(len(batch))
        if not pools:
            raise ValueError("No images to extract Inception features from.")
        return torch.cat(pools), torch.cat(logits)


def save_random_inception_weights(path: str | Path, seed: int = 0) -> Path:
    """
    Write a randomly initialised Inception-v3 with the real weights' layout to `path` (atomically): a stand-in for
    the real weights where they cannot be had (tests, examples, timing). Its metrics mean nothing.

    Convolutions are He-initialised and the classifier scaled so that features and logits stay of order one through
    the network's depth.
    """
    from ..utils.io import atomic_save

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network = inception_network([POOL_FEATURES])
        for layer in network.modules():
            if isinstance(layer, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        torch.nn.init.normal_(network.fc.weight, std=NUM_POOL_FEATURES**-0.5)
    state_dict = {name: tensor.contiguous() for name, tensor in network.state_dict().items()}
    return atomic_save(lambda staging: torch.save(state_dict, staging), path)
