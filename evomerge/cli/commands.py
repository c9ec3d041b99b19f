"""``evomerge inspect``, ``evomerge soup`` and ``evomerge adamerge``: thin wrappers over the library."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import click

from evomerge.cli.logs import setup_logging
from evomerge.cli.search import study_options
from evomerge.errors import ConfigError, EvomergeError

log = logging.getLogger("evomerge")


@click.command(name="inspect")
@click.argument("models", nargs=-1, type=click.Path(path_type=Path))
@click.option("--plan-memory", "experiment", type=click.Path(path_type=Path), default=None,
              help="Instead: print the materializer's memory plan for this experiment (its models, device, dtype, "
                   "max_memory, max_host_memory, resident_dtype, trim_cache), from the files' headers only.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="Read at most N elements per tensor (its first rows); default: every element.")
@click.option("--strict", is_flag=True, help="Exit 2 when a source does not look fine-tuned from the base.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def inspect(models: tuple[Path, ...], experiment: Path | None, sample: int | None, strict: bool, as_json: bool,
            quiet: bool) -> None:
    """Check that MODELS (the base first, then the sources) can be merged: architecture, shapes,
    vocabularies, and task-vector statistics (relative norm, cosines, sign conflicts per layer).
    With --plan-memory EXPERIMENT: where the materializer of that experiment's search would keep
    each model's tensors (device, host memory, the files), and the memory bound's terms."""
    from evomerge.engine.inspect import format_report, inspect_models

    setup_logging(quiet, False)
    if experiment is not None:
        if models:
            raise EvomergeError("inspect --plan-memory: give the experiment only, not MODELS")
        click.echo(memory_plan(experiment).report())
        return
    if len(models) < 2:
        raise EvomergeError("inspect: give the base model and at least one source")
    report = inspect_models(models[0], models[1:], sample=sample, progress=not quiet)
    click.echo(json.dumps(asdict(report), indent=2) if as_json else format_report(report))
    unrelated = [s.path for s in report.flagged if s.verdict == "unrelated"]
    if strict and unrelated:
        raise EvomergeError(f"{unrelated[0]} does not look fine-tuned from {report.base}")


def memory_plan(path: Path):
    """The :class:`~evomerge.live.tiers.TierPlan` of the experiment at ``path`` (nothing is loaded),
    for the methods of its search space, as its search's materializer plans it."""
    import torch

    from evomerge.engine.architecture import num_layers
    from evomerge.engine.execute import resolve_device
    from evomerge.io.source import source_key
    from evomerge.live.tiers import open_inputs, plan_blocks, plan_tiers
    from evomerge.search.experiment import load_experiment
    from evomerge.search.spaces.loader import load_search_space

    experiment = load_experiment(path)
    # a CUDA experiment can be planned without the GPU when it sets max_memory
    device = resolve_device("auto") if experiment.device == "auto" else torch.device(experiment.device)
    folders = open_inputs(experiment.models.base, experiment.models.sources)
    base = source_key(experiment.models.base)
    space = load_search_space(experiment.search_space, models=[str(source_key(s)) for s in experiment.models.sources],
                              base_model=str(base), num_layers=num_layers(folders[base].config),
                              base_dir=Path.cwd(), source="search_space")
    options = dict(device=device, methods=space.methods, **experiment.materializer_options())
    plan = plan_tiers if space.spec.tokenizer_source else plan_blocks  # a tokenizer's vocabulary merges whole
    return plan(folders, base, **options)


@click.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--fitness", "fitness_file", required=True, type=click.Path(path_type=Path),
              help="Fitness definition YAML (one objective); its search split is the validation split.")
@click.option("--recipe", type=click.Choice(["greedy", "uniform"]), default="greedy", show_default=True)
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="The models' common base, for the compatibility check (not an ingredient).")
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Write the soup's mergekit linear YAML here.")
@click.option("--merge-to", type=click.Path(path_type=Path), default=None, help="Also write the merged model here.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Dtype the soups are merged and scored in (default: the models').")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N documents per lm-eval metric.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--seed", default=0, show_default=True, type=int, help="Torch seed (sampled generation).")
@click.option("--quiet", "-q", is_flag=True, help="Warnings only.")
def soup(models: tuple[Path, ...], fitness_file: Path, recipe: str, base: Path | None, output: Path,
         merge_to: Path | None, dtype: str | None, limit: int | None, device: str, seed: int, quiet: bool) -> None:
    """Model soup of MODELS, greedy or uniform (Wortsman et al., 2022): greedy ranks the ingredients by
    validation score and keeps each one only if the soup does not get worse."""
    import torch

    from evomerge.engine.config import DTYPES
    from evomerge.engine.merge import merge
    from evomerge.fitness import load_fitness
    from evomerge.io.writer import write_text_atomic
    from evomerge.live.materializer import Materializer
    from evomerge.recipes.soup import SoupScorer, format_steps, greedy_soup, soup_yaml, uniform_soup

    setup_logging(quiet, False)
    torch.manual_seed(seed)
    paths = [str(p) for p in models]
    fitness = load_fitness(fitness_file, limit=limit)
    template = str(base) if base is not None else paths[0]
    materializer = Materializer(template, [p for p in paths if p != template], device=device,
                                dtype=DTYPES[dtype] if dtype else None)
    scorer = SoupScorer(materializer, fitness, dtype=dtype)
    result = (greedy_soup if recipe == "greedy" else uniform_soup)(scorer, paths)
    write_text_atomic(output, soup_yaml(result, recipe))
    if result.steps:
        click.echo(format_steps(result))
    click.echo(f"{recipe} soup of {len(result.ingredients)}: validation objective {result.objective:.4g}; "
               f"config written to {output}")
    if merge_to is not None:
        click.echo(f"merged model written to {merge(result.config, merge_to, device=device, progress=not quiet)}")


