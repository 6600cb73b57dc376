"""``rainclf embed``: a dataset or a folder of images → one safetensors file of vectors
(format: ``embed/vectors.py``), in one process or one shard per process under a launcher.
"""

from __future__ import annotations

from rainclf.backbones import create_backbone
from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
from rainclf.embed.extract import embed_paths, open_cache
from rainclf.embed.vectors import dataset_or_images, write_embed_file
from rainclf.parallel.ddp import dist_context


def embed_to_file(data, out_file, backbone_name: str, backbone_options: BackboneOptions | None = None,
                  feature: str = "vision", layer: int = -1, prompt: str = DEFAULT_PROMPT,
                  batch_size: int = 8, cache_dir=None, progress: bool = True) -> dict | None:
    """Embed DATA into OUT_FILE. Under torchrun / accelerate launch each process embeds one shard
    and rank 0 merges them (the other ranks return None)."""
    if dist_context().is_distributed:
        from rainclf.parallel.shards import embed_sharded

        return embed_sharded(data, out_file, backbone_name, backbone_options, feature, layer, prompt,
                             batch_size, cache_dir, progress)
    from rainclf.io import check_target

    check_target(out_file)   # before the long part, not after it
    paths, labels, problems = dataset_or_images(data)
    backbone = create_backbone(backbone_name, backbone_options)
    cache = open_cache(cache_dir, backbone, feature, layer, prompt)
    res = embed_paths(backbone, paths, feature, layer, prompt, batch_size=batch_size, cache=cache,
                      progress=progress, desc="embed")
    return write_embed_file(out_file, res, labels, problems, backbone, feature, layer, prompt)
