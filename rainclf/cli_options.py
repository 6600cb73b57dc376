"""What the ``rainclf`` commands share: option sets, the typed-options filter, --help in
titled sections. No command lives here (they are in rainclf/cli.py)."""

from __future__ import annotations

from pathlib import Path

import click


def cache_dir_choice(no_cache: bool, cache_dir: str | None):
    from rainclf.config import cache_choice

    return cache_choice(cache_dir, no_cache)


def given(**options) -> dict:
    """The options the user typed (click leaves the others None): a head refuses those it does
    not use instead of silently dropping them."""
    return {k: v for k, v in options.items() if v is not None}


def show_progress(quiet: bool) -> bool:
    return not quiet


common_run = [
    click.option("--device", default="auto", show_default=True,
                 help="auto, cpu, cuda, cuda:N, or multi (one GLM-4V split over all GPUs of this node, "
                      "for models too large for one card)."),
    click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
                 help="Images per forward pass."),
    click.option("--cache-dir", type=click.Path(file_okay=False),
                 help="Embedding cache folder [default: $RAINCLF_CACHE_DIR or ~/.cache/rainclf]."),
    click.option("--no-cache", is_flag=True, help="Neither read nor write the embedding cache."),
    click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines."),
]


def apply_options(options):
    def deco(f):
        for o in reversed(options):
            f = o(f)
        return f
    return deco


class SectionedCommand(click.Command):
    """A command whose --help lists its options in titled sections (``SECTIONS``: option name →
    section), in the order the sections first appear."""

    sections: dict[str, str] = {}
    OTHER = "Running"

    def format_options(self, ctx, formatter):
        groups: dict[str, list] = {title: [] for title in dict.fromkeys(self.sections.values())}
        groups[self.OTHER] = []
        for param in self.get_params(ctx):
            record = None if isinstance(param, click.Argument) else param.get_help_record(ctx)
            if record is not None:
                groups[self.sections.get(param.name, self.OTHER)].append(record)
        for title, records in groups.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)


FIT_DATA = "Data and backbone"
FIT_LINEAR = "Linear head (--head linear)"
FIT_LORA = "LoRA and generative heads (--head lora | generative)"


class FitCommand(SectionedCommand):
    sections = {
        **{n: FIT_DATA for n in ("out_dir", "backbone", "head", "feature", "layer", "prompt", "val_split",
                                 "seed", "groups_file", "near_dup_threshold", "no_auto_groups",
                                 "allow_conflicts", "image_size", "weights", "trust_remote_code", "overwrite")},
        **{n: FIT_LINEAR for n in ("class_weight", "C", "threshold_from_val")},
        **{n: FIT_LORA for n in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "steps", "lr",
                                 "train_batch_size", "grad_accum", "eval_every", "patience", "precision",
                                 "force_fp16")},
    }


class UserPath(click.Path):
    """click.Path that expands ``~`` (``--output=~/o.csv`` reaches us unexpanded by the shell)."""

    def convert(self, value, param, ctx):
        import os

        return super().convert(os.path.expanduser(value) if isinstance(value, str) else value, param, ctx)


def expand_user_paths(cmd):
    """Every plain click.Path parameter of ``cmd`` becomes a ``UserPath`` (once)."""
    import copy

    for p in getattr(cmd, "params", []):
        if type(p.type) is click.Path:
            p.type = copy.copy(p.type)
            p.type.__class__ = UserPath
    return cmd


def echo_export(info: dict) -> None:
    """What ``rainclf export`` wrote: each graph with its parity against torch, the int8/fp16
    calibration figures, and a warning for each graph not exported."""
    cal = info["parity"].get("calibration")
    if cal:
        click.echo(f"{cal.get('quantize') or cal.get('precision')} image graph: label agreement with torch "
                   f"{cal['label_agreement']:.1%} on {cal['n_images']} calibration images, max |Δp_rain| "
                   f"{cal['max_abs_dp']:.3f} (fp32 graph: {cal['fp32_graph']['label_agreement']:.1%})")
    for name, graph in info["graphs"].items():
        parity = info["parity"].get(name, {}).get("max_abs_dp")
        click.echo(f"wrote {Path(info['out_dir']) / graph['file']}: {name} graph, inputs "
                   f"{', '.join(graph['inputs'])}, batch {graph['batch']}"
                   + (f", max |Δp_rain| vs torch {parity:.1e}" if parity is not None else ""))
    for name, reason in info["not_exported"].items():
        click.echo(f"rainclf: warning: {name} graph not exported: {reason}", err=True)
