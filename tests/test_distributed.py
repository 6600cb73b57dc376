"""rainclf.parallel: sharded embed/predict under torchrun and DDP training pieces, on the CPU
with the gloo backend and 2 processes.

The torchrun tests start real launchers (``python -m torch.distributed.run --nproc-per-node 2``)
in a subprocess; each costs ~15-30 s here, mostly torch imports. The file is also the DDP worker:
``torchrun ... tests/test_distributed.py ddp OUT_DIR`` trains on 2 ranks and, on rank 0, the same
model in one process with the doubled batch, and writes both loss curves to OUT_DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import write_class_folders

REPO = Path(__file__).resolve().parents[1]
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], cache_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAINCLF_CACHE_DIR=str(cache_dir), RAINCLF_SHARD_TIMEOUT="180")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port())] + args
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    return proc


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A labelled dataset (13 images: not a multiple of the batch) + an unlabelled folder with a
    broken file, and a linear model fitted on the dataset."""
    from rainclf.fit import FitOptions, fit

    root = tmp_path_factory.mktemp("dist")
    train = write_class_folders(root / "train", n_per_class=7)
    (train / "会下雨" / "006.jpg").unlink()
    photos = root / "photos"
    photos.mkdir()
    for i, p in enumerate(sorted(train.rglob("*.jpg"))):
        (photos / f"p{i:02d}.jpg").write_bytes(p.read_bytes())
    (photos / "p05.jpg").write_bytes(b"not a jpeg")   # an error row in the middle of shard 0
    model = root / "model"
    fit(train, model, FitOptions(backbone="glm4v-tiny", val_split=0.0, C=1.0, cache_dir=None, progress=False, device="cpu"))
    return {"root": root, "train": train, "photos": photos, "model": model}


def ctx(rank, world=2):
    from rainclf.parallel.ddp import DistContext

    return DistContext(rank=rank, world_size=world, local_rank=rank)


def run_opts(**kw):
    from rainclf.config import RunOptions

    return RunOptions(device="cpu", progress=False, batch_size=4, **kw)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------- pure helpers

