"""How a GLM-4V checkpoint's chat looks, read from its own files: the chat template, whether thinking
must be switched off and how, and the token that ends an assistant answer.

    template_source(dir)     the template text (chat_template.jinja, chat_template.json or
                             tokenizer_config.json's ``chat_template``)
    thinking_decision(...)   "template"     the template knows ``enable_thinking``: pass False, it
                                            closes the think block itself (GLM-4.5V/4.6V)
                             "empty_block"  a thinking model whose template has no switch
                                            (GLM-4.1V-Thinking: ``</answer>`` is a stop token):
                                            append ``<think></think>`` after the prompt
                             "none"         not a thinking model (GLM-4.1V-Base shares the
                                            tokenizer, so ``</think>`` in the vocabulary decides
                                            nothing)
    terminator(processor, eos_ids)
                             the first stop token the template writes after an assistant answer
                             when another turn follows (with any whitespace before it); else the
                             tokenizer's EOS. Real GLM templates put no EOS after an answer: the next turn's
                             ``<|user|>`` (a stop id) is what the model emits after it.
"""

from __future__ import annotations

import json
from pathlib import Path

THINK_MODES = ("template", "empty_block", "none")
EMPTY_THINK = "<think></think>"
_PROBE = "会下雨"


def template_source(model_dir: Path) -> str:
    d = Path(model_dir)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        try:
            t = json.loads((d / name).read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(t, list):   # [{"name": "default", "template": …}, …]
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if isinstance(t, str):
            return t
    return ""


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_ids(model_dir: Path, norm_config: dict) -> list[int]:
    """Every id generation stops at: config (both levels) and generation_config.json."""
    ids = _ids(norm_config.get("eos_token_id")) + _ids((norm_config.get("text_config") or {}).get("eos_token_id"))
    try:
        ids += _ids(json.loads((Path(model_dir) / "generation_config.json").read_text(encoding="utf-8"))
                    .get("eos_token_id"))
    except (OSError, ValueError, AttributeError):
        pass
    return sorted(set(ids))


def _token_id(model_dir: Path, token: str) -> int | None:
    try:
        added = json.loads((Path(model_dir) / "tokenizer_config.json").read_text(encoding="utf-8")) \
            .get("added_tokens_decoder") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return next((int(k) for k, v in added.items() if isinstance(v, dict) and v.get("content") == token), None)


def thinking_decision(model_dir: Path, norm_config: dict) -> dict:
    """{"mode": one of THINK_MODES, "why": the evidence}, from the template and the config."""
    source = template_source(model_dir)
    if "enable_thinking" in source:
        return {"mode": "template", "why": "the chat template reads enable_thinking (passed False)"}
    answer_end = _token_id(model_dir, "</answer>")
    if answer_end is not None and answer_end in stop_ids(model_dir, norm_config):
        return {"mode": "empty_block", "why": f"</answer> (id {answer_end}) is a stop token and the "
                                              "template has no enable_thinking: <think></think> appended"}
    return {"mode": "none", "why": "the template has no enable_thinking and </answer> is not a stop token: "
                                   "not a thinking model"}


def terminator(processor, eos_ids) -> str:
    """The token string that ends an assistant answer in this checkpoint's chats."""
    tok = processor.tokenizer
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE},
                {"role": "user", "content": "Q"}]
    try:
        text = processor.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that cannot render plain-text turns: fall back to EOS
        text = ""
    at = text.find(_PROBE)
    if at >= 0:
        after = tok(text[at + len(_PROBE):], add_special_tokens=False)["input_ids"]
        stop = next((k for k, t in enumerate(after) if t in set(eos_ids)), None)
        # the stop token, with any whitespace the template writes before it ("\n<|user|>")
        if stop is not None and not tok.decode(after[:stop]).strip():
            return tok.decode(after[:stop + 1], skip_special_tokens=False)
    if tok.eos_token is None:
        raise ValueError("the tokenizer has no EOS token and the chat template writes no stop token "
                         "after an answer")
    return tok.eos_token
