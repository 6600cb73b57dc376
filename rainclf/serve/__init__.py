"""``rainclf serve``: an HTTP service for an exported classifier, without torch.

    config.py    ServeOptions: every setting, with help text and checks
    engine.py    ServedModel: the export's image → label graph (rainclf.onnx.runtime), upload → pixel rows
    uploads.py   request body → uploaded images; every bad request as one RequestError (4xx)
    batcher.py   MicroBatcher: concurrent requests' images → ONE onnxruntime call, bounded queue
    metrics.py   Prometheus metrics (prometheus_client)
    app.py       the Starlette app: /healthz /readyz /metrics /v1/model /v1/predict
    server.py    serve(options): uvicorn, --workers, graceful SIGTERM
    client.py    a stdlib-only client (multipart encoding, POST /v1/predict), for scripts and tests

Nothing here imports torch or transformers (a test runs the server with both blocked): the
``serve`` extra installs Starlette, uvicorn, python-multipart, prometheus_client, onnxruntime,
numpy and Pillow.
"""

from rainclf.serve.config import ServeOptions
from rainclf.serve.engine import ServeError
from rainclf.serve.server import serve

__all__ = ["ServeError", "ServeOptions", "serve"]
