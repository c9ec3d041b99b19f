"""``evomerge examples``: run every example merge config on a synthetic tiny family.

It builds a tiny Llama base with three fine-tune-like variants (cached under
``runs/examples/models`` of the current directory, or ``models/`` of ``--workdir``), merges
each shipped example config (``evomerge/shipped/experiments/merges/``) with the real engine,
loads every output with ``transformers``, checks a forward pass, and prints a table.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from evomerge.engine.config import parse_config
from evomerge.engine.merge import merge
from evomerge.errors import EvomergeError
from evomerge.io import shipped
from evomerge.io.reader import ModelFolder
from evomerge.zoo.synthetic import build_family

log = logging.getLogger(__name__)
DEFAULT_WORKDIR = Path("runs") / "examples"  # relative to the current directory
MODELS_PLACEHOLDER = "runs/examples/models"


def run_examples(workdir: Path | None = None, *, seed: int = 0, device: str = "cpu",
             progress: bool = True) -> list[dict]:
    """Run the demo and return one row per merge (method, seconds, depth, change vs base)."""
    from transformers import AutoModelForCausalLM

    folder = shipped.folder("experiments") / "merges"
    configs = sorted(folder.glob("*.yaml"))
    if not configs:
        raise EvomergeError(f"no example configs in {folder} (a broken install: they are package data)")
    workdir = Path(workdir or DEFAULT_WORKDIR).absolute()
    models_dir = workdir / "models"
    if not (models_dir / "ft3" / "model.safetensors").exists():
        log.info("building the tiny model family in %s", models_dir)
        build_family(models_dir, "llama", sources=3, seed=seed)
    base = ModelFolder(models_dir / "base")
    tokens = torch.arange(1, 33).unsqueeze(0)
    rows = []
    for config_path in configs:
        text = config_path.read_text().replace(MODELS_PLACEHOLDER, str(models_dir))
        config = parse_config(text, str(config_path))
        start = time.perf_counter()
        out = merge(config, workdir / "merged" / config_path.stem, seed=seed, device=device,
                    force=True, progress=progress)
        seconds = time.perf_counter() - start
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = model(tokens).logits
        if not torch.isfinite(logits).all():
            raise EvomergeError(f"{config_path.name}: merged model produced non-finite logits")
        state = model.state_dict()
        change_sq = scale_sq = 0.0
        for name in base.names():
            reference = base.tensor(name)
            if name in state and state[name].shape == reference.shape:
                change_sq += float((state[name] - reference).norm() ** 2)
                scale_sq += float(reference.norm() ** 2)
        rows.append({"config": config_path.name, "method": config.merge_method, "seconds": seconds,
                     "layers": model.config.num_hidden_layers,
                     "change": (change_sq / scale_sq) ** 0.5, "out": out})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'config':<22} {'method':<16} {'merge s':>8} {'layers':>6} {'|Δ|/|base|':>11}"]
    for row in rows:
        lines.append(f"{row['config']:<22} {row['method']:<16} {row['seconds']:>8.3f} "
                     f"{row['layers']:>6} {row['change']:>11.4f}")
    return "\n".join(lines)
