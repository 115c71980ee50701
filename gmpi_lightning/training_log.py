"""What a training iteration logs, and when: every ``log_every_n_steps`` iterations (and the first and last), as host
tensors moved in one transfer (Lightning reads logged values back for its loggers and, every step, for the progress
bar); throughput is measured over the iterations in between.
"""

from __future__ import annotations

import time

import torch

PROGRESS_BAR = ("loss_d", "loss_g", "kimg", "img_per_s")


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class IterationLog:
    def __init__(self):
        self._last: tuple[float, int] | None = None  # (time, iteration) of the previous log

    def due(self, trainer, iteration: int, max_iters: int) -> bool:
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        return iteration % every == 0 or iteration == 1 or iteration >= max_iters or bool(trainer.fast_dev_run)

    def write(self, module, logs: dict, batch_total: int, batch: int, **scalars) -> None:
        """Log ``logs`` (device tensors, numbers) and ``scalars`` under ``train/`` (progress-bar values plain)."""
        now = time.perf_counter()
        if self._last is not None:
            t0, it0 = self._last
            logs["img_per_s"] = batch_total * (module.iteration - it0) / max(now - t0, 1e-9)
        self._last = (now, module.iteration)
        on_device = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
        if on_device:
            host = torch.stack([logs[k].float() for k in on_device]).cpu()  # one transfer for all of them
            logs.update(zip(on_device, host.unbind()))
        logs.update(scalars, peak_mem_mb=peak_memory_mb(module.device))
        # host tensors: Lightning re-reads the progress-bar values every step, which must not wait on the device
        logs = {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in logs.items()}
        prog = {k: logs[k] for k in PROGRESS_BAR if k in logs}
        module.log_dict(prog, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch)
        module.log_dict({f"train/{k}": v for k, v in logs.items() if k not in prog}, on_step=True, on_epoch=False,
                        batch_size=batch)
