"""``evomerge evaluate``: score a model folder with a fitness definition."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from evomerge.cli.logs import setup_logging
from evomerge.errors import ModelError


@click.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--fitness", "fitness_file", required=True, type=click.Path(path_type=Path),
              help="Fitness definition YAML.")
@click.option("--split", default="search", show_default=True, type=click.Choice(["search", "test"]),
              help="search: what a search optimizes; test: the held-out items.")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most N documents per lm-eval metric (both splits), for a quick check.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", default=0, show_default=True, type=int, help="Torch seed (sampled generation).")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of a table.")
@click.option("--quiet", "-q", is_flag=True, help="Warnings only.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def evaluate(model_dir: Path, fitness_file: Path, split: str, limit: int | None, device: str, seed: int,
             as_json: bool, quiet: bool, verbose: bool) -> None:
    """Score the model in MODEL_DIR on every metric of a fitness definition."""
    import torch
    from transformers import AutoTokenizer

    from evomerge.engine.execute import resolve_device
    from evomerge.fitness import load_fitness
    from evomerge.live.modeling import load_model

    setup_logging(quiet, verbose)
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    fitness = load_fitness(fitness_file, limit=limit)
    resolved = resolve_device(device)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as error:
        raise ModelError(f"{model_dir}: cannot load its tokenizer: {str(error).splitlines()[0]}") from None
    model = load_model(model_dir, device=resolved)
    torch.manual_seed(seed)
    scores = fitness.evaluate(model, tokenizer, split)
    objectives = dict(zip(fitness.metric_names, fitness.objectives(scores)))
    if as_json:
        click.echo(json.dumps({"model": str(model_dir), "split": split, "scores": scores,
                               "objectives": objectives}, indent=2))
    else:
        click.echo(format_table(fitness, scores, objectives))


def format_table(fitness, scores: dict[str, float], objectives: dict[str, float]) -> str:
    """Metric | value | direction | weight rows, then the objective value(s)."""
    rows = [("metric", "value", "direction", "weight")]
    for name, value in scores.items():
        metric = fitness.metrics.get(name)
        rows.append((name, f"{value:.6g}", metric.direction if metric else "",
                     f"{metric.weight:g}" if metric else ""))
    rows += [(f"objective {name}", f"{value:.6g}", direction, "")
             for (name, value), direction in zip(objectives.items(), fitness.directions)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [" | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                        enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
