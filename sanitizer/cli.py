"""`sanitize`: thin typer commands over the plain functions in pipeline / bench / demo.

`sanitize MODEL --calib DIR --out OUT` runs the default command; `sanitize evaluate|demo|bench|layers|build|compare`
are subcommands. Every user error is one line on stderr and a documented exit code (see errors.ExitCode)."""
from __future__ import annotations

import difflib
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from calib.preprocess import parse_floats, parse_size

from .errors import ExitCode, SanitizeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find and prune backdoor neurons in an ONNX image classifier.")
err = Console(stderr=True)
out = Console()
# images `evaluate` reads for the input-range check: pixels on another scale show in any of them
EVAL_RANGE_IMAGES = 256

Calib = Annotated[Path, typer.Option("--calib", help="clean images: folder (flat or one subfolder per class), .npz or .npy")]
Scale = Annotated[float, typer.Option(help="model_input = ((pixels × scale) − mean) / std")]
Mean = Annotated[Optional[str], typer.Option(help="one value or one per channel, comma-separated")]
Std = Annotated[Optional[str], typer.Option(help="one value or one per channel, comma-separated")]
Layout = Annotated[Optional[str], typer.Option(help="nchw | nhwc (default: from the model's input shape)")]
InputName = Annotated[Optional[str], typer.Option("--input-name", help="image input, when the model has several")]
OutputName = Annotated[Optional[str], typer.Option("--output-name", help="classifier output, when the model has several float [N, classes] outputs")]
InputSize = Annotated[Optional[str], typer.Option("--input-size", help="HxW to feed a model whose height and width are dynamic")]
Force = Annotated[bool, typer.Option("--force", help="overwrite existing outputs")]
TimeBudget = Annotated[Optional[float], typer.Option("--time-budget", help="minutes the default defense's searches are sized to on this machine (default 15): fewer steps, then images, where its full effort would take longer, as the report's 'effort' says; 0: full effort, however long")]


def budget_seconds(minutes: float | None) -> float | None:
    """--time-budget in minutes -> Options.time_budget in seconds: the default budget when not given, None
    (full effort) for 0."""
    from .defense.effort import DEFAULT_BUDGET

    if minutes is not None and minutes != 0 and not 0 < minutes * 60 < float("inf"):
        # checked here on the user's number: a huge one overflows to inf once in seconds
        raise SanitizeError(f"--time-budget is minutes (0: full effort), got {minutes:g}", ExitCode.USAGE)
    return DEFAULT_BUDGET if minutes is None else None if minutes == 0 else minutes * 60


def _progress() -> tuple[Progress, callable]:
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total or None)
        bar.update(tasks[stage], completed=done, total=total or None)

    return bar, update


