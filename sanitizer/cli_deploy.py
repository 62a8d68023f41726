"""`sanitize build` and `sanitize compare`: thin commands over sanitizer.engine and sanitizer.compare.

SanitizeError propagates: the main CLI turns it into one line and its exit code."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from .atomic import check_writable
from .errors import ExitCode, SanitizeError


def build(
    model: Annotated[Path, typer.Argument(help="Sanitized ONNX model.")],
    out: Annotated[Path, typer.Option("--out", help="Engine file to write (e.g. model.engine).")],
    fp16: Annotated[bool, typer.Option("--fp16", help="FP16 engine (TensorRT 11: the ONNX is converted to FP16 first).")] = False,
    workspace: Annotated[Optional[int], typer.Option("--workspace", help="Builder workspace limit in MiB.")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", help="MIN,OPT,MAX batch for a dynamic batch dimension (default 1,8,32).")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option("--timing-cache", help="Timing cache to reuse and update; speeds up rebuilds on the same GPU.")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="Engine also runs with later TensorRT versions (may be slower).")] = False,
    hardware_compat: Annotated[str, typer.Option("--hardware-compat", help="same: this GPU model only; ampere+: any Ampere or newer GPU (may be slower).")] = "same",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing engine.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the build facts as one JSON object.")] = False,
) -> None:
    """Build a TensorRT engine from an ONNX model, on the GPU it will run on."""
    from .engine import build_engine, parse_batch

    check_writable(out, force=force, inputs=(model,))
    facts = build_engine(model, out, fp16=fp16, workspace_mib=workspace,
                         batch=None if batch is None else parse_batch(batch), timing_cache=timing_cache,
                         version_compatible=version_compatible, hardware_compat=hardware_compat)
    if as_json:
        typer.echo(json.dumps(facts))
        return
    table = Table(title=f"engine {out}", show_header=False)
    for key, value in facts.items():
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console().print(table)


def compare(
    models: Annotated[list[Path], typer.Argument(help="Two or more models: .onnx, or .engine/.plan (needs TensorRT).")],
    data: Annotated[Path, typer.Option("--data", help="Clean images: folder, .npz or .npy.")],
    triggered: Annotated[Optional[Path], typer.Option("--triggered", help="Triggered images (informational: sanitized and original should disagree).")] = None,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="Exit 8 when any pair's top-1 agreement on clean data is below this.")] = 0.99,
    scale: Annotated[float, typer.Option("--scale", help="Multiply raw pixels by this first.")] = 1 / 255,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean after scaling, e.g. 0.485,0.456,0.406.")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std after scaling, e.g. 0.229,0.224,0.225.")] = None,
    layout: Annotated[Optional[str], typer.Option("--layout", help="nchw or nhwc when the input shape does not tell.")] = None,
    input_name: Annotated[Optional[str], typer.Option("--input-name", help="Image input of a multi-input model.")] = None,
    output_name: Annotated[Optional[str], typer.Option("--output-name", help="Classifier output, when the first model has several float [N, classes] outputs.")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="HxW to feed models whose height and width are dynamic.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per inference call.")] = 64,
    save_inputs: Annotated[Optional[Path], typer.Option("--save-inputs", help="Save the fed clean inputs as polygraphy JSON (for --load-inputs).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing --save-inputs file.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Compare models on the same images: top-1 agreement and output differences per pair."""
    from calib.preprocess import parse_floats, parse_size

    from .compare import compare_models

    if save_inputs is not None:
        check_writable(save_inputs, force=force,
                       inputs=tuple(models) + tuple(p for p in (data, triggered) if p is not None))
    report = compare_models(models, data, triggered=triggered, scale=scale, mean=parse_floats(mean),
                            std=parse_floats(std), layout=layout, input_name=input_name, output_name=output_name,
                            input_size=parse_size(input_size), min_agreement=min_agreement, batch_size=batch_size, save_inputs=save_inputs)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        console = Console()
        for title, part in (("clean", report["clean"]), ("triggered (informational)", report["triggered"])):
            if part is None:
                continue
            table = Table(title=f"{title}: {part['data']} ({part['images']} images)")
            for column in ("model A", "model B", "output", "top-1 agreement", "max |diff|", "mean |diff|"):
                table.add_column(column, justify="right" if "|" in column or "agreement" in column else "left")
            for p in part["pairs"]:
                table.add_row(p["a"], p["b"], p["output"], f"{p['agreement']:.4f}",
                              f"{p['max_abs_diff']:.3g}", f"{p['mean_abs_diff']:.3g}")
            console.print(table)
        console.print("polygraphy equivalent:", style="bold")
        console.print(report["polygraphy"], markup=False, highlight=False, soft_wrap=True)
    if not report["passed"]:
        raise SanitizeError(f"top-1 agreement {report['clean']['min_agreement']:.4f} on clean data is below "
                            f"--min-agreement {min_agreement}", ExitCode.DISAGREE)


def register(app: typer.Typer) -> None:
    app.command("build")(build)
    app.command("compare")(compare)
