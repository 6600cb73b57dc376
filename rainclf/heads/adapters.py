"""LoRA pieces shared by the LoRA head (``heads/lora.py``) and the generative head
(``heads/generative.py``):

    LoraParams        the hyper-parameters (``FitOptions.head_params``), checked in __post_init__
    check_options     the fit-time check of both heads (run before any data is read)
    check_precision   the fp16 refusal
    private_backbone  a backbone object (and so a model) owned by one head only
    attach_lora       peft LoRA on the language model's projections, never the vision tower
    load_adapter      base model + a saved ``adapter/`` folder; ``save_adapter`` writes one

Why a private backbone: ``get_peft_model`` injects LoRA layers into the model *in place*
(GLM4V_NOTES). ``Glm4vBackbone`` caches its model, so wrapping the model of a backbone that
someone else embeds with would silently change their features. Each LoRA/generative head
therefore builds its own backbone object (a fresh ``from_pretrained``) and never hands it out.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from rainclf.backbones import create_backbone, is_glm4v_name
from rainclf.backbones.base import BackboneError, BackboneOptions
from rainclf.model import ModelDirError

ADAPTER_DIR = "adapter"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# Linear layers of a GLM-4 decoder layer that LoRA may target: attention, the dense MLP of glm4v
# (gate_up_proj, down_proj) and of glm4v_moe (gate_proj, up_proj, down_proj, in its dense layers
# and shared experts). The routed experts of glm4v_moe are fused 3-D parameters, not Linear
# layers: LoRA never touches them (``lora_targets_in``).
KNOWN_TARGETS = DEFAULT_TARGETS + ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "bf16", "fp32", "fp16")

FP16_REFUSAL = (
    "--precision fp16 is refused: GLM-4V is trained in bf16 and its activations exceed fp16's range "
    "(max 65504), so fp16 LoRA training overflows (loss turns inf/nan, gradients are skipped) and, as "
    "users of the generative recipe reported, the model starts mixing English into its Chinese answers. "
    "Use --precision bf16 (auto picks bf16 on CUDA), or pass --force-fp16 to train in fp16 anyway.")


@dataclass
class LoraParams:
    """Hyper-parameters of the LoRA and generative heads; defaults follow the GLM-4 recipe."""

    lora_r: int = 8                      # LoRA rank
    lora_alpha: int = 32                 # scaling = alpha / r
    lora_dropout: float = 0.1
    lora_targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))
    steps: int = 200                     # optimizer steps (each = grad_accum micro-batches)
    lr: float = 1e-4                     # AdamW learning rate (LoRA and the score layer)
    train_batch_size: int = 4
    grad_accum: int = 1
    eval_every: int = 20                 # validate every N optimizer steps (and at the last one)
    patience: int = 5                    # stop after N validations without improvement
    precision: str = "auto"              # auto | bf16 | fp32 | fp16 (refused unless force_fp16)
    force_fp16: bool = False
    max_new_tokens: int = 16             # generative: greedy answers during validation
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    score_init: str = "probe"            # LoRA head: "probe" (linear head's solution) | "random"

    def __post_init__(self):
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        self.lora_targets = list(self.lora_targets)
        unknown = [t for t in self.lora_targets if t not in KNOWN_TARGETS]
        if not self.lora_targets or unknown:
            raise ValueError(f"--lora-targets {','.join(self.lora_targets)!r}: use a comma-separated "
                             f"subset of {','.join(KNOWN_TARGETS)}")
        for name in ("lora_r", "steps", "train_batch_size", "grad_accum", "eval_every", "patience",
                     "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"--lora-dropout must lie in [0, 1), got {self.lora_dropout}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.score_init not in ("probe", "random"):
            raise ValueError(f"score_init {self.score_init!r}: use probe or random")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_dict(cls, params: dict | None) -> "LoraParams":
        params = dict(params or {})
        unknown = set(params) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown LoRA head parameters {sorted(unknown)}; "
                             f"known: {sorted(cls.__dataclass_fields__)}")
        return cls(**params)

    def to_dict(self) -> dict:
        return asdict(self)


def check_options(options) -> None:
    """``FitOptions`` check for the LoRA and generative heads (run before any data is read)."""
    if not is_glm4v_name(options.backbone):
        # decided from the name: nothing is loaded for a refusal
        raise ValueError(f"--head {options.head} adapts a GLM-4V language model, and --backbone "
                         f"{options.backbone} is not a GLM-4V: add --backbone glm4v-tiny (or a GLM-4.1V/4.5V/4.6V "
                         f"directory or hub id), or use --head linear with {options.backbone}")
    check_precision(LoraParams.from_dict(options.head_params))
    if options.feature == "vision":
        raise ValueError(f"--head {options.head} reads the answer feature (LoRA adapts the language model): "
                         "drop --feature vision, or use --head linear for the vision feature")
    linear_only = [f"--{n.replace('_', '-')}" for n, v in (("C", options.C),
                   ("threshold_from_val", options.threshold_from_val)) if v]
    if linear_only:
        raise ValueError(f"--head {options.head} does not use {', '.join(linear_only)} (options of "
                         "--head linear): drop them")


# --------------------------------------------------------------------------- precision

def check_precision(params: LoraParams) -> None:
    """Refuse fp16 unless forced. Called first thing in a fit, before data or model work."""
    if params.precision == "fp16" and not params.force_fp16:
        raise ValueError(FP16_REFUSAL)


def amp_dtype(precision: str, device: str):
    """The autocast dtype for training/inference, or None for plain fp32."""
    import torch

    cuda = device.startswith("cuda")
    if precision == "auto":
        return torch.bfloat16 if cuda else None
    if precision == "bf16":
        if cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("--precision bf16: this GPU has no bf16 support (use --precision fp32)")
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    return None


def precision_name(dtype) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def cuda_devices(device: str) -> list:
    """Device indices for ``torch.random.fork_rng`` (which must know the CUDA devices it forks)."""
    if not device.startswith("cuda"):
        return []
    return [int(device.split(":")[1]) if ":" in device else 0]


def autocast(device: str, dtype):
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# --------------------------------------------------------------------------- model

def private_backbone(name: str, options: BackboneOptions, layer: int | None = None):
    """A new backbone object whose model only this head will touch (see module docstring)."""
    backbone = create_backbone(name, options)
    # the adapters are placed by module path (language_model.layers.N.self_attn.*): GLM-4V only
    if getattr(backbone, "kind", None) != "glm4v" or not hasattr(backbone, "chat_inputs"):
        raise BackboneError(f"backbone {name!r} has no language model: LoRA and generative heads need "
                            "a GLM-4V backbone (glm4v-tiny, a GLM-4.1V/4.5V/4.6V directory or hub id)")
    backbone.check_feature("answer", layer)
    return backbone


def _target_regex(targets: Sequence[str], layers: Sequence[int] | None) -> str:
    # Full-match regex over module names: only the language model's decoder layers qualify. A bare
    # name list would also hit the vision tower, whose blocks have their own down_proj/gate_proj.
    idx = r"\d+" if layers is None else "(?:" + "|".join(str(i) for i in layers) + ")"
    names = "|".join(re.escape(t) for t in targets)
    return rf".*language_model\.layers\.{idx}\.(?:self_attn|mlp|mlp\.shared_experts)\.(?:{names})"


def lora_targets_in(model, targets: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Full names of the language model's Linear layers that ``targets`` select. Refuses a target
    this model has no Linear layer for (glm4v has gate_up_proj, glm4v_moe gate_proj/up_proj), so
    LoRA never lands on a fused expert tensor or silently on nothing."""
    import torch

    pattern = re.compile(_target_regex(targets, layers))
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.fullmatch(n)]
    have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and re.fullmatch(_target_regex(KNOWN_TARGETS, layers), n)}
    missing = [t for t in targets if t not in {n.rsplit(".", 1)[-1] for n in names}]
    if missing:
        raise ValueError(f"--lora-targets {','.join(missing)}: this model's language model has no such "
                         f"Linear layer; it has {','.join(t for t in KNOWN_TARGETS if t in have)}")
    return names


