"""Skill subtraction with negative task vectors (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089).

On a zoo (a base and one specialist per skill), remove one skill from the merge of the others
while keeping them: ``θ = θ_base + Σ_{kept} w·τ_kept − λ·τ_removed``. The comparison rows, all
scored through one :class:`~evomerge.live.materializer.Materializer` with a fitness definition:

* ``base`` and each source alone (a one-model ``linear`` soup, i.e. the model's own weights);
* ``merge``: task arithmetic of every source (weight ``w`` each, ``lambda`` 1);
* ``merge w/o S``: the same without the removed skill's source (leaving it out);
* ``merge − λ·S``: the kept sources plus the removed skill's negated task vector.

Subtraction works when the removed skill's score drops (below ``merge w/o S`` as well, the
control that only leaves the source out) while every kept skill stays within ``margin`` of
its score in ``merge``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from evomerge.engine.config import DTYPES, MergeConfig
from evomerge.errors import ConfigError, ModelError
from evomerge.fitness import Fitness
from evomerge.live.materializer import Materializer
from evomerge.recipes.soup import soup_config

log = logging.getLogger(__name__)
ZOO_SKILLS = ("increment", "reverse", "dates")
ZOO_FITNESS = "zoo_skills"  # the shipped fitness definition (evomerge.io.shipped)


def zoo_models(zoo: str | Path) -> tuple[str, dict[str, str]]:
    """The base and ``{skill: specialist}`` folders of a zoo (``zoo.json``'s skills, else the
    default skills), as absolute paths."""
    from evomerge.zoo.build import read_manifest

    zoo = Path(zoo).absolute()
    manifest = read_manifest(zoo)
    skills = manifest["skills"] if manifest else list(ZOO_SKILLS)
    paths = {name: zoo / name for name in ["base", *skills]}
    missing = [str(p) for p in paths.values() if not (p / "config.json").is_file()]
    if missing:
        raise ModelError(f"zoo {zoo}: model folder not found: {missing[0]}")
    return str(paths.pop("base")), {skill: str(path) for skill, path in paths.items()}


def zoo_table_parser(description: str) -> argparse.ArgumentParser:
    """The options every zoo table script shares (zoo folder, fitness, limit, device, quiet)."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("zoo", type=Path, nargs="?", default=Path("runs/zoo"), help="zoo folder")
    parser.add_argument("--fitness", default=ZOO_FITNESS, help="a shipped fitness name or a YAML file")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per lm-eval metric")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quiet", "-q", action="store_true")
    return parser


def zoo_table_inputs(args: argparse.Namespace) -> tuple[str, dict[str, str], Fitness]:
    """Logging set up from ``--quiet``; the zoo's base, ``{skill: specialist}`` and the fitness."""
    from evomerge.fitness import load_fitness

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    base, sources = zoo_models(args.zoo)
    return base, sources, load_fitness(args.fitness, limit=args.limit)


def _task_arithmetic(base: str, weights: dict[str, float], dtype: str) -> MergeConfig:
    return MergeConfig.model_validate({
        "merge_method": "task_arithmetic", "base_model": base, "dtype": dtype, "parameters": {"lambda": 1.0},
        "models": [{"model": path, "parameters": {"weight": w}} for path, w in weights.items()]})


def subtraction_configs(base: str, sources: dict[str, str], remove: str, *, weight: float = 1.0,
                        lam: float = 1.0, dtype: str = "float32") -> dict[str, MergeConfig]:
    """The table's rows as merge configs, by label (see the module docstring)."""
    if remove not in sources:
        raise ConfigError(f"no source for skill {remove!r}; expected one of: {', '.join(sources)}", field="remove")
    kept = {path: weight for skill, path in sources.items() if skill != remove}
    rows = {"base": soup_config([base], dtype)}
    rows.update({skill: soup_config([path], dtype) for skill, path in sources.items()})
    rows["merge"] = _task_arithmetic(base, {path: weight for path in sources.values()}, dtype)
    rows[f"merge w/o {remove}"] = _task_arithmetic(base, kept, dtype)
    rows[f"merge − {lam:g}·{remove}"] = _task_arithmetic(base, {**kept, sources[remove]: -lam}, dtype)
    return rows


def score_configs(base: str, sources: list[str], configs: dict[str, MergeConfig], fitness: Fitness, *,
                  split: str = "test", device: str = "cpu", dtype: str = "float32") -> list[dict[str, Any]]:
    """``[{"label", "metrics"}]``: each config written into one live model and scored on ``split``."""
    materializer = Materializer(base, sources, device=device, dtype=DTYPES[dtype])
    rows = []
    for label, config in configs.items():
        model = materializer.apply(config)
        rows.append({"label": label, "metrics": fitness.evaluate(model, materializer.tokenizer, split)})
        log.info("%s: %s", label, rows[-1]["metrics"])
    return rows


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """The rows' ``columns`` metrics as an aligned plain-text table."""
    width = max(len(r["label"]) for r in rows + [{"label": "model"}])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>11}" for c in columns)]
    lines += [f"{r['label']:<{width}}  " + "  ".join(f"{r['metrics'][c]:>11.4g}" for c in columns) for r in rows]
    return "\n".join(lines)


def verdict(rows: list[dict[str, Any]], remove: str, skills: list[str], margin: float) -> str:
    """Whether the removed skill dropped and each kept skill stayed within ``margin`` of the merge."""
    by_label = {r["label"]: r["metrics"] for r in rows}
    merge, control = by_label["merge"], by_label[f"merge w/o {remove}"]
    subtracted = next(r["metrics"] for r in rows if r["label"].startswith("merge − "))
    lines = [f"{remove}: merge {merge[remove]:.4g}, left out {control[remove]:.4g}, subtracted "
             f"{subtracted[remove]:.4g} ({'lower' if subtracted[remove] < control[remove] else 'not lower'} "
             "than leaving it out)"]
    for skill in skills:
        if skill != remove:
            change = subtracted[skill] - merge[skill]
            lines.append(f"{skill}: merge {merge[skill]:.4g}, subtracted {subtracted[skill]:.4g} "
                         f"({change:+.4g}; {'within' if abs(change) <= margin else 'outside'} ±{margin:g})")
    return "\n".join(lines)
