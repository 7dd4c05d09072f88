"""The command line: parses options, calls the API, prints. No logic the API lacks."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import traceback

import click

from . import api, calibration
from .decide import DIRECTIONS
from .errors import GconvError, InternalError
from .geometry import FORMS
from .model_io import check_writable
from .report import Decision
from .runtime import PROVIDERS, stdout_for_one_document
from .verify import load_inputs

_DOCUMENT = []  # while a --json command runs: the stream reserved for its JSON (see _json_only)


def _echo(text: str = "", err: bool = False, nl: bool = True) -> None:
    """click.echo that survives a closed pipe (`... | head`): the rest of the output is dropped,
    the work (and the output file) is not. Under --json, stdout text goes to the reserved stream."""
    try:
        click.echo(text, err=err, nl=nl, file=_DOCUMENT[-1] if _DOCUMENT and not err else None)
    except BrokenPipeError:
        stream = sys.stderr if err else _DOCUMENT[-1] if _DOCUMENT else sys.stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


class _DefaultGroup(click.Group):
    """`gconv-rewrite MODEL -o OUT` runs the `rewrite` command; `gconv-rewrite verify A B` a subcommand."""

    def parse_args(self, ctx, args):
        if "--debug" in args:  # anywhere before a lone "--": tracebacks of internal errors (see _guard)
            cut = args.index("--") if "--" in args else len(args)
            if args.index("--debug") < cut:
                args = [a for i, a in enumerate(args) if not (a == "--debug" and i < cut)]
                os.environ[DEBUG_ENV] = "1"
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["rewrite"] + list(args)
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        """Usage errors as one line (exit 2), like every other bad input."""
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `gconv-rewrite`: the help, not an "error"
                _echo(exc.format_message(), err=True)
                sys.exit(2)
            _echo(f"error: {exc.format_message()} (see --help)", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _echo("interrupted; nothing written", err=True)
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"'{value}' is not NAME:DxDxD (e.g. input:1x3x224x224)",
                                     param_hint="--input-shape") from None
    return shapes


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gconv-rewrite")
@click.option("--debug", is_flag=True, help="Show the traceback of an internal error (anywhere on the line).")
def main(debug=False):
    """Rewrite grouped convolutions in ONNX models: native Conv(group=G) <-> depthwise emulation.

    \b
      gconv-rewrite MODEL -o OUT      rewrite to the fastest form per node, verify
      gconv-rewrite inspect MODEL     list grouped convs and emulations; no output
      gconv-rewrite tune MODEL        measure each form on this machine; cache it
      gconv-rewrite calibrate         fit the cost model to this machine (minutes)
      gconv-rewrite verify A B        compare two models: parity and latency

    Exit codes: 0 success, 1 verification failed (nothing written unless --force), 2 bad input
    or usage, 3 internal error (a bug: --debug shows its traceback).
    """


def _provider_option(help_text: str = "onnxruntime provider (auto: CUDA if it really runs here, else CPU)."):
    """--provider, declared once; each command says what the provider is for."""
    return click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True, help=help_text)


def _input_shape_option(help_text: str):
    """--input-shape NAME:DxD.. (repeatable), declared once."""
    return click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD..",
                        callback=lambda ctx, param, value: _parse_shapes(value), help=help_text)


def _cache_option(help_text: str = "Tuning cache file (default: $GCONV_REWRITE_CACHE or "
                                   "~/.cache/gconv-rewrite/tune.json)."):
    """--cache FILE, declared once."""
    return click.option("--cache", type=click.Path(dir_okay=False), default=None, help=help_text)


def _device_option(help_text: str):
    """--device GPU_MODEL, declared once."""
    return click.option("--device", default=None, metavar="GPU_MODEL", help=help_text)


def _profile_option(fn):
    """--profile: plan with a named cost profile (e.g. for another machine) instead of this device's."""
    return click.option("--profile", default=None, metavar="NAME|FILE.json",
                        help="Cost profile to plan with: a shipped one (cpu, cpu-zen5-avx512) or a file "
                             "(default: this device's calibration, else the closest machine class).")(fn)


def _json_option(help_text: str = "Print only the JSON report on stdout."):
    """--json, declared once."""
    return click.option("--json", "as_json", is_flag=True, help=help_text)


def _report_option(help_text: str):
    """--report R.json, declared once."""
    return click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help=help_text)


