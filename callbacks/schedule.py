"""When the periodic callbacks run: every ``every_n_iters`` iterations of the module's own counter
(``pl_module.iteration``: one D and one G step; Lightning's ``global_step`` counts two per iteration)."""

from __future__ import annotations

from gmpi_lightning.errors import InputError


def check_every(every_n_iters: int | None) -> int | None:
    """``every_n_iters`` itself, checked when the callback is made (not at the first due iteration mid-run)."""
    if every_n_iters is not None and every_n_iters < 1:
        raise InputError(f"every_n_iters must be a positive number of iterations or None, got {every_n_iters}")
    return every_n_iters


def due(every_n_iters: int | None, iteration: int) -> bool:
    """Whether ``iteration`` (after the first) is a multiple of ``every_n_iters`` (None: never)."""
    return bool(every_n_iters) and iteration > 0 and iteration % every_n_iters == 0
