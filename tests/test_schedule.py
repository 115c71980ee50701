"""When the periodic callbacks run (callbacks/schedule.py): every N of the module's iterations after the first, and a
schedule that could not mean that is refused when the callback is made, in every callback alike."""

from types import SimpleNamespace

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


@pytest.mark.parametrize("kind", ["media", "evaluation"])
@pytest.mark.parametrize("every, runs_at", [(None, []), (100, [100, 200])])
def test_a_callback_runs_at_its_due_iterations_and_at_the_end(kind, every, runs_at):
    """None: only at the end of training; N: at every multiple of N as well. Rules out None read as "never, not even
    at the end" or as "every iteration", and a schedule the callback does not consult."""
    cb, ran = MAKERS[kind](every), []
    cb.run = lambda trainer, module: ran.append(module.iteration)
    for it in range(0, 251, 50):
        cb.on_train_batch_end(None, SimpleNamespace(iteration=it), None, None, 0)
    cb.on_train_end(None, SimpleNamespace(iteration=250))
    assert ran == [*runs_at, 250]


@pytest.mark.parametrize("every, saved_at", [(None, [250]), (100, [100, 200, 250])])
def test_the_checkpoint_saves_at_its_due_iterations_and_the_last(every, saved_at, monkeypatch):
    """None: only after the last iteration (max_iters); N: at every multiple of N as well, never at iteration 0."""
    ck, saved = IterationCheckpoint(every_n_iters=every), []
    monkeypatch.setattr(ck, "_should_skip_saving_checkpoint", lambda trainer: False)
    monkeypatch.setattr(ck, "_monitor_candidates", lambda trainer: {})
    monkeypatch.setattr(ck, "_save_topk_checkpoint", lambda trainer, c: saved.append(it))  # `it`: the loop's, now
    monkeypatch.setattr(ck, "_save_last_checkpoint", lambda trainer, c: None)
    for it in range(0, 251, 50):
        ck.on_train_batch_end(None, SimpleNamespace(iteration=it, hparams=SimpleNamespace(max_iters=250)), None, None,
                              0)
    assert saved == saved_at
