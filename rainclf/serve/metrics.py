"""Prometheus metrics of ``rainclf serve`` (``GET /metrics``), on prometheus_client.

    rainclf_requests_total{route,status}   answered requests (route: predict, model, healthz, readyz, metrics, other)
    rainclf_images_total{outcome}          uploaded images: predicted | error
    rainclf_errors_total{kind}             bad_image, no_images, too_large, content_type, bad_multipart,
                                           bad_request, queue_full, loading, shutting_down, not_found,
                                           method_not_allowed, internal
    rainclf_request_seconds{route}         latency histogram, from the first byte read to the answer
    rainclf_batch_size                     images per onnxruntime call (the micro-batches)
    rainclf_inference_seconds              seconds per onnxruntime call
    rainclf_queue_depth                    images admitted and not yet answered
    rainclf_ready                          1 once the model is loaded (--workers N: how many are)

With ``--workers N`` every worker writes its numbers to $PROMETHEUS_MULTIPROC_DIR (``rainclf
serve`` sets it) and any worker answers /metrics for all of them, summed.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ROUTES = frozenset({"predict", "model", "healthz", "readyz", "metrics"})
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .25, .5, .75, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ERROR_KINDS = ("bad_image", "no_images", "too_large", "content_type", "bad_multipart", "bad_request",
               "queue_full", "loading", "shutting_down", "not_found", "method_not_allowed", "internal")


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        # a private registry: two apps in one process (tests) do not collide
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rainclf_requests", "Answered HTTP requests.", ["route", "status"], registry=r)
        self.images = Counter("rainclf_images", "Uploaded images by outcome.", ["outcome"], registry=r)
        self.errors = Counter("rainclf_errors", "Errors by kind (a bad image part counts once).", ["kind"],
                              registry=r)
        self.latency = Histogram("rainclf_request_seconds", "Request latency in seconds.", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("rainclf_batch_size", "Images per onnxruntime call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("rainclf_inference_seconds", "Seconds per onnxruntime call.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("rainclf_queue_depth", "Images admitted and not yet answered.",
                                 registry=r, multiprocess_mode="livesum")
        self.ready = Gauge("rainclf_ready", "1 once the model is loaded (summed over --workers).", registry=r,
                           multiprocess_mode="livesum")
        for kind in ERROR_KINDS:       # every series exists from the start: rate() needs a first 0
            self.errors.labels(kind)
        for outcome in ("predicted", "error"):
            self.images.labels(outcome)

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, n: int, seconds: float) -> None:
        self.batch_size.observe(n)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        if multiprocess_dir():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