@app.command("run", help="Sanitize MODEL (the default command: `sanitize MODEL --calib DIR --out OUT`).")
def run_cmd(
    ctx: typer.Context,
    model: Annotated[Path, typer.Argument(help="ONNX image classifier")],
    calib: Calib,
    out: Annotated[Optional[Path], typer.Option("--out", help="x.onnx, or x.engine / x.plan for a TensorRT engine")] = None,
    criterion: Annotated[str, typer.Option(help="probe (default; needs the torch extra) | linf | mean | l1 | l2")] = "probe",
    layers: Annotated[Optional[str], typer.Option(help="NAME,... or 'all' (default: all for probe, last conv stage otherwise)")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="prune this share of candidate units instead of searching")] = None,
    max_acc_drop: Annotated[float, typer.Option("--max-acc-drop", help="accuracy/agreement budget")] = 0.02,
    holdout: Annotated[float, typer.Option(help="share of --calib held out for the stop rule")] = 0.5,
    scale: Scale = 1 / 255, mean: Mean = None, std: Std = None, layout: Layout = None, input_name: InputName = None,
    output_name: OutputName = None, input_size: InputSize = None,
    no_sanity_check: Annotated[bool, typer.Option("--no-sanity-check", help="prune even when the original model fails on the calibration images (exit 5 otherwise)")] = False,
    eval_data: Annotated[Optional[Path], typer.Option("--eval-data", help="labeled clean images for accuracy")] = None,
    eval_triggered: Annotated[Optional[Path], typer.Option("--eval-triggered", help="triggered images for ASR")] = None,
    target: Annotated[Optional[int], typer.Option(help="attacker's target class, for ASR")] = None,
    report: Annotated[Optional[Path], typer.Option(help="write a JSON report here")] = None,
    report_html: Annotated[Optional[Path], typer.Option("--report-html", help="write a self-contained HTML report here (figures need the plots extra)")] = None,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="seed of the image split, the probes and the repair (0..2^32-1)")] = 0,
    detect: Annotated[bool, typer.Option("--detect", help="with linf/mean/l1/l2: detect a backdoor first (needs torch; probe always does); a clean verdict prunes nothing")] = False,
    suspect: Annotated[Optional[Path], typer.Option("--suspect", help="images you believe carry the trigger: rank by their ℓ∞ rise instead of synthesized probes")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="write PNG figures (pruning curve, ℓ∞ histograms, probes) to this folder; needs the plots extra")] = None,
    allow_degraded: Annotated[bool, typer.Option("--allow-degraded", help="write even if the budget is broken")] = False,
    time_budget: TimeBudget = None,
    force: Force = False,
):
    from .engine import is_engine
    from .pipeline import Options, sanitize

    opts = Options(model=model, calib=calib, out=out, criterion=criterion, layers=layers, ratio=ratio,
                   max_acc_drop=max_acc_drop, holdout=holdout, scale=scale, mean=parse_floats(mean),
                   std=parse_floats(std), layout=layout, input_name=input_name, output_name=output_name,
                   input_size=parse_size(input_size), sanity_check=not no_sanity_check, eval_data=eval_data,
                   eval_triggered=eval_triggered, target=target, report=report, force=force,
                   allow_degraded=allow_degraded, seed=seed, detect=detect, suspect=suspect, plots=plots,
                   report_html=report_html, command=(ctx.obj or {}).get("command"),
                   time_budget=budget_seconds(time_budget))
    bar, update = _progress()
    with bar:
        result = sanitize(opts, update)
    show_summary(result)
    if out is not None and is_engine(out):
        from .engine import build_engine

        onnx_out = Path(result["output"]["onnx"])
        build_engine(onnx_out, out)
        out_console_line(f"engine written to {out}")


def out_console_line(text: str) -> None:
    out.print(text, highlight=False)


def show_summary(result: dict) -> None:
    table = Table(title="sanitize", show_header=True)
    table.add_column("")
    table.add_column("before")
    table.add_column("after")
    held = result["held_out_after"]
    table.add_row("held-out agreement", "1.000", f"{held['agreement']:.3f} (80% CI {held['interval90'][0]:.3f}–{held['interval90'][1]:.3f}, n={held['n']})")
    ev = result.get("evaluation")
    if ev:
        for key, label in (("clean_acc", "clean accuracy"), ("asr", "attack success rate")):
            if ev["before"][key] is not None:
                table.add_row(label, f"{ev['before'][key]:.4f}", f"{ev['after'][key]:.4f}")
    if "detection" in result:
        from .defense.detect import evidence

        table.add_row("detection", "", f"{result['detection']['verdict']} ({evidence(result['detection'])})")
    if "probes" in result:
        pr = result["probes"]
        used = [p["probe"] for p in pr["probes"] if p["used"]]
        table.add_row("probes toward target", "", f"{len(used)} used: {'; '.join(used)}")
        table.add_row("probe flip rate", f"{max(p['flip_before'] for p in pr['probes'] if p['used']):.3f}",
                      f"{max(result['held_out_after']['probe_flip']):.3f} ({pr['ranking']} ranking, {pr['chosen']})")
    # a clean-data criterion only prunes: with no unit pruned the written model is the original
    unchanged = result["criterion"] != "probe" and result["plan"]["count"] == 0
    if result.get("detection", {}).get("suspected_target", 0) is None:
        table.add_row("units pruned", "0", "0 (no backdoor found: the model is written unchanged)")
    elif unchanged:
        table.add_row("units pruned", "0", f"0 of {result['plan']['candidates']} ({result['criterion']}): the model is "
                      "unchanged")
    else:
        # a repair changes every weight though it prunes nothing: "0 of N" alone would read as unchanged
        repaired = "repaired" in result.get("probes", {}).get("chosen", "")
        table.add_row("units pruned", "0", f"{result['plan']['count']} of {result['plan']['candidates']} ({result['criterion']})"
                      + ("; remaining weights repaired" if repaired else ""))
    kept = result.get("target_class")
    if kept and kept["of"]:
        # the accuracy figures above average over every class; removing a backdoor costs its target class most
        table.add_row(f"class {kept['class']} kept", "1.000",
                      f"{kept['share']:.3f} ({kept['kept']} of {kept['of']} held-out images the original calls it; "
                      f"other images unchanged {kept['others_share']:.3f})")
    out.print(table)
    if "effort" in result:
        from .defense.effort import summary

        line = summary(result["effort"])
        if line:
            out_console_line(line)
    looked = result.get("detection", {}).get("suspected_target", 0) is None   # detection searched, found none
    if looked:
        # "no backdoor found" is a claim about what was searched, not about every trigger there is
        out_console_line("searched: patches, signals and warps, each called a backdoor when it sends nearly every "
                         "image (0.9; warps 0.5) to one class, and small masks (an outlier in size, anomaly index 2) — "
                         "a backdoor that works on fewer images, "
                         "per-image (input-aware), sparse-pixel and other trigger kinds can pass unseen (--suspect "
                         "with triggered samples aims the defense; --eval-triggered checks the result)")
    if result["criterion"] != "probe" and not looked and (ev or {}).get("after", {}).get("asr") is None:
        # a clean-data criterion never looks at a trigger: a written model says nothing about the backdoor
        out_console_line(f"backdoor not checked: --criterion {result['criterion']} prunes by clean-data statistics "
                         "alone (Cheng et al. report it removes nothing on realistic models); the default criterion "
                         "attacks the result, --eval-triggered with --target measures it")
    for note in (ev or {}).get("notes", []):
        out_console_line(f"note: {note}")
    if result["degraded"]:
        why = (result.get("evaluation", {}).get("refused") or result.get("refused")
               or "over the budget or the backdoor's probes still work")
        out_console_line(f"degraded: {why}; written only because of --allow-degraded")
    if "output" in result:
        out_console_line(f"ONNX written to {result['output']['onnx']}: the original's weights, unchanged (nothing pruned)"
                         if unchanged else f"sanitized ONNX written to {result['output']['onnx']}")
    else:
        out_console_line("no --out given: no model written")


