"""Figures for real-layout GLM-4V checkpoints: what transformers alone builds from a flat config,
what rainclf builds, and what the content fingerprint costs (cold: every file hashed; warm: memoised
by size+mtime, config meaning memoised by its bytes).

    python tools/bench_fingerprint.py [../shared/glm4v-real/GLM-4.1V-9B-Thinking] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tools")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("meta", nargs="?", default=str(REPO.parent / "shared" / "glm4v-real" / "GLM-4.1V-9B-Thinking"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    from transformers import AutoConfig

    from make_glm4v_from_meta import build
    from rainclf.backbones.fingerprint import checkpoint_fingerprint
    from rainclf.backbones.glm4v_config import build_config, normalise, read_config

    with tempfile.TemporaryDirectory() as tmp:
        d = build(a.meta, Path(tmp) / "ckpt")
        plain = AutoConfig.from_pretrained(d).get_text_config()
        ours = build_config(d).get_text_config()
        memo = Path(tmp) / "memo"
        t0 = time.perf_counter()
        cold = checkpoint_fingerprint(d, "glm4v", memo)
        t1 = time.perf_counter()
        warm = checkpoint_fingerprint(d, "glm4v", memo)
        t2 = time.perf_counter()
        size = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
        stated = normalise(read_config(d))["text_config"]
        out = {"meta": a.meta, "flat": "text_config" not in read_config(d),
               "stated_hidden_layers": [stated["hidden_size"], stated["num_hidden_layers"]],
               "transformers_alone_hidden_layers": [plain.hidden_size, plain.num_hidden_layers],
               "rainclf_hidden_layers": [ours.hidden_size, ours.num_hidden_layers],
               "checkpoint_mb": round(size / 2**20, 1), "fingerprint_cold_s": round(t1 - t0, 3),
               "fingerprint_warm_s": round(t2 - t1, 3), "same": cold == warm}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
