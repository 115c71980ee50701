"""A callback for the multi-node / SLURM tests: each rank appends (rank<r>.jsonl, one line per run) how it was
launched, its counters and sha256 fingerprints of its nets.

``signal_at``: after that iteration the rank sends itself SIGUSR1, what SLURM's ``--signal=SIGUSR1@90`` delivers
before the time limit, so Lightning's auto-requeue handler runs (hpc checkpoint, ``scontrol requeue``).
"""

import hashlib
import json
import os
import signal
import time
from pathlib import Path

import lightning.pytorch as pl


def _digest(module) -> str:
    """Parameters and buffers, except w_avg: each rank's running mean of its own latents (rank-local, as NVlabs)."""
    h = hashlib.sha256()
    for name, p in module.state_dict().items():
        if name.endswith("mapping.w_avg"):
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class LaunchReport(pl.Callback):
    def __init__(self, out: str, signal_at: int | None = None):
        self.out, self.signal_at = Path(out), signal_at
        self.start_iteration, self.G_start, self.keys = None, None, []

    def _report(self, trainer, pl_module, **extra) -> None:
        env = trainer._accelerator_connector.cluster_environment
        handler = signal.getsignal(signal.SIGUSR1)
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "node_rank": trainer.node_rank,
                  "local_rank": trainer.local_rank, "num_nodes": trainer.num_nodes,
                  "num_devices": trainer.num_devices, "cluster_env": type(env).__name__,
                  "auto_requeue": getattr(env, "auto_requeue", None),
                  "requeue_signal": int(env.requeue_signal) if getattr(env, "requeue_signal", None) else None,
                  "sigusr1_handler": type(handler).__name__, "ckpt_path": trainer.ckpt_path,
                  "start_iteration": self.start_iteration, "iteration": pl_module.iteration,
                  "global_step": trainer.global_step, "G": _digest(pl_module.G), "D": _digest(pl_module.D),
                  "G_start": self.G_start, "G_ema": _digest(pl_module.G_ema), "keys": self.keys,
                  "pid": os.getpid(), **extra}
        with open(self.out / f"rank{trainer.global_rank}.jsonl", "a") as f:  # one line per run
            f.write(json.dumps(report) + "\n")

    def on_train_start(self, trainer, pl_module):
        self.start_iteration, self.G_start = pl_module.iteration, _digest(pl_module.G)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["key"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.signal_at is not None and pl_module.iteration == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)  # Lightning: hpc checkpoint + `scontrol requeue $SLURM_JOB_ID`
            for _ in range(20):  # Python runs the handler at the next bytecode boundary: give it a few
                time.sleep(0.01)

    def on_train_end(self, trainer, pl_module):
        self._report(trainer, pl_module)
