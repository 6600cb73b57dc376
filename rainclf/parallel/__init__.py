"""Several processes: process-group helpers (``ddp.py``) and sharded embed/predict (``shards.py``)."""
