"""Build the tiny model zoo into a folder, once: ``base/``, one folder per skill, ``zoo.json``.

The zoo is built in a hidden temporary folder next to the destination and renamed into
place, so an interrupted build leaves nothing half-written. ``zoo.json`` records the
recipe and its hash, the skills and model paths, the build time, the versions the build ran
with (:func:`build_versions`) and the scores measured at build time (exact match on every
skill's test split and general perplexity, for the base and each specialist). A folder whose
manifest has the recipe's hash is reused as is.

**The shipped zoo.** The package ships the default recipe's zoo, weights included
(``evomerge/shipped/zoo``, about 20 MB of fp32 safetensors): building that recipe copies it
instead of training, so every machine runs the demo on the same models (the same recipe
trained with other library versions can give another zoo: issue #19). ``rebuild`` trains from
the recipe anyway.

Determinism: every random draw is seeded from the recipe, torch runs with
``use_deterministic_algorithms`` and a fixed thread count (``recipe.threads``), so the same
recipe on the same machine and torch build gives bit-identical weights.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import time
from importlib import metadata
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.errors import EvomergeError
from evomerge.io import shipped
from evomerge.io.writer import check_output_dir
from evomerge.zoo.evaluate import exact_match, perplexity
from evomerge.zoo.heldout import general_texts, skill_items
from evomerge.zoo.models import corpus, finetune, make_tokenizer, pretrain
from evomerge.zoo.recipe import Recipe

log = logging.getLogger(__name__)
MANIFEST = "zoo.json"
VERSIONED = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "evomerge")


def read_manifest(out_dir: str | Path) -> dict | None:
    """The zoo's ``zoo.json`` as a dict, or None when there is none."""
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def up_to_date(out_dir: Path, recipe_hash: str, *, rebuild: bool, force: bool) -> dict | None:
    """The manifest of the build of ``recipe_hash`` in ``out_dir`` when it is there (and not
    ``rebuild``); else None, after checking that ``out_dir`` may be (re)built: a zoo may be
    replaced, any other non-empty folder only with ``force``."""
    manifest = read_manifest(out_dir)
    if manifest and manifest["recipe_hash"] == recipe_hash and not rebuild:
        log.info("zoo %s is up to date in %s", recipe_hash, out_dir)
        return manifest
    check_output_dir(out_dir, force or manifest is not None)
    return None


def build_versions(*extra: str) -> dict[str, str]:
    """Python, the platform and the versions of the packages a build depends on (and ``extra``)."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in (*VERSIONED, *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def shipped_zoo() -> Path | None:
    """The folder of the zoo shipped with the package, or None when this install has none."""
    folder = shipped.root() / "zoo"
    return folder if (folder / MANIFEST).is_file() else None


def build_zoo(out_dir: str | Path, recipe: Recipe | None = None, *, rebuild: bool = False,
              force: bool = False, progress: bool = True) -> dict:
    """Put the zoo of ``recipe`` into ``out_dir`` unless it is already there; return its manifest.

    The shipped zoo is copied when it is this recipe's (module doc), unless ``rebuild``; else the
    zoo is trained. ``rebuild`` also replaces an up-to-date zoo in ``out_dir``. An existing zoo
    with another recipe is replaced; any other non-empty folder is refused unless ``force``
    (which implies ``rebuild``).
    """
    recipe = recipe or Recipe()
    out_dir = Path(out_dir).absolute()
    rebuild = rebuild or force
    manifest = up_to_date(out_dir, recipe.hash(), rebuild=rebuild, force=force)
    if manifest:
        return manifest
    source = shipped_zoo()
    if not rebuild and source is not None and read_manifest(source)["recipe_hash"] == recipe.hash():
        with staging(out_dir) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        log.info("copied the shipped zoo %s into %s (evomerge zoo --rebuild trains it)", recipe.hash(), out_dir)
        return read_manifest(out_dir)
    start = time.perf_counter()
    with deterministic(recipe.threads), staging(out_dir) as tmp:
        manifest = _build(tmp, recipe, progress)
        manifest["build_seconds"] = round(time.perf_counter() - start, 1)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("built zoo %s in %s (%.0f s)", recipe.hash(), out_dir, manifest["build_seconds"])
    return manifest


def _build(tmp: Path, recipe: Recipe, progress: bool) -> dict:
    text = corpus(recipe)
    tokenizer = make_tokenizer(recipe, text)
    tokens = torch.tensor(tokenizer.encode(text, add_special_tokens=False))
    models = {"base": pretrain(recipe, tokenizer, tokens, progress=progress)}
    for spec in recipe.specialists:
        models[spec.skill] = finetune(recipe, spec, models["base"], tokenizer, tokens,
                                      progress=progress)
    tests = {skill: skill_items(skill)["test"][:recipe.eval_items] for skill in recipe.skills}
    general = general_texts()["test"]
    scores = {}
    for name, model in models.items():
        model.save_pretrained(tmp / name)
        tokenizer.save_pretrained(tmp / name)
        scores[name] = {skill: exact_match(model, tokenizer, items) for skill, items in tests.items()}
        scores[name]["general_ppl"] = round(perplexity(model, tokenizer, general, context=recipe.context,
                                                        stride=recipe.context // 2), 4)
        log.info("%s: %s", name, scores[name])
    return {"recipe_hash": recipe.hash(), "recipe": recipe.to_dict(), "skills": recipe.skills,
            "paths": {name: name for name in models}, "scores": scores, "versions": build_versions()}


@contextmanager
def staging(out_dir: Path):
    """A fresh temporary folder next to ``out_dir``, renamed onto it on success, removed on failure."""
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def deterministic(threads: int):
    """Deterministic torch kernels on ``threads`` threads; the previous settings are restored."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if threads < 1:
        raise EvomergeError(f"recipe threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
