"""Stage 1, the input: image files (``images.py``) and labelled datasets (``datasets.py``)."""
