"""Regenerate ``models/glm4v-tiny/``: a ~200k-parameter GLM-4V with RANDOM weights.

It is an ordinary transformers model directory (``Glm4vForConditionalGeneration`` +
``Glm4vProcessor`` with a byte-level BPE tokenizer carrying the GLM special tokens and a GLM-style
chat template), loaded by rainclf through exactly the same ``from_pretrained`` path as a real
GLM-4.1V checkpoint. Its weights are random: any accuracy measured with it reflects colour
statistics, never GLM-4V quality.

Deterministic: the same seed and library versions write byte-identical files
(``python tools/make_tiny_glm4v.py --check`` verifies the committed copy).

    python tools/make_tiny_glm4v.py [--out models/glm4v-tiny] [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

SEED = 20251125
REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "models" / "glm4v-tiny"

SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<think>", "</think>", "<answer>", "</answer>",
]

# A GLM-4.1V-style template: "[gMASK]<sop><|user|>\n<image span>question<|assistant|>\n".
# `enable_thinking=False` (what rainclf always passes) closes an empty think block, as the
# GLM-4.5V/4.6V templates do, so a thinking model answers directly.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{{ '<|' + msg['role'] + '|>\\n' }}"
    "{%- if msg['content'] is string %}{{ msg['content'] }}"
    "{%- else %}{%- for item in msg['content'] %}"
    "{%- if item['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item['type'] == 'text' %}{{ item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- if msg['role'] == 'assistant' %}<|endoftext|>{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{%- endif %}"
)

# Text the BPE merges are learned from: the task's own words, plus the kind of long answer a
# generative model drifts into, in Chinese and English (so language mixing can be produced).
CORPUS = [
    "根据图片判断：会下雨还是不会下雨？", "会下雨", "不会下雨", "会下雨。", "不会下雨。",
    "图片中天气晴朗，没有乌云，所以不会下雨。", "天空中有很多乌云，看起来会下雨。",
    "The sky is clear, it will not rain.", "Dark clouds, it will rain soon.",
    "sunny cloudy rain shine sunrise weather sky cloud",
    "请回答：会下雨或不会下雨。", "这张图片显示的是多云的天空。",
] * 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        padding_side="left", model_max_length=4096,
    )


def build_model(tokenizer):
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Glm4vConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=4096, pad_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|endoftext|>"),
            # rotary dim = head_dim 16 x 0.5 = 8, and mrope_section must sum to 8 / 2 = 4.
            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                 partial_rotary_factor=0.5, mrope_section=[1, 1, 2]),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=224,
        ),
        image_token_id=ids("<|image|>"), video_token_id=ids("<|video|>"),
        image_start_token_id=ids("<|begin_of_image|>"), image_end_token_id=ids("<|end_of_image|>"),
        video_start_token_id=ids("<|begin_of_video|>"), video_end_token_id=ids("<|end_of_video|>"),
        eos_token_id=ids("<|endoftext|>"), pad_token_id=ids("<|endoftext|>"),
    )
    torch.manual_seed(SEED)
    model = Glm4vForConditionalGeneration(config).eval()
    # A random init with std 0.02 makes every image look alike; a wider spread keeps the
    # colour statistics of the input visible in the features (still random, still meaningless).
    with torch.no_grad():
        gen = torch.Generator().manual_seed(SEED)
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[-1] ** 0.5))
    model.generation_config.eos_token_id = ids("<|endoftext|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.generation_config.do_sample = False
    return model


def build_processor(tokenizer):
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    image_processor = Glm4vImageProcessor(size={"shortest_edge": 56 * 56, "longest_edge": 2 * 224 * 224})
    return Glm4vProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          video_processor=Glm4vVideoProcessor(), chat_template=CHAT_TEMPLATE)


def write(out: Path) -> None:
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    processor = build_processor(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    (out / "RAINCLF_RANDOM_WEIGHTS").write_text(
        "This GLM-4V has random weights (seed %d), made by tools/make_tiny_glm4v.py.\n"
        "Its outputs mean nothing about GLM-4V quality.\n" % SEED, encoding="utf-8")


def main(argv=None) -> int:
    from regen import main as regen_main  # tools/ is on sys.path when run as a script

    return regen_main(__doc__, DEFAULT_OUT, write, f"RANDOM weights, seed {SEED}", argv)


if __name__ == "__main__":
    sys.exit(main())
