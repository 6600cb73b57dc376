"""GLM-4V-family backbone through transformers' own classes (AutoProcessor +
AutoModelForImageTextToText): GLM-4.1V-9B (``glm4v``), GLM-4.6V-Flash (``glm46v``),
GLM-4.5V / GLM-4.6V (``glm4v_moe``), from a local directory or a hub id, and the committed
random-weight ``glm4v-tiny``, which goes through exactly the same ``from_pretrained`` path.

Features (both frozen, ``torch.inference_mode``):
  vision  the vision tower's merged tokens for one image, mean-pooled → (out_hidden,)
  answer  the language model's hidden state at the last prompt position for the chat
          "image + question" with thinking switched off → (hidden,). ``layer`` indexes
          ``hidden_states`` (0 = embeddings, N = last = final norm, negatives allowed); an
          intermediate layer stops the forward there (early exit), it does not run the rest.

Every image is resized to a fixed ``image_size`` square first (bicubic), so every image gives the
same number of tokens, batches need no padding, and batch size never changes a vector.

Checkpoints are read as released (see ``glm4v_config``, ``glm4v_chat``, ``fingerprint``): a flat
config is normalised and passed to ``from_pretrained(config=…)`` so its stated sizes are built;
thinking is switched off as the template and config allow (``thinking``, recorded by
``describe``); an answer ends with the checkpoint's own ``terminator``; ``--image-size`` must lie
inside the processor's pixel bounds; the fingerprint is the files' content.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rainclf.backbones.base import (
    DEFAULT_PROMPT,
    TINY_NAME,
    WEIGHT_SUFFIXES,
    Backbone,
    BackboneError,
    BackboneOptions,
    default_cache_dir,
    resolve_device,
)
from rainclf.backbones.fingerprint import checkpoint_fingerprint
from rainclf.backbones.glm4v_chat import EMPTY_THINK, stop_ids, terminator, thinking_decision
from rainclf.backbones.glm4v_config import check_image_size, normalise, pixel_bounds, read_config
from rainclf.backbones.glm4v_load import covers, embedding_parts, load_model

SUPPORTED_MODEL_TYPES = ("glm4v", "glm46v", "glm4v_moe")
REMOTE_CODE_MODEL_TYPES = ("chatglm",)  # THUDM/glm-4v-9b: ChatGLM remote code
RANDOM_MARKER = "RAINCLF_RANDOM_WEIGHTS"


def tiny_model_dir() -> Path:
    """Where the committed glm4v-tiny lives: the source tree, or the installed data files."""
    candidates = [Path(__file__).resolve().parents[2] / "models" / TINY_NAME,
                  Path(sys.prefix) / "share" / "rainclf" / "models" / TINY_NAME]
    if os.environ.get("RAINCLF_MODELS_DIR"):
        candidates.insert(0, Path(os.environ["RAINCLF_MODELS_DIR"]) / TINY_NAME)
    for c in candidates:
        if (c / "config.json").is_file():
            return c
    raise BackboneError(f"{TINY_NAME} not found (looked in {', '.join(map(str, candidates))}); "
                        "regenerate it with: python tools/make_tiny_glm4v.py")


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def resolve_model_dir(name: str) -> tuple[Path, str | None]:
    """(local directory, hub revision or None) for a registry name, directory or hub id."""
    if name == TINY_NAME:
        return tiny_model_dir(), None
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"{path} has no config.json: point --backbone at a transformers "
                                "model directory (the folder holding config.json and *.safetensors)")
        return path, None
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise BackboneError(f"backbone {name!r} is neither a directory nor a hub id (org/name) "
                            f"nor a registered name ({TINY_NAME}, timm:NAME)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py"]
    try:
        local = snapshot_download(name, local_files_only=True, allow_patterns=patterns)
    except Exception:
        local = None
    if local is None and not _is_offline():
        try:
            local = snapshot_download(name, allow_patterns=patterns)
        except Exception as e:  # network down, gated repo, unknown id
            raise BackboneError(f"could not download {name!r} ({type(e).__name__}); download it on a "
                                "connected machine and pass the directory: --backbone /path/to/model") from None
    if local is None:
        raise BackboneError(f"model {name!r} is not available locally (offline and not in the Hugging "
                            "Face cache): pass its directory instead, e.g. --backbone /models/GLM-4.1V-9B-Thinking")
    return Path(local), Path(local).name  # snapshot folder name = commit revision


class Glm4vBackbone(Backbone):
    kind = "glm4v"
    features = ("vision", "answer")

    @classmethod
    def from_name(cls, name: str, options: BackboneOptions) -> Backbone:
        model_dir, revision = resolve_model_dir(name)
        model_type = read_config(model_dir).get("model_type")
        if model_type in REMOTE_CODE_MODEL_TYPES:
            if not options.trust_remote_code:
                raise BackboneError(
                    f"{name} is a ChatGLM-architecture checkpoint (model_type chatglm, such as THUDM/glm-4v-9b) "
                    "whose modelling code ships inside the checkpoint; rainclf does not execute downloaded "
                    "code unless you pass --trust-remote-code (it also needs tiktoken: pip install "
                    "'rainclf[chatglm]'), or use a transformers-native GLM-4.1V/4.5V/4.6V checkpoint")
            from rainclf.backbones.chatglm import ChatGLMBackbone

            return ChatGLMBackbone(name, model_dir, revision, options)
        return cls(name, model_dir, revision, options)

    def __init__(self, name: str, model_dir: Path, revision: str | None, options: BackboneOptions):
        self.name, self.model_dir, self.options = name, Path(model_dir), options
        raw = read_config(self.model_dir)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise BackboneError(f"{self.model_dir}: model_type {model_type!r} is not a GLM-4V-family "
                                f"model (expected one of {', '.join(SUPPORTED_MODEL_TYPES)})")
        # flat (released GLM-4.1V) or nested alike: the sizes the file states
        self.config_dict = config = normalise(raw)
        text, vision = config.get("text_config", {}), config.get("vision_config") or {}
        for key in ("hidden_size", "num_hidden_layers"):
            if not isinstance(text.get(key), int):
                raise BackboneError(f"{self.model_dir / 'config.json'} states no {key} (neither at the top level "
                                    "nor in text_config): restore the checkpoint's config.json")
        self.model_type = model_type
        self.hidden_size = int(text["hidden_size"])
        self.num_layers = int(text["num_hidden_layers"])
        self.vision_dim = int(vision.get("out_hidden_size", self.hidden_size))
        self.factor = int(vision.get("patch_size", 14)) * int(vision.get("spatial_merge_size", 2))
        self.image_size = int(options.image_size or vision.get("image_size", 336))
        if self.image_size % self.factor or self.image_size <= 0:
            raise BackboneError(f"--image-size {self.image_size} must be a positive multiple of "
                                f"{self.factor} (patch size × spatial merge) for {name}")
        if options.image_size:   # the checkpoint's own default is what it was trained on
            check_image_size(self.image_size, self.factor, pixel_bounds(self.model_dir), name)
        self.random_weights = (self.model_dir / RANDOM_MARKER).is_file()
        self.thinking = thinking_decision(self.model_dir, config)
        self.stop_ids = stop_ids(self.model_dir, config)
        # by content (weights, config meaning, tokenizer, template, processor), never by name or revision
        self.fingerprint = checkpoint_fingerprint(self.model_dir, f"glm4v:{model_type}",
                                                  memo_dir=default_cache_dir())
        self._terminator: str | None = None
        self._model = self._processor = None
        self.device = None

    def describe(self) -> dict:
        # the thinking decision is recorded in the model directory (config.json's backbone)
        return {**super().describe(), "thinking": self.thinking["mode"]}

    def dim(self, feature: str) -> int:
        return self.vision_dim if feature == "vision" else self.hidden_size

    def check_feature(self, feature: str, layer: int | None) -> None:
        super().check_feature(feature, layer)
        if feature == "answer" and layer is not None and not -(self.num_layers + 1) <= layer <= self.num_layers:
            raise BackboneError(f"--layer {layer} is out of range for {self.name}: it has "
                                f"{self.num_layers} layers (use {-(self.num_layers + 1)}..{self.num_layers})")

    # ------------------------------------------------------------------ loading
    def weight_files(self) -> list[Path]:
        return sorted(p for p in self.model_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)

    def load(self):
        """(model, processor), loaded once: bf16 on CUDA, fp32 on CPU, frozen, eval mode."""
        if self._model is None or not covers(self):   # covers: the partial load (glm4v_load)
            import torch
            from transformers import AutoProcessor
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # rainclf shows its own progress
            placement = {}
            if self.options.device == "multi":
                # one model split layer by layer over this node's GPUs (too large for one card)
                from rainclf.parallel.ddp import device_map_kwargs

                placement = device_map_kwargs() if torch.cuda.is_available() else {}
                if not placement:
                    raise BackboneError("--device multi splits the model over this node's CUDA GPUs, "
                                        "and torch sees none: use --device cpu or cuda")
                dtype = torch.bfloat16
            else:
                self.device = resolve_device(self.options.device)
                dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
            kwargs = dict(local_files_only=True, trust_remote_code=False)
            from rainclf.backbones.glm4v_config import build_config

            config = build_config(self.model_dir)   # the stated sizes, whatever the layout
            if not self.weight_files():
                raise BackboneError(f"{self.model_dir} has no weights (*.safetensors): download the "
                                    "checkpoint's weight files into it, or point --backbone at the full checkpoint")
            try:
                processor = AutoProcessor.from_pretrained(self.model_dir, **kwargs)
                # only what an embed uses; mismatches: refused below, in one line
                model, info = load_model(self, config, dtype, placement, kwargs)
            except (OSError, ValueError, RuntimeError) as e:
                raise BackboneError(f"cannot load GLM-4V from {self.model_dir}: "
                                    f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
            bad = list(info.get("missing_keys") or []) + [str(k[0]) if isinstance(k, tuple) else str(k)
                                                          for k in info.get("mismatched_keys") or []]
            if bad:
                raise BackboneError(f"{self.weight_files()[0]}: the weights do not match {self.model_dir / 'config.json'} "
                                    f"({len(bad)} tensors missing or of another shape, e.g. {bad[0]}): use the "
                                    "config that came with these weights")
            if placement:
                # inputs start where tokens are embedded; accelerate's hooks move them between GPUs
                self.device = str(model.get_input_embeddings().weight.device)
                model.eval().requires_grad_(False)
            else:
                model.to(self.device).eval().requires_grad_(False)
            self._model, self._processor = model, processor
        return self._model, self._processor

    @property
    def language_model(self):
        return self.load()[0].model.language_model

    # ------------------------------------------------------------------ inputs
    def prepare_images(self, images):
        from PIL import Image

        s = self.image_size
        return [im if im.size == (s, s) else im.resize((s, s), Image.BICUBIC) for im in images]

    def _size_kwargs(self) -> dict:
        # pixel bounds count the temporal patch (a still image is 2 frames): exactly s×s passes
        s = self.image_size
        return {"size": {"shortest_edge": s * s, "longest_edge": 2 * s * s}}

    def chat_text(self, prompt: str = DEFAULT_PROMPT, answer: str | None = None) -> str:
        """The chat prompt for image + question, thinking off; with ``answer``, the full turn."""
        _, processor = self.load()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                             enable_thinking=False)
        # a thinking model whose template has no switch gets an empty think block (glm4v_chat)
        if self.thinking["mode"] == "empty_block" and not text.rstrip().endswith("</think>"):
            text = text + EMPTY_THINK
        if answer is not None:
            text = text + answer + self.terminator
        return text

    @property
    def terminator(self) -> str:
        """The token that ends an answer in this checkpoint's chats (``<|user|>`` for the released
        GLM templates, which write no EOS after an answer; the tiny template's ``<|endoftext|>``)."""
        if self._terminator is None:
            processor = self.load()[1]
            ids = self.stop_ids or [processor.tokenizer.eos_token_id]
            try:
                self._terminator = terminator(processor, ids)
            except ValueError as e:
                raise BackboneError(f"{self.model_dir}: {e}") from None
        return self._terminator

    def vision_inputs(self, images):
        _, processor = self.load()
        out = processor.image_processor(images=self.prepare_images(images), return_tensors="pt",
                                        **self._size_kwargs())
        return {k: v.to(self.device) for k, v in out.items()}

    def chat_inputs(self, images, prompt: str = DEFAULT_PROMPT, answers=None):
        """Processor output for a batch of chats (prompt only, or prompt + answer + terminator)."""
        _, processor = self.load()
        texts = [self.chat_text(prompt, None if answers is None else a)
                 for a in (answers if answers is not None else [None] * len(images))]
        out = processor(text=texts, images=self.prepare_images(images), return_tensors="pt",
                        padding=True, images_kwargs=self._size_kwargs())
        return {k: v.to(self.device) for k, v in out.items()}

    # ------------------------------------------------------------------ features
    def vision_features(self, inputs):
        """Mean of each image's merged vision tokens → (N, out_hidden) tensor."""
        import torch

        model, _ = self.load()
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                             image_grid_thw=inputs["image_grid_thw"])
        return torch.stack([t.float().mean(dim=0) for t in out.pooler_output])

    def answer_hidden(self, inputs, layer: int = -1, model=None):
        """Hidden state at the last prompt position → (N, hidden) tensor. ``model`` lets a
        LoRA-wrapped copy be used; an intermediate ``layer`` stops the forward there."""
        model = model if model is not None else self.load()[0]
        n = self.num_layers
        k = layer % (n + 1)
        if k == n:
            out = model.model(**inputs)
            return out.last_hidden_state[:, -1, :].float()
        layers = _find_decoder_layers(model)
        captured = {}

        def stop(module, args, kwargs):
            captured["h"] = args[0] if args else kwargs["hidden_states"]
            raise _EarlyExit

        handle = layers[k].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            model.model(**inputs)
        except _EarlyExit:
            pass
        finally:
            handle.remove()
        return captured["h"][:, -1, :].float()

    def _embed(self, images, feature, layer, prompt):
        import torch

        with torch.inference_mode(), embedding_parts(self, feature, layer):
            if feature == "vision":
                vec = self.vision_features(self.vision_inputs(images))
            else:
                vec = self.answer_hidden(self.chat_inputs(images, prompt), layer)
        return vec.float().cpu().numpy()


class _EarlyExit(Exception):
    """Raised by a forward pre-hook to stop the language model at a chosen layer."""


def _find_decoder_layers(model):
    """The language model's decoder layers, through a peft wrapper if there is one."""
    for name, module in model.named_modules():
        if name.endswith("language_model.layers"):
            return module
    raise BackboneError("could not find the language model's decoder layers in this model")