def lora_config(params: LoraParams, layers: Sequence[int] | None = None, model=None):
    from peft import LoraConfig

    targets = (lora_targets_in(model, params.lora_targets, layers) if model is not None
               else _target_regex(params.lora_targets, layers))
    return LoraConfig(r=params.lora_r, lora_alpha=params.lora_alpha, lora_dropout=params.lora_dropout,
                      target_modules=targets, bias="none")


@contextlib.contextmanager
def _v5_native(model):
    """peft remaps LoRA targets of MoE models from the transformers-v4 layout to the v5 one, so
    ``gate_proj``/``up_proj``/``down_proj`` of glm4v_moe would be moved onto the fused expert tensors
    (``mlp.experts.gate_up_proj``), where LoRA dropout is unsupported. rainclf's adapters are made
    under v5 and name exact Linear layers (dense MLPs, shared experts): the remap is switched off
    while they are attached or loaded, for MoE models only."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not hasattr(text, "n_routed_experts"):
        yield
        return
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:
        yield
        return
    original = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = original


def _cast_base(model, precision: str, device: str) -> None:
    """The backbone loads bf16 on CUDA, fp32 on CPU; fp32 / forced-fp16 training on CUDA want
    the frozen base weights in that dtype too."""
    if device.startswith("cuda"):
        if precision == "fp32":
            model.float()
        elif precision == "fp16":
            model.half()


def attach_lora(backbone, params: LoraParams, layers: Sequence[int] | None = None):
    """Wrap the backbone's (private) model with fresh LoRA adapters → PeftModel."""
    from peft import get_peft_model

    model, _ = backbone.load()
    _cast_base(model, params.precision, backbone.device)
    with warnings.catch_warnings():
        # transformers 5.x deprecation warning raised inside peft; nothing for a user to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        with _v5_native(model):
            peft_model = get_peft_model(model, lora_config(params, layers, model))
    peft_model.peft_config["default"].base_model_name_or_path = backbone.name  # not a local path
    # new LoRA dropout modules start in train mode even in an eval model: inference must be
    # deterministic until a training loop asks for train mode
    return peft_model.eval()


def load_adapter(backbone, adapter_dir: Path):
    """Base model of a private backbone + the adapter saved in ``adapter_dir`` (eval mode)."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelDirError(f"{adapter_dir} has no adapter_config.json: the model directory is damaged; refit it")
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():   # damaged, truncated, unreadable or non-finite: one line before peft sees it
        from rainclf.weights import check_finite, read_tensors

        tensors, _ = read_tensors(weights, framework="pt")
        check_finite(weights, {k: v.float().numpy() for k, v in tensors.items()})
    model, _ = backbone.load()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            with _v5_native(model):
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:   # peft's own wording
            raise ModelDirError(f"{adapter_dir}: the adapter cannot be loaded ({' '.join(str(e).split())[:160]}) "
                                "— the model directory is damaged: restore it or refit") from None
    return peft_model.eval()


def save_adapter(peft_model, path: Path) -> None:
    """peft ``save_pretrained`` (adapter_config.json + adapter_model.safetensors). Embedding layers
    are never targeted, and "auto" would look the base model up on the Hub: switch it off."""
    peft_model.save_pretrained(str(path), safe_serialization=True, save_embedding_layers=False)
