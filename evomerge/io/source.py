"""Model references as configs and experiments write them, opened as one lazy folder view.

A reference is one of:

* ``path/to/model`` — a Hugging Face model folder (:class:`~evomerge.io.reader.ModelFolder`);
* ``path/to/adapter`` — a PEFT LoRA adapter folder; its base is the ``base`` given by the
  context (the merge config's ``base_model``, the experiment's or inspect's base), else its
  ``base_model_name_or_path`` when that is a local folder. When both are known they must be
  the same folder;
* ``path/to/base+path/to/adapter`` — mergekit's form: the adapter applied to that base
  (whatever its ``base_model_name_or_path`` says; the shapes are still checked).

Adapters open as :class:`~evomerge.io.adapter.AdapterFolder`, which reads like the model the
adapter makes of its base, so plans, methods and the engine need nothing else.
"""

from __future__ import annotations

import logging
from pathlib import Path

from evomerge.errors import ModelError
from evomerge.io.adapter import ADAPTER_CONFIG, AdapterFolder, LoraAdapter, is_adapter
from evomerge.io.reader import ModelFolder

log = logging.getLogger(__name__)

Folder = ModelFolder | AdapterFolder


def split_reference(reference: str | Path) -> tuple[str, str | None]:
    """``'base+adapter'`` → ``('base', 'adapter')``; a plain folder → ``(folder, None)``. A folder
    whose name holds a ``+`` is a plain folder when it exists."""
    text = str(reference)
    if "+" not in text or Path(text).is_dir():
        return text, None
    parts = text.split("+")
    if len(parts) != 2 or not all(parts):
        raise ModelError(f"{text}: expected a model folder, an adapter folder or BASE+ADAPTER")
    return parts[0], parts[1]


def source_key(reference: str | Path) -> Path:
    """A reference's identity: its folder resolved, or ``<base resolved>+<adapter resolved>``."""
    base, adapter = split_reference(reference)
    if adapter is None:
        return Path(base).resolve()
    return Path(f"{Path(base).resolve()}+{Path(adapter).resolve()}")


def open_model(reference: str | Path, base: str | Path | ModelFolder | None = None, *,
               opened: dict[Path, ModelFolder] | None = None) -> Folder:
    """Open a reference (see the module docstring). ``base``: the context's base model, for a
    bare adapter folder; ``opened``: model folders already open, by resolved path (filled in),
    so that adapters of one base share its reader. Raises :class:`ModelError`."""
    opened = {} if opened is None else opened

    def folder(path: str | Path | ModelFolder) -> ModelFolder:
        if isinstance(path, ModelFolder):
            return opened.setdefault(path.path.resolve(), path)
        if is_adapter(path):
            raise ModelError(f"{path} is an adapter folder, not a base model")
        key = Path(path).resolve()
        if key not in opened:
            opened[key] = ModelFolder(path)
        return opened[key]

    first, adapter_path = split_reference(reference)
    if adapter_path is not None:
        adapter = LoraAdapter(adapter_path)
        named = adapter.base_model_name_or_path
        if named and Path(named).is_dir() and Path(named).resolve() != Path(first).resolve():
            log.warning("%s: base_model_name_or_path is %s, applied to %s as written", adapter_path, named, first)
        return AdapterFolder(adapter, folder(first), str(reference))
    if not is_adapter(first):
        return folder(first)
    adapter = LoraAdapter(first)
    named = adapter.base_model_name_or_path
    named_dir = Path(named) if named and Path(named).is_dir() else None
    context = base.path if isinstance(base, ModelFolder) else base
    if context is not None and split_reference(context)[1] is not None:
        context = None  # the context's base is itself an adapter: only the adapter's own base applies
    if context is not None:
        if named_dir is not None and named_dir.resolve() != Path(context).resolve():
            raise ModelError(f"{Path(first) / ADAPTER_CONFIG}: base_model_name_or_path: {named} is not the base "
                             f"{context} (an adapter of another model; write {context}+{first} to apply it anyway)")
        return AdapterFolder(adapter, folder(base if isinstance(base, ModelFolder) else context), str(reference))
    if named_dir is None:
        raise ModelError(f"{Path(first) / ADAPTER_CONFIG}: base_model_name_or_path: {named!r} is not a local "
                         f"folder; give the base (BASE+{first}, or base_model in the config)")
    return AdapterFolder(adapter, folder(named_dir), str(reference))
