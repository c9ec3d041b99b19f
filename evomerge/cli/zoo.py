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
@click.argument("out_dir", type=click.Path(path_type=Path), default=Path("runs/zoo"))
@click.option("--force", is_flag=True, help="Rebuild even if OUT_DIR holds this recipe's zoo.")
@click.option("--set", "pairs", multiple=True, metavar="FIELD=VALUE",
              help="Override a recipe field (JSON value), e.g. --set pretrain_steps=100.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars, warnings only.")
def zoo(out_dir: Path, force: bool, pairs: tuple[str, ...], quiet: bool) -> None:
    """Build the tiny Llama zoo (a base and one specialist per skill) into OUT_DIR (default runs/zoo)."""
    from evomerge.zoo.build import MANIFEST, build_zoo
    from evomerge.zoo.recipe import Recipe

    setup_logging(quiet, False)
    manifest = build_zoo(out_dir, Recipe().override(**_overrides(pairs)), force=force,
                         progress=not quiet)
    click.echo(f"zoo {manifest['recipe_hash']} ({', '.join(manifest['skills'])}) is in {out_dir}; "
               f"manifest: {out_dir / MANIFEST}")
