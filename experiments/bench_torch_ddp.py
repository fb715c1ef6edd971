"""The PyTorch QLoRA stack data-parallel over the GPUs of one host (issue 21's anchor):
transformers + peft + bitsandbytes as in bench_torch.py, wrapped in DistributedDataParallel, one
process per GPU started by torchrun (torch.distributed.run), each on its own batch of random
tokens. Rank 0 prints one RESULT line (child_runs.report): the median step over ranks' medians,
global tokens/s, and the largest per-device peak. Usage (repository root, PYTHONPATH=$PWD:experiments):
  torchrun --standalone --nproc_per_node 4 experiments/bench_torch_ddp.py \
      --preset llama2-7b --batch 4 --seq 2048 --lora_rank 16
"""

from __future__ import annotations

import os

import bench_torch
import child_runs
import torch
import torch.distributed as dist
import torch_steps

from qlora_jax.models.presets import preset


def main() -> None:
    a = torch_steps.parser().parse_args()
    rank, world = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    model = bench_torch.qlora_model(a.preset, a.r, a.model_dir)  # same seed: every rank builds the same base
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    torch.manual_seed(rank)  # each rank its own tokens
    row = torch_steps.time_steps(
        "torch+peft+bnb DDP", ddp, preset(a.preset).vocab_size, a, bench_torch.VERSIONS, autocast=True
    )
    stats = torch.tensor([row["step_s"], row["peak_mem_gib"]], device="cuda")
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)
    steps = sorted(float(g[0]) for g in gathered)
    if rank == 0:
        step = steps[len(steps) // 2]
        child_runs.report(
            row
            | {
                "devices": world,
                "step_s": step,
                "tokens_per_s": world * a.batch * a.seq / step,
                "peak_mem_gib_per_device": [float(g[1]) for g in gathered],
                "peak_mem_gib": max(float(g[1]) for g in gathered),
            }
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
