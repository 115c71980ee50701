"""Run by test_data_ddp: one process per rank (gloo), like torchrun/Lightning ddp would start them."""

import json
import os
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank: int, world: int, shards: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from datamodules.posed_images import PosedImageDataModule

    dm = PosedImageDataModule(shards, batch_size=2, batches_per_epoch=5, num_workers=2, eval_batch_size=3)
    eval_keys = [k for b in dm.eval_dataloader() for k in b["key"]]
    train = [b["key"] for b in dm.train_dataloader()]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"eval": eval_keys, "train": train}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    shards, out, port = sys.argv[1], sys.argv[2], sys.argv[3]
    os.environ["MASTER_PORT"] = port
    # fork, as torchrun-started ranks do, so that loader workers fork too (spawned ones re-import everything)
    mp.start_processes(run, args=(2, shards, out), nprocs=2, join=True, start_method="fork")