@app.command("evaluate", help="Clean accuracy and attack success rate of MODEL.")
def evaluate_cmd(
    model: Annotated[Path, typer.Argument()],
    data: Annotated[Optional[Path], typer.Option("--data", help="labeled clean images")] = None,
    triggered: Annotated[Optional[Path], typer.Option("--triggered", help="triggered images")] = None,
    target: Annotated[Optional[int], typer.Option()] = None,
    scale: Scale = 1 / 255, mean: Mean = None, std: Std = None, layout: Layout = None, input_name: InputName = None,
    output_name: OutputName = None, input_size: InputSize = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
):
    from calib.preprocess import input_spec, resolve_preprocess

    from .model_io import load_model
    from .pipeline import evaluate, open_data
    from .sanity import input_ranges, narrow_input

    if data is None and triggered is None:
        raise SanitizeError("give --data and/or --triggered", ExitCode.USAGE)
    if target is not None and triggered is None:
        # as the job refuses it: a target with nothing to score it on is a forgotten flag, not a no-op
        raise SanitizeError("--target is the attacker's class for the ASR on --triggered images; give them with "
                            "--triggered, or drop --target", ExitCode.USAGE)
    loaded = load_model(model)
    spec = input_spec(loaded.model, input_name, layout, output_name=output_name, size=parse_size(input_size))
    pre = resolve_preprocess(spec, scale=scale, mean=parse_floats(mean), std=parse_floats(std), layout=layout)
    for flag, path in (("--data", data), ("--triggered", triggered)):
        # the job's sanity gate checks this on --calib; here nothing else would (accuracy 0.18 on [0, 1] pixels)
        # the first EVAL_RANGE_IMAGES say it: a whole set is not decoded twice for this
        narrow = path is not None and narrow_input(*input_ranges(open_data(path, spec), pre, EVAL_RANGE_IMAGES),
                                                   pre, flag)
        if narrow:
            raise SanitizeError(narrow, ExitCode.BAD_DATA)
    result = evaluate(loaded.model, spec, pre, data=data, triggered=triggered, target=target)
    if as_json:
        print(json.dumps(result))
        return
    for k, v in result.items():
        out_console_line(f"{k}: {'-' if v is None else round(v, 4) if isinstance(v, float) else v}")


