"""The library the stage scripts of :mod:`experiments` stand on. Nothing here imports a stage."""
