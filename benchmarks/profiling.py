"""Where a training iteration spends its time, and how often it reads values back from the device.

* :class:`HostReads` counts the calls that turn a tensor's *value* into a Python object (``bool(t)``,
  ``float(t)``, ``t.item()``, ``t.tolist()``, ...). On a GPU each of them waits for every queued kernel (a
  host-device synchronisation); on a CPU they are cheap, but counting them there shows what a GPU run would wait on.
  They are counted with a ``TorchFunctionMode``, which sees every such call on any device. Host-to-device copies
  (``torch.tensor(..., device="cuda")``) are not tensor reads and are not counted here; on a GPU,
  ``torch.cuda.set_sync_debug_mode("warn")`` catches both (see ``benchmarks/bench_train.py``).
* :class:`PhaseTimer` times named phases (methods or functions patched for the duration) exclusively: time spent
  in a nested phase is not counted again in its parent, so the phases add up to the total.
* :class:`IterationProbe` is a callback that applies both to each training iteration (batch start to the next batch
  start, so Lightning's own per-step work and every callback are included).
"""

from __future__ import annotations

import functools
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch.overrides import TorchFunctionMode

READS = frozenset({"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy", "cpu"})


HOST_SIDE = ("/torch/optim/",)  # Adam keeps its step counts on the host (also on a GPU, unless capturable)


class HostReads(TorchFunctionMode):
    """Counts value reads of tensors while active, except those made inside ``HOST_SIDE`` code (host tensors on
    every device). ``project`` counts the reads made by this project's own code (the innermost frame is not an
    installed package); ``where`` keeps the innermost frame of each read (dir/file:line)."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.count, self.project, self.where, self.sites = 0, 0, where, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            caller = frame = sys._getframe(1)
            while frame is not None and not any(h in frame.f_code.co_filename for h in HOST_SIDE):
                frame = frame.f_back
            if frame is None:
                name = caller.f_code.co_filename
                self.count += 1
                self.project += "site-packages" not in name
                if self.where:
                    self.sites[f"{'/'.join(name.rsplit('/', 2)[-2:])}:{caller.f_lineno} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


class PhaseTimer:
    """Exclusive wall time per phase. ``wrap(owner, attr, name)`` patches ``owner.attr`` while the timer is active
    (``with timer:``). ``cuda=True`` synchronises at every phase boundary, so that GPU time is attributed to the phase
    that queued the work."""

    def __init__(self, cuda: bool = False):
        self.total = defaultdict(float)
        self._stack: list[list] = []
        self._patches: list[tuple] = []
        self.cuda = cuda

    def wrap(self, owner, attr: str, name: str) -> PhaseTimer:
        self._patches.append((owner, attr, name))
        return self

    def _timed(self, fn: Callable, name: str) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            self._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()
        return inner

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _enter(self, name: str) -> None:
        now = self._now()
        if self._stack:
            self.total[self._stack[-1][0]] += now - self._stack[-1][1]
        self._stack.append([name, now])

    def _exit(self) -> None:
        now = self._now()
        name, start = self._stack.pop()
        self.total[name] += now - start
        if self._stack:
            self._stack[-1][1] = now

    def __enter__(self) -> PhaseTimer:
        self._saved = []
        for owner, attr, name in self._patches:
            original = getattr(owner, attr)
            self._saved.append((owner, attr, original))
            setattr(owner, attr, self._timed(original, name))
        return self

    def __exit__(self, *exc) -> None:
        for owner, attr, original in reversed(self._saved):
            setattr(owner, attr, original)


class IterationProbe(pl.Callback):
    """Per training iteration (batch start to the next batch start): wall time, host reads, and (optionally) the
    exclusive time of each phase of ``timer``. Iterations before ``skip`` (warm-up) are not recorded."""

    def __init__(self, timer: PhaseTimer | None = None, skip: int = 1, where: bool = False):
        self.timer, self.skip, self.where = timer, skip, where
        self.seconds: list[float] = []
        self.reads: list[int] = []
        self.project_reads: list[int] = []
        self.sites = Counter()
        self._mode: HostReads | None = None
        self._batches = 0

    def _close(self) -> None:
        if self._mode is None:
            return
        self._mode.__exit__(None, None, None)
        if self._batches > self.skip:
            self.seconds.append(time.perf_counter() - self._t0)
            self.reads.append(self._mode.count)
            self.project_reads.append(self._mode.project)
            self.sites.update(self._mode.sites)
        self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        self._batches += 1
        if self.timer is not None and self._batches == self.skip + 1:
            self.timer.total.clear()
            self.timer._enter("lightning + data + callbacks")  # everything outside the named phases
        self._mode = HostReads(self.where)
        self._mode.__enter__()
        self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()
        if self.timer is not None and self.timer._stack:
            self.timer._exit()

