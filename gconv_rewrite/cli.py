"""The command line: parses options, calls the API, prints. No logic the API lacks."""

from __future__ import annotations

import os
import sys

import click

from . import api
from .errors import GconvError
from .rewrite import DIRECTIONS
from .runtime import PROVIDERS


class _DefaultGroup(click.Group):
    """`gconv-rewrite MODEL -o OUT` runs the `rewrite` command; `gconv-rewrite verify A B` a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["rewrite"] + list(args)
        return super().parse_args(ctx, args)


def _parse_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in values:
        name, sep, dims = value.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"'{value}' is not NAME:DxDxD (e.g. input:1x3x224x224)", param_hint="--input-shape")
    return shapes


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gconv-rewrite")
def main():
    """Rewrite grouped convolutions in ONNX models: native Conv(group=G) <-> depthwise emulation.

    \b
      gconv-rewrite MODEL -o OUT [--direction auto|expand|fuse]   rewrite and verify
      gconv-rewrite verify A.onnx B.onnx                          compare two models
    """


@main.command("rewrite")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Where to write the rewritten model.")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="auto", show_default=True,
              help="fuse: emulations -> one Conv; expand: grouped Conv -> depthwise emulation; auto: per node.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="onnxruntime provider for verification (auto: CUDA if it really runs, else CPU).")
@click.option("--no-verify", is_flag=True, help="Do not compare the rewritten model with the original.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD..", help="Resolve symbolic input dims for verification.")
@click.option("--force", is_flag=True, help="Write OUT even when verification fails.")
@click.option("--in-place", is_flag=True, help="Allow OUT to be the input file.")
def rewrite_cmd(model, output, direction, provider, no_verify, input_shapes, force, in_place):
    """Rewrite MODEL and write OUT (verified with onnxruntime unless --no-verify)."""
    _guard(lambda: _rewrite(model, output, direction, provider, no_verify, _parse_shapes(input_shapes), force, in_place))


def _rewrite(model, output, direction, provider, no_verify, shapes, force, in_place):
    if os.path.exists(output) and os.path.exists(model) and os.path.samefile(model, output) and not in_place:
        raise GconvError(f"-o {output} is the input model; pass --in-place to overwrite it")
    result = api.rewrite(model, direction, verify_result=not no_verify, provider=provider, input_shapes=shapes)
    for d in result.decisions:
        click.echo(d.line())
    counts = ", ".join(f"{result.count(a)} {a}" for a in ("fused", "expanded", "kept", "skipped"))
    click.echo(f"{len(result.decisions)} candidate(s): {counts}")
    report = result.verification
    if report is not None:
        for line in report.lines():
            click.echo(line)
        if not report.passed and not force:
            click.echo(f"error: the rewritten model fails parity; {output} not written (use --force to write it anyway)", err=True)
            sys.exit(1)
    result.save(output)
    click.echo(f"wrote {output}")


@main.command("verify")
@click.argument("reference", type=click.Path(dir_okay=False))
@click.argument("candidate", type=click.Path(dir_okay=False))
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME:DxD..")
@click.option("--seed", type=int, default=0, show_default=True)
def verify_cmd(reference, candidate, provider, input_shapes, seed):
    """Compare the outputs of two models on the same inputs (exit 1 on a mismatch)."""
    def run():
        report = api.verify(reference, candidate, provider, input_shapes=_parse_shapes(input_shapes), seed=seed)
        for line in report.lines():
            click.echo(line)
        if not report.passed:
            sys.exit(1)
    _guard(run)


def _guard(fn):
    try:
        fn()
    except GconvError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except MemoryError:
        click.echo("error: out of memory", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing written", err=True)
        sys.exit(130)
