"""How an error names an option: as on the command line (``--horizon 0``) or as a Python argument
(``horizon=0``), for code that both :mod:`experiments.forecast` and its Python API run. Imports nothing."""

from __future__ import annotations


def option(name: str, value=None, cli: bool = False) -> str:
    """An option as an error names it: ``--llmtime-scale 0`` on the command line, ``llmtime_scale=0`` in Python
    (without ``value``: ``--llmtime-scale`` / ``llmtime_scale=``)."""
    if cli:
        return "--" + name.replace("_", "-") + ("" if value is None else f" {value}")
    return name + "=" + ("" if value is None else repr(value))