@click.command()
@click.argument("experiment", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Write the learned merge (task_arithmetic YAML) here.")
@click.option("--granularity", type=click.Choice(["layer", "task"]), default="layer", show_default=True,
              help="One coefficient per source and layer (+ embeddings/head), or per source.")
@click.option("--steps", type=click.IntRange(min=0), default=100, show_default=True)
@click.option("--lr", type=float, default=5e-3, show_default=True, help="Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Prompts per step.")
@click.option("--answer-tokens", type=click.IntRange(min=1), default=3, show_default=True,
              help="Positions after each prompt whose prediction entropy is minimized.")
@click.option("--init", type=float, default=0.3, show_default=True,
              help="Starting coefficient of every source (without --from-study).")
@click.option("--bounds", type=float, nargs=2, default=None,
              help="Clip the coefficients to [LOW, HIGH] (default: [0, 1], widened to include the start).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help="Unlabeled prompts (.txt lines or .jsonl); default: the fitness's search-split inputs.")
@click.option("--prompt-field", default="prompt", show_default=True, help="Field of a .jsonl prompts file.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N prompts.")
@click.option("--from-study", is_flag=True, help="Start from a study's trial (the experiment's study by default).")
@study_options
@click.option("--trial", "trial_number", type=int, default=None, help="With --from-study: the trial (default: best).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the experiment's).")
@click.option("--seed", type=int, default=None, help="Seed of the prompt order (default: the experiment's seed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
def adamerge(experiment: Path, output: Path, granularity: str, steps: int, lr: float, batch_size: int,
             answer_tokens: int, init: float, bounds: tuple[float, float] | None, prompts_file: Path | None,
             prompt_field: str, limit: int | None, from_study: bool, study: str | None, storage: str | None,
             trial_number: int | None, device: str | None, seed: int | None, quiet: bool) -> None:
    """AdaMerging: learn task_arithmetic coefficients of EXPERIMENT.yaml's models by minimizing the
    merge's prediction entropy on unlabeled prompts (Yang et al., 2024); write them as a merge YAML."""
    from evomerge.analysis.results import locate_study
    from evomerge.engine.config import torch_dtype
    from evomerge.fitness import load_fitness
    from evomerge.io.writer import write_text_atomic
    from evomerge.recipes.adamerge import AdaMerger, AdaMergeSettings, coefficient_table
    from evomerge.recipes.adamerge_inputs import fitness_prompts, read_prompts, trial_start
    from evomerge.search.experiment import load_experiment

    setup_logging(quiet, False)
    loaded = load_experiment(experiment)
    if (study or storage or trial_number is not None) and not from_study:
        raise ConfigError("--study, --storage and --trial need --from-study", field="from_study")
    if prompts_file is not None:
        prompts = read_prompts(prompts_file, prompt_field)
    else:
        spec = loaded.fitness
        prompts = fitness_prompts(load_fitness(spec if isinstance(spec, dict) else Path(spec)), "search")
    prompts = prompts[:limit]
    merger = AdaMerger(loaded.models.base, loaded.models.sources, granularity=granularity,
                       device=device or loaded.device, dtype=torch_dtype(loaded.dtype), answer_tokens=answer_tokens)
    start = (trial_start(merger, *locate_study(experiment, study, storage), trial_number) if from_study
             else merger.uniform(init))
    if bounds is None:
        bounds = (min(0.0, float(start.min())), max(1.0, float(start.max())))
    settings = AdaMergeSettings(steps=steps, lr=lr, batch_size=batch_size, answer_tokens=answer_tokens,
                                bounds=bounds, seed=loaded.seed if seed is None else seed)
    result = merger.train(prompts, start, settings, progress=not quiet)
    before, after = merger.mean_entropy(result.start, prompts), merger.mean_entropy(result.coefficients, prompts)
    header = (f"# evomerge adamerge {experiment} ({granularity}-wise, {steps} steps, lr {lr}, {len(prompts)} prompts): "
              f"entropy {before:.4f} -> {after:.4f} nats\n")
    write_text_atomic(output, header + merger.config(result.coefficients).to_yaml())
    click.echo(coefficient_table(merger, result))
    click.echo(f"mean entropy at the first {answer_tokens} answer position(s) of {len(prompts)} prompts: "
               f"{before:.4f} -> {after:.4f} nats; merge written to {output}")
