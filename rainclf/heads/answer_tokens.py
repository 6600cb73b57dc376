"""The token ids a generative GLM-4V answer is made of, per label: what training targets and what
constrained decoding scores.

An answer is the label followed by the checkpoint's *terminator* (``Glm4vBackbone.terminator``):
the token its chat template writes after an assistant turn and at which generation stops. For the
released GLM templates that is ``<|user|>`` (they put no EOS after an answer), for glm4v-tiny
``<|endoftext|>``. With the real GLM tokenizer 会下雨 = [98337, 112374] and 不会下雨 = [99271,
112374]: the labels share their last token, not a prefix, so the answer is tokenised in place
(after the prompt), never on its own.
"""

from __future__ import annotations

from rainclf.backbones.base import BackboneError
from rainclf.labels import LABELS


def label_token_ids(backbone, prompt: str, blank_image, stop_ids) -> dict[str, list[int]]:
    """label → the ids that follow the prompt in "prompt + label + terminator" (terminator last).
    Refuses a tokenizer that merges prompt and answer tokens across the boundary (answer-only
    masking would cut a token in half) or an answer that does not end in a stop id."""
    prompt_ids = backbone.chat_inputs([blank_image], prompt)["input_ids"][0].tolist()
    out = {}
    for label in LABELS:
        ids = backbone.chat_inputs([blank_image], prompt, answers=[label])["input_ids"][0].tolist()
        if ids[:len(prompt_ids)] != prompt_ids or ids[-1] not in set(stop_ids):
            raise BackboneError(f"the tokenizer does not keep the prompt's tokens when {label!r} + "
                                f"{backbone.terminator!r} is appended, or the answer does not end in a stop "
                                "token: answer-only masking would be wrong for this model")
        out[label] = ids[len(prompt_ids):]
    return out
