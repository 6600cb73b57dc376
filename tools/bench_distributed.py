"""Benchmark: embedding extraction with 1 vs 2 processes (torchrun) on this machine's CPU.

    python tools/bench_distributed.py [--n 256] [--batch-size 8] [--repeat 3] [--backbone glm4v-tiny]

Two figures, each for 1 and 2 processes:
  extraction  img/s of decode + forward only: every rank loads the model and warms up first, then
              embeds its shard; img/s = N / slowest rank (what a long job converges to)
  end to end  wall clock of ``rainclf embed DIR -o FILE`` as a user runs it (Python start-up,
              imports, model load, merge included), plus a check that both files hold the same
              embeddings

Images: the first N photos of ../shared/weather/images when that folder exists, else synthetic
skies. On a 2-core machine expect little gain: the 2 processes share the same 2 cores (torchrun
gives each one thread, one process alone uses both). The figure that matters — one process per
GPU on an 8-GPU node — needs GPUs; this only shows that the sharded path costs nothing extra.
Prints numbers, asserts nothing. glm4v-tiny has RANDOM weights: a pipeline figure, not GLM-4V's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_json import add_json_argument, write_json  # noqa: E402
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def worker(folder: str, out_dir: str, backbone_name: str, batch_size: int, repeat: int) -> None:
    """One rank: load + warm up, then time the extraction of this rank's shard (best of
    ``repeat``: the machine may be shared, the minimum is the least disturbed run)."""
    import torch

    from rainclf.backbones import create_backbone
    from rainclf.backbones.base import BackboneOptions
    from rainclf.data.images import find_images
    from rainclf.embed.extract import embed_paths
    from rainclf.parallel.ddp import dist_context, rank_device
    from rainclf.parallel.shards import shard_range

    ctx = dist_context()
    paths, _ = find_images(folder)
    backbone = create_backbone(backbone_name, BackboneOptions(device=rank_device("auto", ctx)))
    embed_paths(backbone, paths[:batch_size], batch_size=batch_size, progress=False)   # load + warm up
    mine = [paths[i] for i in shard_range(len(paths), ctx.rank, ctx.world_size, batch_size)]
    seconds = min(embed_paths(backbone, mine, batch_size=batch_size, progress=False).seconds
                  for _ in range(repeat))
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps(
        {"rank": ctx.rank, "n": len(mine), "seconds": seconds, "threads": torch.get_num_threads()}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int | None) -> list[str]:
    """``python`` (one plain process) or ``python -m torch.distributed.run --nproc-per-node N``."""
    if nproc is None:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]


def _env(threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("OMP_NUM_THREADS", None)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def prepare_images(folder: Path, n: int) -> str:
    folder.mkdir()
    photos = sorted((REPO.parent / "shared" / "weather" / "images").glob("*.jpg"))[:n]
    if len(photos) == n:
        for p in photos:
            shutil.copy(p, folder / p.name)
        return f"{n} photos from ../shared/weather"
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import solid_images

    for i, im in enumerate(solid_images(n, size=(640, 480))):
        im.save(folder / f"sky_{i:05d}.jpg", quality=90)
    return f"{n} synthetic 640×480 images (../shared/weather not found)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backbone", default="glm4v-tiny")
    ap.add_argument("--repeat", type=int, default=3, help="extraction: best of this many passes per rank")
    ap.add_argument("--worker", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    add_json_argument(ap)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.backbone, args.batch_size, args.repeat)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = prepare_images(tmp / "images", args.n)
        print(f"rainclf distributed benchmark: {source}, backbone {args.backbone}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU cores, no GPU used")
        me = [str(Path(__file__).resolve()), "--batch-size", str(args.batch_size), "--backbone", args.backbone,
              "--repeat", str(args.repeat)]

        print(f"\nextraction only (model loaded and warmed up in every rank first; best of {args.repeat}):")
        # 1 process × 1 thread is the reference: torchrun gives each rank one thread
        cases = [("1 process, 1 thread", None, 1), ("2 processes × 1 thread (torchrun)", 2, 1),
                 ("1 process, default threads", None, None)]
        base = None
        results: dict = {"extraction": [], "end_to_end": []}
        for label, nproc, threads in cases:
            out = tmp / f"x-{nproc}-{threads}"
            out.mkdir()
            subprocess.run(_launch(nproc) + me + ["--worker", str(tmp / "images"), str(out)], cwd=REPO,
                           env=_env(threads), check=True, capture_output=True)
            ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
            slowest = max(r["seconds"] for r in ranks)
            ips = args.n / slowest
            base = base or ips
            per = ", ".join(f"rank {r['rank']}: {r['n']} img in {r['seconds']:.2f} s ({r['threads']} thr)"
                            for r in ranks)
            print(f"  {label:36s} {ips:7.1f} img/s  ({ips / base:.2f}×)   [{per}]")
            results["extraction"].append({"case": label, "processes": nproc or 1, "threads": threads,
                                          "images_per_s": ips, "ranks": ranks})

        print("\nend to end (`rainclf embed DIR -o FILE --no-cache -q`, start-up and model load included):")
        files = []
        for label, nproc, threads in cases:
            files.append(tmp / f"e2e-{len(files)}.safetensors")
            cmd = _launch(nproc) + ["-m", "rainclf.cli", "embed", str(tmp / "images"), "-o", str(files[-1]),
                                    "--no-cache", "-q", "--batch-size", str(args.batch_size),
                                    "--backbone", args.backbone]
            t = time.perf_counter()
            subprocess.run(cmd, cwd=REPO, env=_env(threads), check=True, capture_output=True)
            s = time.perf_counter() - t
            print(f"  {label:36s} {s:7.2f} s wall, {args.n / s:6.1f} img/s")
            results["end_to_end"].append({"case": label, "processes": nproc or 1, "threads": threads,
                                          "wall_s": s, "images_per_s": args.n / s})
        import numpy as np
        from safetensors.numpy import load_file

        ref, *others = (load_file(str(f))["embeddings"] for f in files)
        diff = max(float(np.abs(ref - o).max()) for o in others)
        print(f"  same embeddings in all three files: shape {ref.shape}, max |diff| {diff:.2e}")
        results["max_abs_diff_between_runs"] = diff
        write_json(args.json, "bench_distributed.py", {"n": args.n, "batch_size": args.batch_size,
                                                       "backbone": args.backbone, "repeats": args.repeat,
                                                       "image_source": source}, results)
        print(f"\nnote: {os.cpu_count()} CPU cores shared by both processes — little gain is expected here, "
              "and end to end start-up and model loading dominate; on GPUs each rank gets its own card "
              "(cuda:LOCAL_RANK) and extraction scales with their number. A loaded machine (other jobs) makes "
              "multi-threaded torch much slower than 1 thread: compare the last row with the first.")


if __name__ == "__main__":
    main()
