"""``evomerge import-gguf``: a GGUF file as a plain Hugging Face safetensors folder."""

from __future__ import annotations

from pathlib import Path

import click

from evomerge.cli.logs import setup_logging


@click.command(name="import-gguf")
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Dtype of the written tensors (quantized tensors are dequantized).")
@click.option("--force", is_flag=True, help="Replace an existing non-empty OUT_DIR.")
@click.option("--quiet", "-q", is_flag=True, help="Warnings only.")
def import_gguf(file: Path, out_dir: Path, dtype: str, force: bool, quiet: bool) -> None:
    """Import the GGUF FILE (as transformers loads it) into OUT_DIR: safetensors, config, tokenizer."""
    from evomerge.engine.config import DTYPES
    from evomerge.io.gguf import import_gguf as run_import

    setup_logging(quiet, False)
    path = run_import(file, out_dir, dtype=DTYPES[dtype], force=force)
    if not quiet:
        click.echo(f"imported model written to {path}")
