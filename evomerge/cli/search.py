"""``evomerge search | status | export | report``: run a search, look at it, export its best merge, report."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import click

from evomerge.cli.logs import setup_logging
from evomerge.errors import EvomergeError
from evomerge.io.writer import write_text_atomic


class OneLineCommand(click.Command):
    """A command whose usage errors (bad option values, missing arguments) are one ``error:``
    line and exit code 2, like every other bad input (the CLI's EvomergeError handling)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as error:
            raise EvomergeError(f"{ctx.command_path}: {error.format_message()}") from None

_study_options = [
    click.option("--study", default=None, help="Study name (default: the experiment's name)."),
    click.option("--storage", default=None,
                 help="Optuna storage URL (default: the experiment's, else sqlite:///runs/studies/<name>.db)."),
]


def study_options(command):
    for option in reversed(_study_options):
        command = option(command)
    return command


@click.command(cls=OneLineCommand)
@click.argument("experiment", type=click.Path(path_type=Path))
@study_options
@click.option("--n-trials", type=click.IntRange(min=1), default=None,
              help="Stop when the study has this many finished trials (default: the experiment's budget).")
@click.option("--timeout", type=float, default=None, help="Stop starting new trials after this many seconds.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the experiment's).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Local worker processes on the study (default: one per --devices entry, else 1).")
@click.option("--devices", default=None,
              help="Comma list of devices, one worker each (cycled when --workers is larger), e.g. cuda:0,cuda:1.")
@click.option("--heartbeat", type=click.IntRange(min=1), default=30, show_default=True,
              help="Seconds between heartbeats of a running trial; a trial silent for 3 heartbeats is failed "
                   "and retried by another worker.")
@click.option("--seed", type=int, default=None, help="Sampler seed (default: the experiment's optimizer.seed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging.")
def search(experiment: Path, study: str | None, storage: str | None, n_trials: int | None, timeout: float | None,
           device: str | None, workers: int | None, devices: str | None, heartbeat: int, seed: int | None,
           quiet: bool, verbose: bool) -> None:
    """Create, resume or join the study of EXPERIMENT.yaml (or of a shipped experiment: its name,
    e.g. zoo_ps) and run trials until its budget is spent.

    Any number of `evomerge search` processes, on any hosts, may run one study at once when
    they share its --storage (PostgreSQL, or a journal file on a shared filesystem)."""
    from evomerge.analysis.results import summarize
    from evomerge.search.distributed.workers import WorkerOptions, run_workers, worker_devices
    from evomerge.search.driver import run_search
    from evomerge.search.experiment import load_experiment

    setup_logging(quiet, verbose)
    if device is not None and devices is not None:
        raise EvomergeError("--device and --devices: give one of them")
    loaded = load_experiment(experiment)
    if seed is not None:
        loaded.optimizer.seed = seed
    if workers is None and devices is None:
        result = run_search(loaded, study_name=study, storage=storage, n_trials=n_trials, timeout=timeout,
                            device=device, progress=not quiet, heartbeat=heartbeat)
    else:
        options = WorkerOptions(study, storage, n_trials, timeout, heartbeat,
                                log_setup=partial(setup_logging, quiet, verbose))
        result = run_workers(loaded, worker_devices(workers, devices, device or loaded.device), options)
    click.echo(summarize(result.study))


@click.command(cls=OneLineCommand)
@click.argument("experiment", required=False, type=click.Path(path_type=Path))
@study_options
def status(experiment: Path | None, study: str | None, storage: str | None) -> None:
    """Trials, best trial and time spent of a study (from EXPERIMENT or --study/--storage)."""
    from evomerge.analysis.results import locate_study, open_study, summarize

    click.echo(summarize(open_study(*locate_study(experiment, study, storage))))


@click.command(cls=OneLineCommand)
@click.argument("experiment", required=False, type=click.Path(path_type=Path))
@study_options
@click.option("--trial", "trial_number", type=int, default=None, help="Trial number (default: the best).")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Write the YAML here (default: print it).")
def export(experiment: Path | None, study: str | None, storage: str | None, trial_number: int | None,
           output: Path | None) -> None:
    """The merge config of the best (or a chosen) trial, as YAML for `evomerge merge` / `mergekit-yaml`."""
    from evomerge.analysis.results import export_yaml, locate_study, open_study, pick_trial

    loaded = open_study(*locate_study(experiment, study, storage))
    text = export_yaml(loaded, pick_trial(loaded, trial_number))
    if output is None:
        click.echo(text, nl=False)
    else:
        write_text_atomic(output, text)
        logging.getLogger("evomerge").info("wrote %s", output)


@click.command(cls=OneLineCommand)
@click.argument("experiment", required=False, type=click.Path(path_type=Path))
@study_options
@click.option("--output", "-o", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write (index.html, PNGs, trials.csv, heldout.md/json, paired.json).")
@click.option("--no-heldout", is_flag=True, help="Leave out the held-out table (no model is loaded or scored).")
@click.option("--device", default=None, help="Device for the held-out scores (default: the experiment's).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, warnings only.")
def report(experiment: Path | None, study: str | None, storage: str | None, out_dir: Path, no_heldout: bool,
           device: str | None, force: bool, quiet: bool) -> None:
    """Plots, held-out scores (test split) and tables of a study, as an offline HTML report.

    The models and fitness come from EXPERIMENT when given, else from the experiment the
    study recorded."""
    import matplotlib

    from evomerge.analysis.report import open_report_source, write_report

    matplotlib.use("Agg")
    setup_logging(quiet, False)
    source = open_report_source(experiment, study, storage, heldout=not no_heldout, device=device)
    path = write_report(source, out_dir, heldout=not no_heldout, force=force, progress=not quiet)
    if not quiet:
        click.echo(f"report written to {path / 'index.html'}")
