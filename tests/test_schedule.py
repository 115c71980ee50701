"""When the periodic callbacks run (callbacks/schedule.py): every N of the module's iterations after the first, and a
schedule that could not mean that is refused when the callback is made, in every callback alike."""

import pytest

from callbacks.checkpoint import IterationCheckpoint
from callbacks.media import SampleGrid
from callbacks.metrics import EvaluationCallback
from callbacks.schedule import due
from gmpi_lightning.errors import InputError

MAKERS = {"checkpoint": lambda n: IterationCheckpoint(every_n_iters=n),
          "media": lambda n: SampleGrid(every_n_iters=n),
          "evaluation": lambda n: EvaluationCallback(every_n_iters=n)}


def test_due_every_n_iterations_after_the_first():
    """Rules out running at iteration 0, off-by-one multiples, and None read as "every iteration"."""
    assert [i for i in range(13) if due(4, i)] == [4, 8, 12]
    assert [i for i in range(4) if due(1, i)] == [1, 2, 3]
    assert not any(due(None, i) for i in range(10))


@pytest.mark.parametrize("kind", MAKERS)
@pytest.mark.parametrize("bad", [0, -200])
def test_every_callback_refuses_a_schedule_of_no_iterations(kind, bad):
    """0 would silently never run and -200 would run every 200 (Python's modulo): both are errors naming the field,
    in the evaluation callback too (which once took them)."""
    with pytest.raises(InputError, match=rf"every_n_iters must be a positive number of iterations or None, got {bad}"):
        MAKERS[kind](bad)


@pytest.mark.parametrize("kind", MAKERS)
def test_every_callback_takes_none_for_only_at_the_end(kind):
    MAKERS[kind](None)
