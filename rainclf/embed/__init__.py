"""Stage 2, image → embedding: extraction through the cache (``extract.py``, ``cache.py``) and
the embeddings file of ``rainclf embed`` (``vectors.py``, ``to_file.py``)."""
