"""Load test of ``rainclf serve``, on 127.0.0.1 only, bounded (a fixed number of requests per level
and a time cap per level: it stops by itself).

    python tools/load_serve.py MODEL_DIR [--concurrency 1,8,32] [--requests 2000] [--duration 120]
                               [--max-batch 32] [--max-wait-ms 5] [--workers 1] [--json FILE]
    python tools/load_serve.py MODEL_DIR --url http://127.0.0.1:8000 [--pid PID]   # a server already running

MODEL_DIR holds an image → label export (``rainclf export MODEL_DIR --include-backbone``). Without
``--url`` the tool starts ``rainclf serve MODEL_DIR --port 0`` itself (``--max-batch``,
``--max-wait-ms``, ``--workers`` passed on) and stops it with SIGTERM at the end.

For each concurrency c: c client threads, each with one keep-alive connection, send one real photo
per request (multipart, cycling through ../shared/weather/images, read into memory first) until
``--requests`` are answered or ``--duration`` seconds pass. Printed per level: requests, errors
(anything but 200 with a label, by status), latency p50/p95/p99 (client side, request sent →
answer read), served img/s, the mean micro-batch the server ran (from /metrics), and the ratio of
served img/s to the in-process ``OnnxClassifier`` img/s at the same batch size (decode +
preprocess + one onnxruntime call per batch, measured in this process while the server is idle,
just before the level). The server's RSS (with its worker processes) is sampled every 0.5 s.

With ``--unbatched`` (default on) the highest concurrency is run again against a second server
started with ``--max-batch 1``: "batched / unbatched" is the gain micro-batching brings.

Prints a table and writes ``--json FILE`` (machine, versions, settings, levels, RSS samples).
Asserts nothing: the issue's targets (ratio at c=32 ≥ 0.8, 0 errors, flat memory) are read from it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_json import add_json_argument, write_json  # noqa: E402

from rainclf.serve.client import Client, ServerProcess, encode_multipart  # noqa: E402

WEATHER = REPO.parent / "shared" / "weather" / "images"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ------------------------------------------------------------------ the server and its memory

def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and all its descendants (--workers processes), in MiB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, AttributeError):
            pass    # a process that just exited
    return total / 1024


class RssSampler(threading.Thread):
    def __init__(self, pid: int | None, counter, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.counter, self.every_s = pid, counter, every_s
        self.samples: list[dict] = []            # {"t", "requests", "rss_mb"}
        self.stop_event, self.t0 = threading.Event(), time.monotonic()

    def run(self) -> None:
        while self.pid and not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.every_s)

    def sample(self) -> float | None:
        if not self.pid:
            return None
        value = rss_mb(self.pid)
        self.samples.append({"t": round(time.monotonic() - self.t0, 2), "requests": self.counter[0],
                             "rss_mb": round(value, 1)})
        return value


def start_server(model: str, args, max_batch: int) -> ServerProcess:
    argv = [sys.executable, "-m", "rainclf.cli", "serve", model, "--max-batch", str(max_batch),
            "--max-wait-ms", str(args.max_wait_ms), "--workers", str(args.workers),
            "--max-queue", str(max(128, max_batch, 2 * max(args.concurrency)))]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return ServerProcess(argv, env=env, cwd=str(REPO)).start()


def server_batches(url: str) -> tuple[float, float]:
    """(onnxruntime calls, images in them) so far, from /metrics."""
    text = Client(url).get("/metrics")[2].decode()
    found = {m.group(1): float(m.group(2)) for m in re.finditer(r"^rainclf_batch_size_(count|sum) (\S+)$", text, re.M)}
    return found.get("count", 0.0), found.get("sum", 0.0)


# ------------------------------------------------------------------ load

def run_level(url: str, bodies: list, c: int, n: int, duration: float, counter: list) -> dict:
    """c threads send requests from ``bodies`` until n are answered or ``duration`` s pass."""
    index, lock = itertools.count(), threading.Lock()
    latencies, errors, images = [], {}, [0]
    deadline = time.monotonic() + duration

    def worker():
        client = Client(url, timeout=60)
        while True:
            with lock:
                i = next(index)
            if i >= n or time.monotonic() > deadline:
                break
            body, content_type = bodies[i % len(bodies)]
            t = time.perf_counter()
            try:
                status, _, data = client.request("POST", "/v1/predict", body, {"Content-Type": content_type})
                ok = status == 200 and b'"error":null' in data.replace(b" ", b"")
                key = None if ok else f"HTTP {status}"
            except OSError as e:
                ok, key = False, type(e).__name__
                client.close()
            dt = time.perf_counter() - t
            with lock:
                counter[0] += 1
                if ok:
                    latencies.append(dt)
                    images[0] += 1
                else:
                    errors[key] = errors.get(key, 0) + 1
        client.close()

    calls0, imgs0 = server_batches(url)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    calls1, imgs1 = server_batches(url)
    lat = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {"concurrency": c, "requests": len(latencies) + sum(errors.values()), "errors": sum(errors.values()),
            "errors_by_kind": errors, "wall_s": round(wall, 2),
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "img_s": images[0] / wall,
            "mean_server_batch": (imgs1 - imgs0) / (calls1 - calls0) if calls1 > calls0 else None}


def in_process_img_s(model: str, photos: list, batch: int, min_images: int = 160) -> float:
    """``OnnxClassifier`` on this process: decode + preprocess + p_rain, ``batch`` images per call."""
    from rainclf.data.images import decode_image
    from rainclf.onnx.runtime import OnnxClassifier

    clf = in_process_img_s.cache.get(model) or in_process_img_s.cache.setdefault(model, OnnxClassifier.from_dir(model))
    chunks = [[photos[(k * batch + j) % len(photos)] for j in range(batch)]
              for k in range(max(3, -(-min_images // batch)))]

    def call(chunk):
        clf.p_rain_from_images([decode_image(data, name) for name, data in chunk])

    call(chunks[0])                                            # session opened, warmed
    t = time.perf_counter()
    for chunk in chunks:
        call(chunk)
    return len(chunks) * batch / (time.perf_counter() - t)


in_process_img_s.cache = {}


# ------------------------------------------------------------------ main

def print_table(levels: list) -> None:
    head = f"{'server':<10}{'c':>4}{'requests':>10}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}" \
           f"{'img/s':>9}{'batch':>7}{'in-proc':>9}{'ratio':>7}{'RSS MiB':>17}"
    print(head)
    for r in levels:
        batch = f"{r['mean_server_batch']:.1f}" if r["mean_server_batch"] else "-"
        inproc = f"{r['in_process_img_s']:.1f}" if r.get("in_process_img_s") else "-"
        ratio = f"{r['ratio_to_in_process']:.2f}" if r.get("ratio_to_in_process") else "-"
        rss = f"{r['rss_mb_start']:.0f} → {r['rss_mb_end']:.0f}" if r.get("rss_mb_end") else "-"
        print(f"{r['server']:<10}{r['concurrency']:>4}{r['requests']:>10}{r['errors']:>8}{r['p50_ms']:>9.1f}"
              f"{r['p95_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['img_s']:>9.1f}{batch:>7}{inproc:>9}{ratio:>7}{rss:>17}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="MODEL_DIR (or its export folder) with the image → label graph")
    ap.add_argument("--concurrency", default="1,8,32", help="client threads per level, comma-separated")
    ap.add_argument("--requests", default="2000",
                    help="requests per level: one number, or one per --concurrency level (300,1000,3000)")
    ap.add_argument("--duration", type=float, default=120.0, help="seconds per level at most")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--images", default=str(WEATHER), help="folder of photos to send [../shared/weather/images]")
    ap.add_argument("--url", help="a running server on 127.0.0.1 instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    ap.add_argument("--unbatched-requests", type=int, default=1000, help="requests of the --max-batch 1 run")
    ap.add_argument("--in-process-images", type=int, default=160,
                    help="images per in-process measurement (before and after each level)")
    ap.add_argument("--no-unbatched", dest="unbatched", action="store_false",
                    help="skip the --max-batch 1 comparison at the highest concurrency")
    add_json_argument(ap)
    args = ap.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(counts) not in (1, len(args.concurrency)):
        ap.error(f"--requests {args.requests}: give one count, or one per --concurrency level")
    requests = dict(zip(args.concurrency, counts * len(args.concurrency) if len(counts) == 1 else counts))
    if args.url and (urlsplit(args.url).hostname or "") not in LOOPBACK:
        ap.error(f"--url {args.url}: this load test only runs against 127.0.0.1")
    photos = [(p.name, p.read_bytes()) for p in sorted(Path(args.images).glob("*.jpg"))]
    if not photos:
        ap.error(f"{args.images}: no .jpg photos (../shared/weather/images beside the checkout, or --images DIR)")
    bodies = [encode_multipart([item]) for item in photos]

    levels, servers = [], [("batched", args.max_batch)] + ([("unbatched", 1)] if args.unbatched else [])
    samples: dict = {}
    for label, max_batch in servers:
        if label == "unbatched" and args.url:
            break
        proc = None if args.url else start_server(args.model, args, max_batch)
        url, pid = (args.url, args.pid) if args.url else (proc.url, proc.proc.pid)
        counter = [0]
        sampler = RssSampler(pid, counter)
        sampler.start()
        try:
            for c in (args.concurrency if label == "batched" else [max(args.concurrency)]):
                batch = min(c, max_batch)
                # the in-process figure before and after the level, averaged: on a shared machine
                # the load of other processes drifts during a level
                before = in_process_img_s(args.model, photos, batch, args.in_process_images)
                run_level(url, bodies, c, 2 * c, 30, counter)         # warm-up, not counted
                start = sampler.sample()
                n = requests[c] if label == "batched" else args.unbatched_requests
                r = run_level(url, bodies, c, n, args.duration, counter)
                end = sampler.sample()
                after = in_process_img_s(args.model, photos, batch, args.in_process_images)
                inproc = (before + after) / 2
                r.update(server=label, server_max_batch=max_batch, in_process_batch=batch,
                         in_process_img_s=inproc, in_process_img_s_before_after=[before, after],
                         ratio_to_in_process=r["img_s"] / inproc, rss_mb_start=start, rss_mb_end=end,
                         load_average_1min=os.getloadavg()[0])
                levels.append(r)
                print(f"  {label} c={c}: {r['requests']} requests, {r['img_s']:.1f} img/s, "
                      f"{r['errors']} errors", flush=True)
        finally:
            sampler.stop_event.set()
            sampler.join()
            samples[label] = sampler.samples
            if proc is not None:
                code = proc.stop()
                if code != 0:
                    print(f"warning: the {label} server exited {code}: {' | '.join(proc.log[-3:])}")

    print_table(levels)
    notes = []
    by = {(r["server"], r["concurrency"]): r for r in levels}
    top = max(args.concurrency)
    if ("unbatched", top) in by:
        gain = by[("batched", top)]["img_s"] / by[("unbatched", top)]["img_s"]
        notes.append(f"batched / unbatched img/s at c={top}: {gain:.2f}")
    for label, s in samples.items():
        if s:
            rss = [x["rss_mb"] for x in s]
            notes.append(f"{label} server RSS over {s[-1]['requests']} requests: first {rss[0]:.0f} MiB, "
                         f"min {min(rss):.0f}, max {max(rss):.0f}, last {rss[-1]:.0f}")
            step = max(1000, s[-1]["requests"] // 10)
            marks, seen = [], -1
            for x in s:                         # the first sample past each multiple of `step`
                if x["requests"] // step > seen:
                    seen = x["requests"] // step
                    marks.append(f"{x['requests']}: {x['rss_mb']:.0f}")
            notes.append(f"{label} server RSS MiB at requests answered — " + ", ".join(marks))
    for line in notes:
        print(line)
    write_json(args.json, "load_serve.py",
               {"model": args.model, "concurrency": args.concurrency, "requests": requests,
                "duration_s": args.duration, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                "workers": args.workers, "photos": len(photos), "images": args.images, "url": args.url,
                "unbatched_requests": args.unbatched_requests, "in_process_images": args.in_process_images},
               {"levels": levels, "rss_samples": samples}, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
