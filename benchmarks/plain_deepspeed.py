"""The plain way: the benchmark's training as a DeepSpeed script, run under torchrun.

    torchrun --standalone --nproc-per-node 2 plain_deepspeed.py CONFIG.json STEPS OUT.json

Writes (rank 0) the time each optimizer step completed and the rank-averaged losses.
"""

import json
import os
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from workload import TokenData, make_model  # noqa: I001 - benchmarks/ is on sys.path


def main(config_path: str, steps: int, out_path: str) -> None:
    config = json.load(open(config_path))
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = TokenData()
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=config["train_micro_batch_size_per_gpu"], sampler=sampler)
    step_times, losses, epoch = [], [], 0
    while engine.global_steps < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            losses.append(mean.item() / world)
            step_times.append(time.time())
            if engine.global_steps == steps:
                break
        epoch += 1
    if rank == 0:
        json.dump({"step_times": step_times, "losses": losses}, open(out_path, "w"))
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    os._exit(0)  # as nbtrain's workers do: skip the comm backends' aborting destructors
