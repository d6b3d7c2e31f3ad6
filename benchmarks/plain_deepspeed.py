"""The plain way: the benchmark's training as a DeepSpeed script, run under torchrun.

    torchrun --standalone --nproc-per-node 2 plain_deepspeed.py CONFIG.json STEPS OUT.json [gpu]

Writes (rank 0) the time each optimizer step completed and the rank-averaged losses. With
`gpu`: the GPU-sized GPT-2 on this rank's GPU (NCCL), batches copied to it as a script does.
"""

import json
import os
import sys
import time

import deepspeed
import torch
import torch.distributed as dist
from workload import GpuTokenData, TokenData, make_gpu_model, make_model  # benchmarks/ is on sys.path


def main(config_path: str, steps: int, out_path: str, workload: str = "cpu") -> None:
    config = json.load(open(config_path))
    on_gpu = workload == "gpu"
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = make_gpu_model() if on_gpu else make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = GpuTokenData() if on_gpu else TokenData()
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_size=config["train_micro_batch_size_per_gpu"], sampler=sampler,
                                         pin_memory=on_gpu)
    step_times, losses, epoch = [], [], 0
    while engine.global_steps < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            if on_gpu:
                batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
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
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
    os._exit(0)  # as nbtrain's workers do: skip the comm backends' aborting destructors
