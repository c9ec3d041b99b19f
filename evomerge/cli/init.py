"""``evomerge init``: write a commented experiment for your own models (:mod:`evomerge.search.init`)."""

from __future__ import annotations

from pathlib import Path

import click

from evomerge.cli.logs import setup_logging
from evomerge.cli.search import OneLineCommand


@click.command(name="init", cls=OneLineCommand)
@click.argument("base", type=click.Path(path_type=Path))
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="The experiment YAML to write (placeholder fitness text goes next to it).")
@click.option("--name", default=None, help="Experiment and study name (default: the file's name).")
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto: the device the search runs on (its memory is checked here).")
@click.option("--force", is_flag=True, help="Replace an existing OUTPUT.")
@click.option("--quiet", "-q", is_flag=True, help="Only the path written.")
def init(base: Path, sources: tuple[Path, ...], output: Path, name: str | None, device: str, force: bool,
         quiet: bool) -> None:
    """Inspect BASE and its SOURCE fine-tunes (model folders or LoRA adapters) and write a commented
    experiment for them: search space, optimizer, budget, storage, device, dtype and a fitness that
    `evomerge search` runs as written (perplexity on placeholder text; lm-eval tasks to fill in)."""
    from evomerge.search.init import init_experiment

    setup_logging(True, False)
    plan, written = init_experiment(str(base), [str(s) for s in sources], output, name=name, device=device,
                                    force=force)
    info = plan.info
    if not quiet:
        click.echo(f"base: {info.architecture}, {info.depth} layers, {info.dtype}, "
                   f"{info.parameters / 1e6:.4g} M parameters")
        for source, adapter in zip(info.sources, info.adapters):
            click.echo(f"  {source}: {'LoRA adapter' if adapter else 'full model'}")
        click.echo(f"search space: {plan.method}, {plan.genes} genes; device {info.device}")
        for warning in plan.warnings:
            click.echo(f"warning: {warning}", err=True)
    for path in written[1:]:
        click.echo(f"wrote placeholder fitness text {path}: replace it with your own")
    click.echo(f"wrote {written[0]}; run: evomerge search {written[0]}")
