"""The ``evomerge`` command line: thin wrappers over the library.

Exit codes: 0 success, 2 bad input (config, model files, options), 1 unexpected failure.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from evomerge.cli.commands import adamerge, inspect, soup
from evomerge.cli.evaluate import evaluate
from evomerge.cli.gguf import import_gguf
from evomerge.cli.init import init
from evomerge.cli.logs import setup_logging
from evomerge.cli.search import export, report, search, status
from evomerge.cli.zoo import zoo
from evomerge.errors import EvomergeError
from evomerge.io.writer import parse_size

log = logging.getLogger("evomerge")


class _Group(click.Group):
    """Turns EvomergeError into a one-line message and exit code 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EvomergeError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="evomerge")
def main() -> None:
    """Merge fine-tuned LLMs that share a base model, and search for the best merge."""


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed for DARE/DELLA masks (with the tensor name).")
@click.option("--out-shard-size", default="5GB", show_default=True,
              help="Largest output shard, e.g. 5GB or 500M.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty OUT_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def merge(config: Path, out_dir: Path, device: str, seed: int, out_shard_size: str, force: bool,
          quiet: bool, verbose: bool) -> None:
    """Merge the models of a mergekit-style CONFIG.yaml into OUT_DIR."""
    from evomerge.engine.merge import merge as run_merge

    setup_logging(quiet, verbose)
    shard_size = parse_size(out_shard_size)
    path = run_merge(config, out_dir, seed=seed, device=device, shard_size=shard_size,
                     force=force, progress=not quiet)
    if not quiet:
        click.echo(f"merged model written to {path}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Work folder: the zoo goes to runs/zoo in it, the study, best.yaml and the report to runs/demo "
                   "(default: the current directory).")
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Finished trials to reach (default: the experiment's budget).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the experiment's).")
@click.option("--seed", default=None, type=int, help="Sampler seed (default: the experiment's).")
@click.option("--quiet", "-q", is_flag=True, help="Only the result table.")
def demo(workdir: Path | None, n_trials: int | None, device: str | None, seed: int | None, quiet: bool) -> None:
    """Copy the shipped tiny model zoo in if no zoo is there, search for its best merge, export it, write the report."""
    from evomerge.analysis.heldout import as_text, comparisons, heldout_table, paired_table
    from evomerge.cli.demo import run_demo

    setup_logging(quiet, False)
    rows, out = run_demo(workdir, n_trials=n_trials, device=device, seed=seed, progress=not quiet)
    click.echo(as_text(heldout_table(rows)))
    paired = comparisons(rows)
    if paired:
        click.echo("\npaired on the same held-out items (95% CI: paired bootstrap; p: sign test):")
        click.echo(as_text(paired_table(paired)))
    click.echo(f"best merge: {out / 'best.yaml'}  report: {out / 'report' / 'index.html'}")


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where models and merges go (default: runs/examples in the current directory).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", "-q", is_flag=True, help="Only the result table.")
def examples(workdir: Path | None, device: str, seed: int, quiet: bool) -> None:
    """Run every shipped example merge config on a synthetic tiny family."""
    from evomerge.cli.examples import format_table, run_examples

    setup_logging(quiet, False)
    rows = run_examples(workdir, seed=seed, device=device, progress=not quiet)
    click.echo(format_table(rows))
    click.echo(f"merged models are in {rows[0]['out'].parent}")


@main.command()
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--arch", default="llama", show_default=True,
              type=click.Choice(["llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "gpt_neox"]))
@click.option("--size", default="tiny", show_default=True,
              type=click.Choice(["tiny", "small", "100m", "tinyllama"]))
@click.option("--sources", default=3, show_default=True, type=int, help="Number of fine-tunes.")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--seed", default=0, show_default=True, type=int)
def synth(out_dir: Path, arch: str, size: str, sources: int, dtype: str, seed: int) -> None:
    """Write a synthetic model family (base + fine-tune-like variants) to OUT_DIR."""
    from evomerge.engine.config import DTYPES
    from evomerge.zoo.synthetic import build_family

    paths = build_family(out_dir, arch, size=size, sources=sources, dtype=DTYPES[dtype], seed=seed)
    click.echo("\n".join(str(p) for p in paths))


for _command in (evaluate, search, status, export, report, inspect, soup, adamerge, import_gguf, init):
    main.add_command(_command)

main.add_command(zoo)

if __name__ == "__main__":  # pragma: no cover
    main()
