"""``evomerge demo``: the main job on its embedded default.

Everything goes under ``runs/`` of the work folder (default: the current directory), the
layout a source checkout has always had: it copies the shipped tiny model zoo to ``runs/zoo``
when no zoo is there (a zoo already there is used as it is, e.g. one that ``evomerge zoo
--rebuild`` or ``--set seed=1`` built; the shipped experiment's model paths are relative to the
work folder), runs the shipped default experiment (``zoo_ps``) with a SQLite study
(``runs/demo/study.db``, resumed if it exists), exports the best trial's merge config
(``runs/demo/best.yaml``), writes the report (``runs/demo/report/``), and
returns the held-out table: the best merge vs the base, each specialist and the default
merges (the mean, task arithmetic, TIES, DARE-TIES), on the test split the search never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evomerge.io import shipped
from evomerge.search.experiment import Experiment, load_experiment

log = logging.getLogger(__name__)
DEFAULT_EXPERIMENT = "zoo_ps"
OUTPUTS = Path("runs") / "demo"  # in the work folder: study.db, best.yaml, report/


def run_demo(workdir: Path | None = None, *, experiment_path: str | Path = DEFAULT_EXPERIMENT,
             n_trials: int | None = None, device: str | None = None, seed: int | None = None,
             progress: bool = True) -> tuple[list[dict], Path]:
    """Run the demo in ``workdir`` (default: the current directory); return the held-out rows
    and the folder of its outputs (``workdir/runs/demo``). ``experiment_path`` is a shipped
    experiment name or a file."""
    from evomerge.analysis.heldout import heldout_rows
    from evomerge.analysis.report import write_report
    from evomerge.analysis.results import export_yaml, pick_trial
    from evomerge.io.writer import write_text_atomic
    from evomerge.search.driver import run_search
    from evomerge.zoo.build import build_zoo, read_manifest

    workdir = Path(workdir or ".").absolute()
    experiment = _anchored(load_experiment(experiment_path), workdir)
    out = workdir / OUTPUTS
    zoo_dir = Path(experiment.models.base).parent
    manifest = read_manifest(zoo_dir)
    if manifest is None:
        build_zoo(zoo_dir, progress=progress)
    else:
        log.info("using the zoo in %s (recipe %s)", zoo_dir, manifest["recipe_hash"])
    if seed is not None:
        experiment.optimizer.seed = seed
    search = run_search(experiment, storage=f"sqlite:///{out / 'study.db'}", n_trials=n_trials,
                        device=device, progress=progress)
    best = pick_trial(search.study)
    write_text_atomic(out / "best.yaml", export_yaml(search.study, best))
    rows = heldout_rows(search, [best], progress=progress)
    write_report(search, out / "report", rows=rows, force=True)
    log.info("best merge: %s; report: %s", out / "best.yaml", out / "report" / "index.html")
    return rows, out


def _anchored(experiment: Experiment, root: Path) -> Experiment:
    """The experiment with its relative model and fitness paths taken from ``root`` (a shipped
    fitness name stays a name)."""
    def anchor(path: str) -> str:
        return path if Path(path).is_absolute() or shipped.is_name(path) else str(root / path)

    experiment.models.base = anchor(experiment.models.base)
    experiment.models.sources = [anchor(p) for p in experiment.models.sources]
    if isinstance(experiment.fitness, str):
        experiment.fitness = anchor(experiment.fitness)
    return experiment
