"""``ServeOptions``: every setting of ``rainclf serve`` in one dataclass, with its help text and
checks (``click_options`` turns them into the command's options), and a JSON round trip
(``--workers N`` hands the options to spawned worker processes through the environment: uvicorn
starts each worker from an import string, not from an object).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

ENV_OPTIONS = "RAINCLF_SERVE_OPTIONS"    # JSON of ServeOptions, for worker processes
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000     # a 50 MP phone photo passes; a decompression bomb does not


def _opt(default, help_text: str, flag: str | None = None):
    return field(default=default, metadata={"help": help_text, "flag": flag})


@dataclass
class ServeOptions:
    model: str = _opt("", "MODEL_DIR (its onnx/ export is served) or an export folder itself.")
    host: str = _opt("127.0.0.1", "Address to listen on (0.0.0.0: every interface, e.g. in a container).")
    port: int = _opt(8000, "TCP port (0: any free port; the chosen one is logged).")
    workers: int = _opt(1, "Server processes, each with its own copy of the model and its own batcher.")
    max_batch: int = _opt(32, "Images per onnxruntime call at most (concurrent requests are gathered).")
    max_wait_ms: float = _opt(5.0, "How long the first image of a batch waits for others to join it.")
    max_queue: int = _opt(128, "Images admitted (decoding, queued or running) at most; beyond: 503 + Retry-After.")
    max_body_mb: float = _opt(20.0, "Largest request body in MiB; larger: 413.")
    max_image_pixels: int = _opt(DEFAULT_MAX_IMAGE_PIXELS,
                                 "Largest decoded image (width × height); larger: an error entry for that part.")
    decode_threads: int = _opt(0, "Threads decoding and preprocessing uploads (0: the CPU count).")
    graceful_timeout_s: float = _opt(30.0, "On SIGTERM, how long requests in flight may still take.",
                                     flag="--graceful-timeout")
    access_log: bool = _opt(False, "Log one line per request (uvicorn's access log).")

    def __post_init__(self):
        checks = [("workers", self.workers >= 1, "at least 1"), ("max_batch", self.max_batch >= 1, "at least 1"),
                  ("max_wait_ms", self.max_wait_ms >= 0, "0 or more"), ("max_body_mb", self.max_body_mb > 0, "above 0"),
                  ("max_image_pixels", self.max_image_pixels >= 1, "at least 1"),
                  ("decode_threads", self.decode_threads >= 0, "0 or more"),
                  ("graceful_timeout_s", self.graceful_timeout_s >= 0, "0 or more"),
                  ("port", 0 <= self.port <= 65535, "0..65535")]
        for name, ok, want in checks:
            if not ok:
                flag = fields_by_name[name].metadata["flag"] or "--" + name.replace("_", "-")
                raise ValueError(f"{flag} {getattr(self, name)}: must be {want}")
        if self.max_queue < self.max_batch:
            raise ValueError(f"--max-queue {self.max_queue} is below --max-batch {self.max_batch}: "
                             "a full batch could never be admitted")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def threads(self) -> int:
        return self.decode_threads or os.cpu_count() or 1

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeOptions:
        data = json.loads(text)
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    @classmethod
    def from_env(cls) -> ServeOptions:
        text = os.environ.get(ENV_OPTIONS)
        if not text:
            raise RuntimeError(f"${ENV_OPTIONS} is not set: start workers with rainclf serve")
        return cls.from_json(text)


fields_by_name = {f.name: f for f in fields(ServeOptions)}


def click_options(command):
    """Decorate a click command with one option per field but ``model`` (defaults and help from
    here; --max-batch for max_batch, ...); the command receives them as keywords of the same names."""
    import click

    for f in reversed([f for f in fields(ServeOptions) if f.name != "model"]):
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        if f.type == "bool":
            command = click.option(flag, f.name, is_flag=True, help=f.metadata["help"])(command)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            command = click.option(flag, f.name, type=kind, default=f.default, show_default=True,
                                   help=f.metadata["help"])(command)
    return command
