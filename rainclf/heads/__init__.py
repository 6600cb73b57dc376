"""Heads map embeddings (or images, for LoRA and generative heads) to p(会下雨).

Every head answers the same questions: ``fit``, ``predict_proba`` (N, 2) with columns
``LABELS`` = (不会下雨, 会下雨), ``predict`` (labels), ``save(dir)`` / ``load(dir)``.
"""

HEAD_TYPES = ("linear", "lora", "generative")