def test_dist_context_reads_the_launcher_environment():
    from rainclf.parallel.ddp import dist_context

    assert dist_context({}) == ctx(0, 1)
    assert not dist_context({}).is_distributed
    c = dist_context({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (c.rank, c.world_size, c.local_rank, c.is_main, c.is_distributed) == (3, 8, 1, False, True)
    for bad in ({"RANK": "2", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(ValueError):
            dist_context(bad)


@pytest.mark.parametrize("n,world,batch", [(13, 2, 4), (3, 4, 1), (0, 2, 8), (100, 3, 8), (7, 2, 1)])
def test_shards_are_disjoint_contiguous_and_batch_aligned(n, world, batch):
    from rainclf.parallel.shards import shard_range

    blocks = [shard_range(n, r, world, batch) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))       # rank order = input order
    for b in blocks[:-1]:
        assert b.stop % batch == 0 or b.stop == n                  # same batches as one process


def test_rank_device_on_cpu():
    from rainclf.parallel.ddp import rank_device

    assert rank_device("auto", ctx(1)) == "cpu"
    assert rank_device("cpu", ctx(1)) == "cpu"
    assert rank_device("auto", ctx(0, 1)) == "auto"                 # one process: unchanged


def test_device_map_kwargs():
    from rainclf.parallel.ddp import device_map_kwargs

    assert device_map_kwargs(gpu_free_bytes=[], ctx=ctx(0, 1)) == {}
    kw = device_map_kwargs(0.5, gpu_free_bytes=[80 * 2**30, 40 * 2**30], ctx=ctx(0, 1))
    assert kw == {"device_map": "auto", "max_memory": {0: "40960MiB", 1: "20480MiB"}}
    assert device_map_kwargs(gpu_free_bytes=[1, 1], cpu_offload_bytes=2**30, ctx=ctx(0, 1))["max_memory"]["cpu"] == "1024MiB"
    assert device_map_kwargs(gpu_free_bytes=[1, 1], ctx=ctx(1, 2)) == {"device_map": {"": 1}}


def test_training_helpers_are_no_ops_in_one_process():
    import torch

    from rainclf.parallel.ddp import (
        all_reduce_gradients,
        broadcast_object,
        mean_across_ranks,
        shard_batch,
    )

    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_gradients([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    assert mean_across_ranks(1.5) == 1.5
    assert shard_batch([5, 6, 7, 8], ctx(1)) == [7, 8]
    assert broadcast_object({"a": 1}) == {"a": 1}


# --------------------------------------------------------------------------- shards, in process

def test_embed_shards_merge_to_the_single_process_file(data, tmp_path):
    """Rank 1 then rank 0 in this process (a file barrier needs no process group); a damaged
    shard left by an earlier run is recomputed, not trusted."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from rainclf.embed.to_file import embed_to_file
    from rainclf.parallel.shards import SHARDS_DIR, embed_sharded

    single, merged = tmp_path / "single.safetensors", tmp_path / "merged.safetensors"
    embed_to_file(data["train"], single, "glm4v-tiny", batch_size=4, progress=False)
    kw = dict(backbone_name="glm4v-tiny", batch_size=4, progress=False, timeout=0)
    assert embed_sharded(data["train"], merged, ctx=ctx(1), **kw) is None
    (shard1,) = (tmp_path / SHARDS_DIR).rglob("shard-00001-of-00002.safetensors")
    shard1.write_bytes(b"half a file")
    with pytest.raises(TimeoutError, match="rerun the same command"):
        embed_sharded(data["train"], merged, ctx=ctx(0), **kw)         # shard 1 is not usable
    assert embed_sharded(data["train"], merged, ctx=ctx(1), **kw) is None
    result = embed_sharded(data["train"], merged, ctx=ctx(0), **kw)
    assert result["n"] == 13 and result["shards_reused"]             # rank 0's shard from the failed try
    a, b = load_file(single), load_file(merged)
    np.testing.assert_array_equal(a["embeddings"], b["embeddings"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    with safe_open(str(single), "np") as fa, safe_open(str(merged), "np") as fb:
        assert fa.metadata() == fb.metadata()                          # paths, skipped, namespace
    assert not (tmp_path / SHARDS_DIR).exists()                        # cleaned after the merge


def test_predict_rerun_reuses_finished_shards(data, tmp_path):
    """Rank 1 finished, rank 0 died: the rerun computes shard 0 only. Proof: a marker put into
    shard 1's rows shows up in the merged output."""
    from rainclf.parallel.shards import SHARDS_DIR, predict_sharded
    from rainclf.predict import predict, predict_local

    out = tmp_path / "rows.jsonl"
    single = predict(data["photos"], data["model"], run_opts()).rows
    assert predict_sharded(data["photos"], data["model"], run_opts(), output=out, ctx=ctx(1), run_local=predict_local) is None
    (shard1,) = (tmp_path / SHARDS_DIR).rglob("shard-00001-of-00002.json")
    shard = json.loads(shard1.read_text())
    shard["rows"][0]["extra"] = {"marker": "from the first run"}
    shard1.write_text(json.dumps(shard))
    stale, foreign = (tmp_path / SHARDS_DIR / f"{name}-0123456789abcdef" for name in ("rows.jsonl", "rows.jsonl-2.csv"))
    stale.mkdir(), foreign.mkdir()                  # an earlier run's leftovers / another output's shards
    run = predict_sharded(data["photos"], data["model"], run_opts(), output=out, ctx=ctx(0), timeout=0,
                          run_local=predict_local)
    rows = rows_of(out)
    assert [r["path"] for r in rows] == [r.path for r in single]
    assert [r["label"] for r in rows] == [r.label for r in single]
    assert [r["p_rain"] for r in rows] == [r.p_rain for r in single]
    assert rows[8]["marker"] == "from the first run"          # 13 inputs, batch 4: shard 1 = [8, 13)
    assert "marker" not in rows[7] and run.summary.predicted == 12 and run.summary.errors == 1
    assert sorted(p.name for p in (tmp_path / SHARDS_DIR).iterdir()) == [foreign.name]


def test_predict_sharded_needs_an_output_file(data):
    from rainclf.parallel.shards import predict_sharded
    from rainclf.predict import predict_local

    with pytest.raises(ValueError, match="pass -o"):
        predict_sharded(data["photos"], data["model"], run_opts(), ctx=ctx(0), run_local=predict_local)


# --------------------------------------------------------------------------- torchrun, 2 processes

def test_torchrun_embed_equals_one_process(data, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from rainclf.embed.to_file import embed_to_file

    single, merged = tmp_path / "single.safetensors", tmp_path / "merged.safetensors"
    embed_to_file(data["train"], single, "glm4v-tiny", batch_size=4, progress=False)
    proc = torchrun(["-m", "rainclf.cli", "embed", "--backbone", "glm4v-tiny", str(data["train"]), "-o", str(merged), "--batch-size", "4",
                     "--device", "cpu"], tmp_path / "cache")
    assert proc.stdout.count("wrote") == 1 and "13 × 64" in proc.stdout   # rank 0 reports, rank 1 is silent
    a, b = load_file(single), load_file(merged)
    np.testing.assert_allclose(b["embeddings"], a["embeddings"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(a["labels"], b["labels"])
    with safe_open(str(single), "np") as fa, safe_open(str(merged), "np") as fb:
        assert json.loads(fa.metadata()["paths"]) == json.loads(fb.metadata()["paths"])


def test_torchrun_predict_equals_one_process_and_resumes(data, tmp_path):
    """Shard 0 pre-made by a 'rank 0 that died waiting'; torchrun computes only shard 1."""
    from rainclf.parallel.shards import predict_sharded
    from rainclf.predict import predict, predict_local

    out = tmp_path / "rows.csv"
    single = tmp_path / "single.csv"
    predict(str(data["photos"]), data["model"], run_opts(), output=single)
    with pytest.raises(TimeoutError):
        predict_sharded(str(data["photos"]), str(data["model"]), run_opts(), output=out, ctx=ctx(0),
                        timeout=0, run_local=predict_local)
    proc = torchrun(["-m", "rainclf.cli", "predict", str(data["photos"]), "--model", str(data["model"]),
                     "-o", str(out), "--batch-size", "4", "--no-cache"], tmp_path / "cache")
    assert "[rank 0/2] shard 0 reused" in proc.stderr
    assert "[rank 1/2] shard 1 computed" in proc.stderr
    assert "shard 0 computed" not in proc.stderr
    assert proc.stderr.count("12 predicted") == 1
    assert out.read_text(encoding="utf-8") == single.read_text(encoding="utf-8")
    assert not (tmp_path / ".shards").exists()


@pytest.fixture(scope="module")
def ddp_curves(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(Path(__file__)), "ddp", str(out)], out / "cache", timeout=300)
    return json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


def test_ddp_replicas_agree_and_rank0_writes(ddp_curves):
    r0, r1 = ddp_curves
    assert r0["lora"]["weights"] == r1["lora"]["weights"]               # hand-made all-reduce kept the replicas in step
    assert r1["saw_main_file"]                                          # rank 0 wrote, barrier, rank 1 saw it
    assert r0["agreed"] == r1["agreed"] == {"from": 0}                  # broadcast_object
    assert r1["lora"]["ddp"] == r0["lora"]["ddp"]                       # every rank logs the global loss


def test_ddp_lora_head_matches_doubled_batch(ddp_curves):
    r0, _ = ddp_curves
    assert r0["lora"] is not None, f"LoRA head failed in the DDP worker: {r0['lora_error']}"
    lora = r0["lora"]
    assert len(lora["ddp"]) == len(lora["single"]) == 4
    np.testing.assert_allclose(lora["ddp"], lora["single"], rtol=1e-4)
    # it trained: steps 0 and 2 see the same minibatch (examples 0-3), so after two updates its loss fell
    assert lora["ddp"][2] < lora["ddp"][0]


# --------------------------------------------------------------------------- rainclf fit under torchrun

FIT_ARGS = ["--head", "lora", "--feature", "answer", "--steps", "4", "--eval-every", "2", "--no-cache", "-q",
            "--device", "cpu", "--lora-dropout", "0", "--lr", "1e-2"]   # dropout 0: same masks-free curve


def test_torchrun_fit_lora_matches_one_process_with_doubled_batch(tmp_path):
    """``torchrun --nproc-per-node 2 rainclf fit --head lora --train-batch-size 2`` (gloo, CPU) vs
    one process with ``--train-batch-size 4``: one model directory, written once by rank 0, same
    loss history, same predictions."""
    import torch
    from click.testing import CliRunner

    from rainclf.cli import main
    from rainclf.config import RunOptions
    from rainclf.io import TMP_PREFIX
    from rainclf.model import load_classifier

    data = write_class_folders(tmp_path / "data", n_per_class=5)      # 8 train / 2 validation
    ddp_dir, single_dir = tmp_path / "out" / "ddp", tmp_path / "single"
    proc = torchrun(["-m", "rainclf.cli", "fit", "--backbone", "glm4v-tiny", str(data), "-o", str(ddp_dir), "--train-batch-size", "2"]
                    + FIT_ARGS, tmp_path / "cache")
    # no --overwrite: a second writer would have failed with "already exists" (rc != 0)
    assert proc.stdout.count("saved") == 1 and str(ddp_dir) in proc.stdout      # rank 0 reports, rank 1 is silent
    assert sorted(p.name for p in ddp_dir.parent.iterdir()) == ["ddp"]          # no temporary leftovers
    assert not any(p.name.startswith(TMP_PREFIX) for p in ddp_dir.rglob("*"))

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, ["fit", "--backbone", "glm4v-tiny", str(data), "-o", str(single_dir), "--train-batch-size", "4"] + FIT_ARGS)
        assert res.exit_code == 0, res.output
        ddp_m = json.loads((ddp_dir / "metrics.json").read_text(encoding="utf-8"))
        one_m = json.loads((single_dir / "metrics.json").read_text(encoding="utf-8"))
        assert ddp_m["world_size"] == 2 and "world_size" not in one_m
        assert [h["step"] for h in ddp_m["history"]] == [h["step"] for h in one_m["history"]] == [0, 2, 4]
        for key in ("train_loss", "val_loss"):
            a = [h[key] for h in ddp_m["history"] if key in h]
            b = [h[key] for h in one_m["history"] if key in h]
            assert len(a) == len(b) >= 2
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)       # history is rounded to 6 decimals
        train_losses = [h["train_loss"] for h in ddp_m["history"] if "train_loss" in h]
        assert train_losses[-1] < train_losses[0]                          # it trained
        assert ddp_m["best_step"] == one_m["best_step"]
        paths = sorted(str(p) for p in data.rglob("*.jpg"))
        opts = RunOptions(device="cpu", progress=False, batch_size=4)
        p_ddp = [r.p_rain for r in load_classifier(ddp_dir, opts).predict_paths(paths)]
        p_one = [r.p_rain for r in load_classifier(single_dir, opts).predict_paths(paths)]
        np.testing.assert_allclose(p_ddp, p_one, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(n)


def test_linear_fit_under_a_launcher_is_refused_before_any_work(monkeypatch, tmp_path):
    from rainclf.fit import FitOptions, fit

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="rainclf.cli embed"):
        fit(tmp_path / "no-such-data", tmp_path / "model", FitOptions(backbone="glm4v-tiny", device="cpu", progress=False))
    assert not (tmp_path / "model").exists()


# --------------------------------------------------------------------------- the DDP worker

def _lora_curves(ctx_, steps: int = 4, per_rank: int = 2) -> dict:
    """The LoRA head on glm4v-tiny, trained the way ``train_loop`` would with the hand-made sync
    (its forward goes around any DDP wrapper): same global batch on every rank, each rank its
    half, gradients all-reduced before the step."""
    import torch
    from helpers import solid_images

    from rainclf.backbones.base import BackboneOptions
    from rainclf.heads.adapters import LoraParams, private_backbone
    from rainclf.heads.lora import build_lora_head
    from rainclf.parallel.ddp import (
        all_reduce_gradients,
        mean_across_ranks,
        shard_batch,
    )

    params = LoraParams(lora_r=4, lora_dropout=0.0, lr=5e-3, train_batch_size=per_rank)
    images = solid_images(8, seed=3)
    labels = torch.tensor([0, 1] * 4)
    batches = [[(2 * per_rank * s + i) % 8 for i in range(2 * per_rank)] for s in range(steps)]

    def run(sync: bool):
        backbone = private_backbone("glm4v-tiny", BackboneOptions(device="cpu"), -1)
        head = build_lora_head(backbone, params, -1, "会下雨吗？", seed=0)
        trainable = [p for _, p in head.named_trainable()]
        opt = torch.optim.AdamW(trainable, lr=params.lr)
        for m in head.modules:
            m.train()
        curve = []
        for batch in batches:
            idx = shard_batch(batch, ctx_) if sync else batch
            loss = torch.nn.functional.cross_entropy(head.logits([images[i] for i in idx]), labels[idx])
            loss.backward()
            if sync:
                all_reduce_gradients(trainable)
            opt.step()
            opt.zero_grad()
            curve.append(mean_across_ranks(loss.item()) if sync else loss.item())
        weights = torch.cat([p.detach().flatten() for p in trainable]).numpy().tobytes()
        return curve, hashlib.sha256(weights).hexdigest()

    out = dict(zip(("ddp", "weights"), run(sync=True)))
    if ctx_.is_main:
        out["single"] = run(sync=False)[0]
    return out


def _ddp_worker(out_dir: Path) -> None:
    from rainclf.parallel.ddp import barrier, broadcast_object, ensure_process_group

    ctx_ = ensure_process_group()
    result = {}
    marker = out_dir / "written-by-main"
    if ctx_.is_main:                 # the fitters' pattern: rank 0 writes, every rank waits
        marker.write_text("rank 0")
    barrier()
    result["saw_main_file"] = marker.is_file()
    result["agreed"] = broadcast_object({"from": ctx_.rank})
    try:
        result["lora"], result["lora_error"] = _lora_curves(ctx_), None
    except ImportError as e:   # heads/lora.py is optional (peft)
        result["lora"], result["lora_error"] = None, str(e)
    (out_dir / f"rank{ctx_.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["ddp"]:
        _ddp_worker(Path(sys.argv[2]))