@app.command("layers", help="List MODEL's prunable layers, their units and how each is zeroed (or why it is blocked).")
def layers_cmd(model: Annotated[Path, typer.Argument()], input_name: InputName = None, layout: Layout = None,
               output_name: OutputName = None, input_size: InputSize = None,
               as_json: Annotated[bool, typer.Option("--json", help="print a JSON list instead of lines")] = False):
    from calib.preprocess import input_spec

    from .graph import blocked_reasons
    from .model_io import load_model
    from .pipeline import listed_sites

    loaded = load_model(model)
    spec = input_spec(loaded.model, input_name, layout, output_name=output_name, size=parse_size(input_size),
                      size_free=True)
    sites, (h, w) = listed_sites(loaded.model, spec)
    if (h, w) != (spec.height, spec.width):
        # on stderr: --json's stdout stays one JSON document
        err.print(f"input {spec.name}: dynamic height/width, read at {h}x{w} (the units do not depend on it; "
                  "--input-size to choose)", highlight=False, markup=False, soft_wrap=True)
    rows = [{"name": s.name, "kind": s.kind, "tensor": s.tensor, "axis": s.axis, "rank": s.rank, "units": s.channels,
             "strategy": s.strategy, "why_blocked": s.why_blocked or None} for s in sites]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    # plain lines, not a table: a table truncates long node names in narrow terminals and pipes
    for r in rows:
        why = f" ({r['why_blocked']})" if r["why_blocked"] else ""
        print(f"{r['name']}\t{r['kind']}\t{r['units']} units\ton {r['tensor']} axis {r['axis']} of {r['rank']}"
              f"\t{r['strategy']}{why}")
    if not any(s["strategy"] != "blocked" for s in rows):
        print("no prunable layer" + ("" if rows else f": {blocked_reasons(sites)}"))


@app.command("demo", help="Sanitize the shipped backdoored digits model and print a before/after table.")
def demo_cmd(
    out: Annotated[Optional[Path], typer.Option("--out", help="also write the sanitized ONNX here")] = None,
    criterion: Annotated[str, typer.Option(help="criterion to demonstrate (the job's default: probe)")] = "probe",
    detect: Annotated[bool, typer.Option("--detect", help="with linf/mean/l1/l2: probe for a backdoor first")] = False,
    report: Annotated[Optional[Path], typer.Option("--report", help="JSON report of the run")] = None,
    suspect: Annotated[Optional[Path], typer.Option("--suspect", help="images you believe carry the trigger (as for a model of yours)")] = None,
    allow_degraded: Annotated[bool, typer.Option("--allow-degraded", help="write even if the budget is broken (with --out)")] = False,
    force: Force = False,
):
    # a refusal's advice names the job's flags: the demo takes those it names (--suspect, --allow-degraded)
    from .demo import DEMO
    from .pipeline import Options, sanitize

    out_console_line(f"demo model: {DEMO['trigger']}; target class {DEMO['target']}")
    opts = Options(model=DEMO["model"], calib=DEMO["calib"], out=out, criterion=criterion, scale=DEMO["scale"],
                   eval_data=DEMO["clean"], eval_triggered=DEMO["triggered"], target=DEMO["target"],
                   force=force, detect=detect, report=report, suspect=suspect, allow_degraded=allow_degraded,
                   # full effort: a fixed workload of about 30 s on 2 cores; sized to a time budget its effort, and so
                   # its result, followed the machine's load (a busy CI runner cut it to a quarter and it refused)
                   time_budget=None)
    bar, update = _progress()
    with bar:
        result = sanitize(opts, update)
    show_summary(result)


