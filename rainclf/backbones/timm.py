"""A timm image model as a frozen vision backbone (``--backbone timm:convnext_atto``).

Weights come only from a local safetensors file (``--weights FILE``); without one the model is
randomly initialised from a fixed seed and everything that reports on it says so. Preprocessing is
timm's own eval transform from the model's data config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from rainclf.backbones.base import (
    Backbone,
    BackboneError,
    BackboneOptions,
    default_cache_dir,
    resolve_device,
)
from rainclf.backbones.fingerprint import file_sha256 as _file_sha256

RANDOM_SEED = 0


class TimmBackbone(Backbone):
    kind = "timm"
    features = ("vision",)

    def __init__(self, model_name: str, options: BackboneOptions):
        try:
            import timm
        except ImportError:
            raise BackboneError("timm backbones need timm: pip install timm") from None
        if not model_name or model_name not in timm.list_models():
            raise BackboneError(f"timm has no model {model_name!r} (see timm.list_models())")
        self.model_name, self.options = model_name, options
        self.name = f"timm:{model_name}"
        self.weights = Path(options.weights) if options.weights else None
        if self.weights is not None:
            if self.weights.suffix != ".safetensors" or not self.weights.is_file():
                raise BackboneError(f"--weights {self.weights}: need an existing .safetensors file "
                                    "(rainclf does not unpickle .pth/.bin checkpoints)")
            wid = _file_sha256(self.weights, default_cache_dir())
        else:
            wid = f"random-seed-{RANDOM_SEED}"
        self.random_weights = self.weights is None
        self.fingerprint = hashlib.sha256(f"timm:{model_name}:{timm.__version__}:{wid}".encode()).hexdigest()
        self._model = None
        self._dim = None
        # timm's eval preprocessing (input size, resize/crop, mean/std) from the architecture's
        # default pretrained config, known without building the model: the cache namespace and
        # the image size a model directory records are right before the first embed
        self.data_config = self._data_config(timm, model_name, options.image_size)
        self.image_size = int(self.data_config["input_size"][-1]) if self.data_config else int(options.image_size or 0)

    @staticmethod
    def _data_config(timm, model_name: str, image_size: int | None) -> dict | None:
        cfg = timm.models.get_pretrained_cfg(model_name)
        if cfg is None:
            return None   # 0 until loaded: the built model's config decides
        data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
        if image_size:
            data["input_size"] = (3, int(image_size), int(image_size))
        return data

    def weight_files(self) -> list[Path]:
        return [Path(self.weights)] if self.weights and Path(self.weights).is_file() else []

    def load(self):
        if self._model is None:
            import timm
            import torch

            self.device = resolve_device(self.options.device)
            torch.manual_seed(RANDOM_SEED)
            model = timm.create_model(self.model_name, pretrained=False, num_classes=0)
            if self.weights is not None:
                from safetensors.torch import load_file

                state = load_file(str(self.weights))
                state = {k: v for k, v in state.items() if not k.startswith(("head.fc.", "fc.", "classifier."))}
                missing, unexpected = model.load_state_dict(state, strict=False)
                if missing:
                    raise BackboneError(f"--weights {self.weights} does not fit {self.model_name}: "
                                        f"{len(missing)} missing keys (first: {missing[0]})")
            model.eval().requires_grad_(False).to(self.device)
            if self.data_config is None:
                self.data_config = self._data_config_of(timm, model)
            self.image_size = int(self.data_config["input_size"][-1])
            self._transform = timm.data.create_transform(**self.data_config)
            self._model = model
        return self._model

    def _data_config_of(self, timm, model) -> dict:
        cfg = timm.data.resolve_data_config({}, model=model)
        if self.image_size:
            cfg["input_size"] = (3, self.image_size, self.image_size)
        return cfg

    def dim(self, feature: str) -> int:
        if self._dim is None:
            self._dim = int(self.load().num_features)
        return self._dim

    def _embed(self, images, feature, layer, prompt):
        import torch

        model = self.load()
        batch = torch.stack([self._transform(im) for im in images]).to(self.device)
        with torch.inference_mode():
            return model(batch).float().cpu().numpy()

    def describe(self) -> dict:
        self.load()  # image size comes from timm's data config
        return super().describe()
