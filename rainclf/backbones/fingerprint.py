"""Content fingerprints of checkpoint directories: what the files *say*, not what they are called.

    weights         sha256 of each weight file's bytes. A Hugging Face hub snapshot links every
                    LFS file to ``blobs/<sha256>``, so the blob name is the hash and nothing is
                    read; a local file is hashed once and memoised by (path, size, mtime)
    config          canonicalised by meaning (``canonical_config``): flat or nested layout,
                    key order, defaults spelled out or not, transformers_version, dtype all give
                    the same value
    text side       tokenizer, chat template, special tokens, processor and generation config
                    (``TEXT_FILES``): a template edit changes how the prompt is rendered, so it
                    changes the fingerprint, and with it the embedding cache key

File *names* of weights and the hub revision are not part of it: the same files under a new
revision, or copied from a hub snapshot into a local directory, keep their fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from rainclf.backbones.base import WEIGHT_SUFFIXES

TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
              "generation_config.json")
# keys that do not change what a config means
VOLATILE_KEYS = ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype")
_SHA256_NAME = re.compile(r"[0-9a-f]{64}")


def _memo_write(memo: Path, value: str) -> None:
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, memo)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def file_sha256(path: Path, memo_dir: Path | None) -> str:
    """sha256 of a (possibly multi-GB) file: the hub blob name when ``path`` links to one, else
    hashed and memoised by (path, size, mtime)."""
    path = Path(path)
    real = path.resolve()
    if path.is_symlink() and _SHA256_NAME.fullmatch(real.name) and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    memo_key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    memo = memo_dir / "file-sha256" / memo_key if memo_dir else None
    if memo is not None and memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    if st.st_size > 1 << 30:
        print(f"rainclf: hashing {path.name} ({st.st_size / 1e9:.1f} GB) once for the cache key",
              file=sys.stderr)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    value = h.hexdigest()
    if memo is not None:
        _memo_write(memo, value)
    return value


def _strip_volatile(d):
    if isinstance(d, dict):
        return {k: _strip_volatile(v) for k, v in d.items() if k not in VOLATILE_KEYS}
    return d


def canonical_config(model_dir: Path, memo_dir: Path | None = None, semantic: bool = True) -> str:
    """sha256 of the config's meaning. ``semantic``: the transformers config built from the
    normalised layout, as a diff against its defaults (memoised by the file's bytes and the
    transformers version, so a cached run imports no transformers after the first); otherwise
    the JSON with sorted keys and volatile keys dropped."""
    from rainclf.backbones.glm4v_config import CONFIG_FILE, build_config, normalise, read_config

    path = Path(model_dir) / CONFIG_FILE
    raw = read_config(model_dir)
    if not semantic:
        return hashlib.sha256(json.dumps(_strip_volatile(raw), sort_keys=True).encode()).hexdigest()
    try:
        from importlib.metadata import version
        tv = version("transformers")
    except Exception:
        tv = "unknown"
    key = hashlib.sha256(path.read_bytes() + f"|{tv}|v1".encode()).hexdigest()
    memo = memo_dir / "config-canonical" / key if memo_dir else None
    if memo is not None and memo.is_file():
        value = memo.read_text().strip()
        if len(value) == 64:
            return value
    try:
        meaning = build_config(model_dir, raw).to_diff_dict()
    except ImportError:   # no transformers: the normalised JSON still ignores layout and key order
        meaning = normalise(raw)
    value = hashlib.sha256(json.dumps(_strip_volatile(meaning), sort_keys=True, default=str).encode()).hexdigest()
    if memo is not None:
        _memo_write(memo, value)
    return value


def _text_file_hash(path: Path, memo_dir: Path | None) -> str:
    if path.suffix == ".json" and path.stat().st_size < 1 << 20:
        try:   # small JSON by meaning (key order, indentation); tokenizer.json by bytes, memoised
            return hashlib.sha256(json.dumps(json.loads(path.read_text(encoding="utf-8")),
                                             sort_keys=True).encode()).hexdigest()
        except (ValueError, UnicodeDecodeError):
            pass
    return file_sha256(path, memo_dir)


def checkpoint_fingerprint(model_dir: Path, identity: str, memo_dir: Path | None = None,
                           semantic_config: bool = True) -> str:
    """identity + config meaning + weight contents + tokenizer/template/processor/generation files."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update(f"{identity}|config:{canonical_config(model_dir, memo_dir, semantic_config)}".encode())
    weights = sorted(file_sha256(p, memo_dir) for p in model_dir.iterdir()
                     if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    for w in weights:          # by content: names (model-00001-of-00004…) do not matter
        h.update(f"|weight:{w}".encode())
    for name in TEXT_FILES:
        p = model_dir / name
        if p.is_file():
            h.update(f"|{name}:{_text_file_hash(p, memo_dir)}".encode())
    return h.hexdigest()