@app.command("bench", help="Run every case of a suite (suite.toml + case.toml per case) and print a table.")
def bench_cmd(
    suite: Annotated[Path, typer.Argument(help="folder with suite.toml")],
    criteria: Annotated[str, typer.Option(help="comma-separated criteria to compare")] = "linf,mean,probe",
    cases: Annotated[Optional[str], typer.Option(help="only these cases (comma-separated)")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the rows as JSON here")] = None,
    detect: Annotated[bool, typer.Option("--detect", help="run backdoor detection first in every run (needs torch)")] = False,
    time_budget: TimeBudget = None,
):
    from .atomic import check_writable, write_text
    from .bench import load_suite, machine, run_case, step_times
    from .defense.effort import cut_stages
    from .pipeline import CRITERIA, PROBE

    chosen = load_suite(suite)
    # every mistake before the first case runs: a typo must not cost an hour of the cases before it
    names = [c.strip() for c in criteria.split(",") if c.strip()]
    unknown = [c for c in names if c not in (PROBE, *CRITERIA)]
    if not names or unknown:
        raise SanitizeError(f"--criteria {criteria!r}: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}; "
                            f"choose from {', '.join((PROBE, *CRITERIA))}", ExitCode.USAGE)
    if cases is not None:
        wanted = [c.strip() for c in cases.split(",") if c.strip()]
        missing = [c for c in wanted if c not in {case.name for case in chosen}]
        if not wanted or missing:
            raise SanitizeError(f"--cases {cases!r}: {'no case ' + ', '.join(missing) if missing else 'none given'} in "
                                f"{suite}; its cases: {', '.join(c.name for c in chosen)}", ExitCode.USAGE)
        chosen = [c for c in chosen if c.name in wanted]
    if json_out is not None:
        # rewritten as each row comes (no --force: a results file is meant to be refreshed), never over the suite
        check_writable(json_out, force=True, inputs=(suite / "suite.toml", *(c.folder for c in chosen)))
    table = Table("case", "criterion", "acc before→after", "ASR before→after", "units", "stats / plain pass s", "total s",
                  "detection", "goal", "seconds per step", title=f"sanitize bench {suite} — {machine()}")
    rows = []
    bar, update = _progress()
    with bar:
        for case in chosen:
            for crit in names:
                row = run_case(case, crit, update, detect=detect, time_budget=budget_seconds(time_budget))
                rows.append(row)
                table.add_row(row["case"], crit, f"{row['acc_before']:.4f}→{row['acc_after']:.4f}",
                              f"{row['asr_before']:.4f}→{row['asr_after']:.4f}", f"{row['units']}/{row['candidates']}",
                              (f"{row['stats_seconds']:.2f} / {row['plain_seconds']:.2f} (×{row['ratio']})"
                               if "ratio" in row else "—"),
                              f"{row['total_seconds']:.1f}" + (" degraded" if row["degraded"] else "")
                              + "".join(f" ({stage} {share})" if share == "skipped" else f" ({stage} at effort {share})"
                                        for stage, share in cut_stages(row.get("effort", {})).items()),
                              (row["detection"]["verdict"] + (f" ({row['detection']['found_by']})"
                                                              if row["detection"]["found_by"] else "")
                               if "detection" in row else "—"),
                              row["goal"], step_times(row))
                if json_out:
                    write_text(json_out, json.dumps({"machine": machine(), "rows": rows}, indent=2) + "\n")
    # piped or redirected, rich assumes 80 columns and cuts every cell of this wide table to a few letters
    (out if out.is_terminal else Console(width=max(out.width, 240))).print(table)


def _register_optional() -> None:
    from . import cli_deploy

    cli_deploy.register(app)


_register_optional()

# the shell's code for a command ended by SIGINT (128 + 2)
INTERRUPTED = 130

COMMANDS = {"run", "evaluate", "layers", "demo", "bench", "build", "compare", "--help", "-h"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["sanitize", *argv])   # as typed, for the HTML report
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if debug:
        from calib import session

        session.LOG_SEVERITY = 2   # onnxruntime's warnings too
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        # `sanitize MODEL ...` is the main job; a word close to a command that names no file is a typo
        near = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.75)
        if near and not Path(argv[0]).exists():
            err.print(f"error: unknown command {argv[0]!r} (did you mean {near[0]!r}?); a model path is given as "
                      "sanitize MODEL --calib DATA", highlight=False, markup=False, soft_wrap=True)
            return int(ExitCode.USAGE)
        argv = ["run"] + argv
    try:
        # commands return nothing; with standalone_mode=False typer returns the code of an Exit it caught
        # instead of raising it, which is how it reports Ctrl-C (130)
        code = app(argv, standalone_mode=False, obj={"command": command})
    except SanitizeError as e:
        if debug:
            raise
        err.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        return int(e.code)
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        err.print("aborted", highlight=False)
        return INTERRUPTED
    except Exception as e:  # click's usage errors and real bugs
        # typer vendors its own click; both spell usage errors as ClickException with format_message()
        if any(c.__name__ == "ClickException" for c in type(e).__mro__):
            # a bare `sanitize` has printed the help and has no message of its own
            message = e.format_message().strip() or "nothing to do: sanitize MODEL --calib DATA --out OUT (commands above)"
            err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
            return int(ExitCode.USAGE)
        if debug:
            raise
        err.print(f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]} (rerun with --debug for a traceback)",
                  highlight=False, markup=False, soft_wrap=True)
        return int(ExitCode.INTERNAL)
    if code == INTERRUPTED:
        err.print("aborted", highlight=False)
        return INTERRUPTED
    return 0