def _verify_options(fn):
    """Options shared by the main command and `verify`."""
    options = [
        _provider_option(),
        _input_shape_option("Resolve symbolic input dims (repeatable); a symbolic batch defaults to 2."),
        click.option("--inputs", "input_files", multiple=True, type=click.Path(dir_okay=False, exists=True),
                     metavar="FILE.npz", help="Input sample (arrays named after the graph inputs); repeatable."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of generated inputs."),
        click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Override the limit on each output's error relative to its magnitude."),
        click.option("--compare-all", is_flag=True, help="On a mismatch, name the first node whose outputs diverge."),
        click.option("--no-latency", is_flag=True, help="Check parity only; do not time the models."),
        click.option("--rounds", type=click.IntRange(3, 10000), default=20, show_default=True,
                     help="Interleaved timing rounds."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _verify_kwargs(provider, input_shapes, input_files, seed, tolerance, compare_all, no_latency, rounds, quiet=False):
    return dict(provider=provider, input_shapes=input_shapes, seed=seed,
                inputs=load_inputs(list(input_files)) if input_files else None, tolerance=tolerance,
                compare_all=compare_all, latency=not no_latency, rounds=rounds, progress=_progress("timing", quiet))


def _announce_load(path, quiet: bool = False) -> None:
    """On a terminal, say that a big model is being read (the only step without a bar)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if not quiet and size > 100 * 2**20 and sys.stderr.isatty():
        _echo(f"loading {path} ({size / 2**20:.0f} MiB) ...", err=True)


def _progress(label, quiet: bool = False):
    """A progress bar on a terminal (stderr), nothing otherwise (pipes, CI logs, --json, -q)."""
    if quiet or not sys.stderr.isatty():
        return None

    def update(done, total):
        width = 24
        filled = int(width * done / max(total, 1))
        _echo(f"\r{label:<8} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", err=True, nl=done == total)
    return update


@main.command("rewrite")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the rewritten model.")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="auto", show_default=True,
              help="fuse: emulations -> one Conv; expand: grouped Conv -> depthwise emulation; auto: per node.")
@click.option("--form", type=click.Choice(FORMS), default=None,
              help="Force every grouped conv into one form (experiments): native, dw, split or dense.")
@click.option("--no-verify", is_flag=True, help="Do not prove the rewrite (no parity, no latency).")
@click.option("--force", is_flag=True, help="Write OUT even when parity fails (the exit code is still 1).")
@click.option("--in-place", is_flag=True, help="Allow OUT to be the input file.")
@_report_option("Also write the report as JSON (schema gconv-rewrite/rewrite-report, version 1).")
@_json_option()
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary and errors.")
@click.option("-v", "--verbose", is_flag=True, help="Also print each form's predicted (or measured) time per node.")
@click.option("--tune", "tune_first", is_flag=True,
              help="Measure this model's conv geometries in every form first (cached), and plan with the measurements.")
@click.option("--no-tune", is_flag=True,
              help="Do not measure this model's geometries first on a device without its own calibration.")
@_cache_option()
@_device_option("With --provider cuda --no-verify: plan for this GPU model's shipped CUDA profile.")
@_profile_option
@_verify_options
def rewrite_cmd(model, output, direction, form, no_verify, force, in_place, report_path, as_json, quiet, verbose,
                tune_first, no_tune, cache, device, profile, **verify_options):
    """Rewrite MODEL and write OUT, proven with onnxruntime unless --no-verify.

    auto (the default) picks per node the form the cost model predicts fastest on the target
    provider (measured times from `tune` win), and undoes the rewrite if the verified model
    is not faster beyond the noise."""
    if quiet and verbose:
        raise click.UsageError("-q and -v exclude each other")
    if form is not None and direction != "auto":
        raise click.UsageError(f"--form {form} decides every node; it cannot be combined with --direction {direction}")
    if tune_first and no_tune:
        raise click.UsageError("--tune and --no-tune exclude each other")
    planning = dict(tune_first=tune_first, auto_tune=False if no_tune else None, cache=cache, device=device,
                    profile=profile)
    _guard(_json_only(as_json, lambda: _rewrite(model, output, direction, form, no_verify, force, in_place,
                                                verify_options, report_path, as_json, quiet, verbose, planning)))


def _rewrite(model, output, direction, form, no_verify, force, in_place, verify_options, report_path=None,
             as_json=False, quiet=False, verbose=False, planning=None):
    if os.path.exists(output) and os.path.exists(model) and os.path.samefile(model, output) and not in_place:
        raise GconvError(f"-o {output} is the input model; pass --in-place to overwrite it")
    check_writable(output)  # before the work, not after
    if report_path:
        _check_report_path(report_path, model, output)
    kwargs = _verify_kwargs(**verify_options, quiet=quiet or as_json)
    _announce_load(model, quiet or as_json)
    result = api.rewrite(model, direction, form=form, verify_result=not no_verify, **(planning or {}),
                         tune_progress=_progress("tuning", quiet or as_json), **kwargs)
    say = (lambda *a, **k: None) if as_json else _echo
    if verbose:
        for d in result.decisions:
            line, parts = d.line(), []
            if d.spec is not None:  # the geometry with its spatial sizes, said once
                if d.spec.describe() in line:
                    line = line.replace(d.spec.describe(), d.spec.describe(shapes=True), 1)
                else:
                    parts.append(d.spec.describe(shapes=True))
            say(textwrap.fill(line, 80, subsequent_indent=" " * 11))
            if d.prediction is not None and d.prediction.times_ms:
                parts += [d.prediction.times_line(), d.prediction.work]
            for part in filter(None, parts):
                say(textwrap.fill(part, 80, initial_indent=" " * 4, subsequent_indent=" " * 6))
        say(textwrap.fill(f"cost model: {result.planner}", 80, subsequent_indent="  "))
    elif not quiet and result.decisions:
        say(Decision.TABLE_HEADER)
        for d in result.decisions:
            say(d.row())
            if d.reason:
                reason = d.reason + (f" [{d.code}]" if d.code else "")
                say(textwrap.fill(reason, 80, initial_indent=" " * 10, subsequent_indent=" " * 12))
        if any(d.prediction is not None and d.prediction.basis == "measured" for d in result.decisions):
            say("(* measured by tune; other times predicted by the cost model)")
    if result.tuning is not None and not quiet:
        say(textwrap.fill(result.tuning.summary(), 80, subsequent_indent="  "))
    if not verbose and not quiet and result.decisions:  # what the picks rest on, in every report
        say(textwrap.fill(f"cost model: {result.planner}", 80, subsequent_indent="  "))
    for line in result.summary():
        say(line)
    report = result.verification
    if report is not None:
        shown = report.lines()[:1] + ([report.latency.line()] if report.latency else []) if quiet else report.lines()
        for line in shown:
            say(line)
    data = result.to_dict() | {"output": output}
    failed = report is not None and not report.passed and not force
    data["written"] = False
    try:
        if not failed:
            result.save(output)
            data["written"] = True
    except GconvError as exc:
        data["error"] = str(exc)
        raise
    finally:  # the report says what really happened, including a failed save
        if report_path:
            _write_json(report_path, data)
        if as_json:
            _echo(json.dumps(data, indent=2, default=_jsonable))
    if failed:
        _echo(f"error: the rewritten model fails parity; {output} not written (use --force to write it anyway)",
              err=True)
        sys.exit(1)
    if result.count("reverted"):
        say(f"wrote {output} (the input, unchanged: the rewrite was reverted)")
    else:
        say(f"wrote {output}" + ("" if result.changed else " (same graph as the input: nothing to rewrite)"))
    if report is not None and not report.passed:  # --force: written, but a pipeline must still see the failure
        _echo(f"error: the rewritten model fails parity; {output} written anyway (--force)", err=True)
        sys.exit(1)


def _check_report_path(report_path, *models) -> None:
    """--report must not land on a model (the input, or OUT, which would then overwrite it)."""
    for path in models:
        same = os.path.abspath(report_path) == os.path.abspath(path) or (
            os.path.exists(report_path) and os.path.exists(path) and os.path.samefile(report_path, path))
        if same:
            raise GconvError(f"--report {report_path} is also a model path; choose another file")
    check_writable(report_path)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _write_json(path, data) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, default=_jsonable)
        os.replace(tmp, path)
    except OSError as exc:
        raise GconvError(f"{path}: cannot write the report ({exc.strerror or exc})") from None


@main.command("inspect")
@click.argument("model", type=click.Path(dir_okay=False))
@_json_option("Print the findings as JSON only.")
@_provider_option("The target whose predicted times are shown.")
@_cache_option("Tuning cache file (see `tune`).")
@_input_shape_option("Give symbolic input dims a size for the predictions (repeatable).")
@_device_option("With --provider cuda: plan for this GPU model's shipped CUDA profile (e.g. 'NVIDIA H200').")
@_profile_option
def inspect_cmd(model, as_json, provider, cache, input_shapes, device, profile):
    """List every grouped Conv and emulation in MODEL: what it computes, each form's predicted time,
    why a near-miss is one. Writes nothing."""
    def run():
        _announce_load(model, as_json)
        _print_report(api.inspect(model, provider, cache=cache, input_shapes=input_shapes, device=device,
                                  profile=profile), as_json)
    _guard(_json_only(as_json, run))


@main.command("tune")
@click.argument("model", type=click.Path(dir_okay=False))
@_provider_option("The provider to measure on (auto: CUDA if it really runs here, else CPU).")
@click.option("--rounds", type=click.IntRange(3, 1000), default=9, show_default=True,
              help="Timing rounds per geometry.")
@_cache_option("Cache file (default: $GCONV_REWRITE_CACHE or ~/.cache/gconv-rewrite/tune.json).")
@click.option("--force", is_flag=True, help="Measure again geometries already in the cache.")
@_json_option("Print the measurements as JSON only.")
@_input_shape_option("Give symbolic input dims a size, so that those convs can be measured (repeatable).")
def tune_cmd(model, provider, rounds, cache, force, as_json, input_shapes):
    """Measure every grouped-conv geometry of MODEL in each exact form on this machine, and cache it.

    Later rewrites (and inspect) use the measured times instead of the cost model's predictions."""
    def run():
        _announce_load(model, as_json)
        _print_report(api.tune(model, provider, rounds=rounds, cache=cache, force=force,
                               input_shapes=input_shapes, progress=_progress("tuning", as_json)), as_json)
    _guard(_json_only(as_json, run))


@main.command("calibrate")
@_provider_option("The provider to calibrate (auto: CUDA if it really runs here, else CPU).")
@click.option("--minutes", type=click.FloatRange(0, min_open=True), default=4.0, show_default=True,
              help="Stop starting new measurements after this long (a rerun resumes).")
@click.option("--count", type=click.IntRange(1, 2000), default=160, show_default=True,
              help="Geometries to measure in all.")
@click.option("--rounds", type=click.IntRange(3, 1000), default=5, show_default=True,
              help="Timing rounds per geometry.")
@click.option("--fresh", is_flag=True, help="Forget this device's earlier calibration and start again.")
@_json_option("Print the report as JSON only.")
def calibrate_cmd(provider, minutes, count, rounds, fresh, as_json):
    """Calibrate the cost model on this machine: time every form on a grid of conv geometries and fit.

    Stored per device beside the tune cache; rewrite, inspect and --no-verify use it from then on."""
    def run():
        _print_report(calibration.calibrate(provider, minutes=minutes, count=count, rounds=rounds, fresh=fresh,
                                            progress=_progress("calibrate", as_json)), as_json)
    _guard(_json_only(as_json, run))


def _print_report(report, as_json: bool) -> None:
    """A report's lines, or (--json) only its JSON on stdout."""
    if as_json:
        _echo(json.dumps(report.to_dict(), indent=2, default=_jsonable))
    else:
        for line in report.lines():
            _echo(line)


@main.command("verify")
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@_report_option("Also write the report as JSON (schema gconv-rewrite/verify-report, version 1).")
@_json_option()
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdicts.")
@_verify_options
def verify_cmd(reference, candidate, report_path, as_json, quiet, **verify_options):
    """Compare two models with the same inputs and outputs: parity of every output, and latency.

    Exit 1 when an output differs beyond its tolerance."""
    def run():
        if report_path:
            _check_report_path(report_path, reference, candidate)
        report = api.verify(reference, candidate, **_verify_kwargs(**verify_options, quiet=quiet or as_json))
        data = report.to_dict() | {"reference": reference, "candidate": candidate}
        if report_path:
            _write_json(report_path, data)
        if as_json:
            _echo(json.dumps(data, indent=2, default=_jsonable))
        else:
            lines = report.lines()
            for line in lines[:1] + ([report.latency.line()] if report.latency else []) if quiet else lines:
                _echo(line)
        if not report.passed:
            sys.exit(1)
    _guard(_json_only(as_json, run))


def _json_only(as_json: bool, fn):
    """--json: stdout carries the JSON document only; whatever libraries print goes to stderr."""
    if not as_json:
        return fn

    def run():
        with stdout_for_one_document() as document:
            _DOCUMENT.append(document)
            try:
                fn()
            finally:
                _DOCUMENT.pop()
    return run


def _guard(fn):
    """Run a command: the user's fault is one line (exit 2, or 1 for failed parity), the tool's is an internal
    error (exit 3) that says so, with the version and how to report it, and never a bare traceback."""
    try:
        fn()
    except GconvError as exc:
        _echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except MemoryError:
        _echo("error: out of memory", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _echo("interrupted; nothing written", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug of ours, and says so
        _internal_error(exc)


DEBUG_ENV = "GCONV_REWRITE_DEBUG"


def _internal_error(exc: BaseException) -> None:
    """A bug is not bad input: say it is ours, which version, and how to get the traceback to report it."""
    from . import __version__  # noqa: PLC0415 - __init__ imports this module: a top-level import would be a cycle
    text = str(exc).strip().splitlines()
    what = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    if _debug():
        traceback.print_exception(exc, file=sys.stderr)
    how = "" if _debug() else f"; rerun with --debug (or {DEBUG_ENV}=1) for the traceback"
    _echo(f"internal error in gconv-rewrite {__version__} ({what}): a bug in the tool, not a problem with your "
          f"model{how}, and report it with the command line", err=True)
    sys.exit(InternalError.exit_code)


def _debug() -> bool:
    """--debug (see _DefaultGroup) or GCONV_REWRITE_DEBUG=1: show tracebacks of internal errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")
