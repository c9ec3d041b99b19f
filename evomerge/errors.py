"""Every exception evomerge raises on purpose, in one hierarchy.

:class:`EvomergeError` and its subclasses reach the user as one clear line (the CLI exits with
code 2). :class:`TaskError` is internal to the fitness layer, which turns it into a
:class:`ConfigError` located in the fitness or task file.
"""


class EvomergeError(Exception):
    """A problem with the user's input: config, model files, or options."""


class ConfigError(EvomergeError):
    """An invalid merge or experiment config: names the file, field and YAML line."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None,
                 line: int | None = None):
        where = _one_line(file or "<config>")
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {_one_line(field)}"
        super().__init__(f"{where}: {message}")
        self.message, self.file, self.field, self.line = message, file, field, line

    def in_file(self, file: str) -> "ConfigError":
        """The same error, located in ``file`` (for checks that run after parsing)."""
        return self if self.file else ConfigError(self.message, file=file, field=self.field, line=self.line)


class ModelError(EvomergeError):
    """A model folder that cannot be read, or models that cannot be merged together."""


class FitnessError(EvomergeError):
    """A metric failed while scoring a candidate (the search fails that trial)."""


class StorageError(EvomergeError):
    """The study's storage became unreachable during a search."""


class TaskError(ValueError):
    """An lm-eval task that cannot be used. ``file`` and ``field`` locate the cause: a field of
    that task YAML, or (no ``file``) a field of the metric's entry in the fitness file."""

    def __init__(self, message: str, file: str | None = None, field: str | None = None):
        super().__init__(message)
        self.file, self.field = file, field


def _one_line(name: str) -> str:
    """A file or field name as written in a message: quoted when it holds control characters."""
    return name if name.isprintable() else repr(name)
