"""ChatGLM-architecture checkpoints (``model_type: chatglm``), such as the original THUDM ``glm-4v-9b``.

Their modelling code ships inside the checkpoint, so loading it executes that code
(``trust_remote_code=True``). rainclf only does so when the user passes ``--trust-remote-code``;
``glm4v.Glm4vBackbone`` refuses the directory otherwise. Prefer the transformers-native GLM-4.1V /
4.5V / 4.6V checkpoints.

Status: written against the published glm-4v-9b interface (tokenizer ``apply_chat_template`` with an
``image`` field, ``model.transformer.vision``); not run against the real checkpoint here (no
weights can be downloaded on these machines). Images are processed one at a time. Its remote
tokenizer code imports ``tiktoken``: ``pip install 'rainclf[chatglm]'``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rainclf.backbones.base import (
    DEFAULT_PROMPT,
    WEIGHT_SUFFIXES,
    Backbone,
    BackboneError,
    BackboneOptions,
    default_cache_dir,
    resolve_device,
)
from rainclf.backbones.fingerprint import checkpoint_fingerprint


class ChatGLMBackbone(Backbone):
    kind = "chatglm"
    features = ("vision", "answer")

    def __init__(self, name: str, model_dir: Path, revision: str | None, options: BackboneOptions):
        if not options.trust_remote_code:  # defence in depth: the caller checks too
            raise BackboneError(f"{name} needs --trust-remote-code (it runs code shipped with the checkpoint)")
        self.name, self.model_dir, self.options = name, Path(model_dir), options
        config = json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        self.hidden_size = int(config["hidden_size"])
        self.num_layers = int(config["num_layers"])
        vision = config.get("vision_config", {})
        self.vision_dim = int(vision.get("hidden_size", self.hidden_size))
        self.image_size = int(options.image_size or vision.get("image_size", 1120))
        self.random_weights = False
        self.fingerprint = checkpoint_fingerprint(self.model_dir, "chatglm", memo_dir=default_cache_dir(),
                                                  semantic_config=False)
        self._model = self._tokenizer = None

    def dim(self, feature: str) -> int:
        return self.vision_dim if feature == "vision" else self.hidden_size

    def weight_files(self) -> list[Path]:
        return sorted(p for p in self.model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)

    def load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.device = resolve_device(self.options.device)
            dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            try:
                tok = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=True, local_files_only=True)
                model = AutoModelForCausalLM.from_pretrained(self.model_dir, trust_remote_code=True, dtype=dtype,
                                                             local_files_only=True)
            except ImportError as e:  # the remote tokenizer imports tiktoken, which transformers does not need
                if "tiktoken" in str(e):
                    raise BackboneError(f"cannot load ChatGLM checkpoint {self.model_dir}: its remote code needs "
                                        "tiktoken: pip install 'rainclf[chatglm]'") from None
                raise BackboneError(f"cannot load ChatGLM checkpoint {self.model_dir}: {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from None
            except Exception as e:  # remote code can fail in any way; report it in one line
                raise BackboneError(f"cannot load ChatGLM checkpoint {self.model_dir}: "
                                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
            model.to(self.device).eval().requires_grad_(False)
            self._model, self._tokenizer = model, tok
        return self._model, self._tokenizer

    def _inputs(self, image, prompt: str):
        _, tok = self.load()
        inputs = tok.apply_chat_template([{"role": "user", "image": image, "content": prompt}],
                                         add_generation_prompt=True, tokenize=True, return_tensors="pt",
                                         return_dict=True)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _embed(self, images, feature, layer, prompt=DEFAULT_PROMPT):
        import torch

        model, _ = self.load()
        out = []
        with torch.inference_mode():
            for im in images:
                im = im.resize((self.image_size, self.image_size))
                inputs = self._inputs(im, prompt)
                if feature == "vision":
                    tokens = model.transformer.vision(inputs["images"].to(model.dtype))
                    out.append(tokens[0].float().mean(dim=0))
                else:
                    hs = model(**inputs, output_hidden_states=True).hidden_states
                    out.append(hs[layer][0, -1].float())
        return torch.stack(out).cpu().numpy()
