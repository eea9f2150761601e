"""One process of the 2-process sharded test (``tests/test_sharded.py``), run by torchrun on
gloo: the tiny student sharded with torch's FSDP2 into the units the shipped accelerate
config names, one step of the recipe's KD objective (feature hooks by name) and AdamW on this
rank's half of the batch; rank 0 also takes the same step unsharded on the whole batch and
writes both to ``argv[1]`` (JSON)."""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from workbench import losses
from workbench.memory import FSDP_UNITS
from workbench.presets import load_preset
from workbench.surgery import build_student
from workbench.testing import tiny_sdxl_config, tiny_unet


def batch(n: int) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(n, 4, 8, 8, generator=g),
        "timestep": torch.randint(0, 1000, (n,), generator=g),
        "encoder_hidden_states": torch.randn(n, 77, 16, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(n, 8, generator=g),
            "time_ids": torch.randn(n, 6, generator=g),
        },
    }
    return {"inputs": inputs, "target": torch.randn(n, 4, 8, 8, generator=g)}


def half(b: dict, rank: int) -> dict:
    def cut(t):
        return (
            t[2 * rank : 2 * rank + 2] if isinstance(t, torch.Tensor) else {k: cut(v) for k, v in t.items()}
        )

    return {k: cut(v) for k, v in b.items()}


def step(student, teacher, b, setup) -> tuple[float, torch.optim.Optimizer]:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    targets = losses.teacher_targets(teacher, b, setup)
    terms = losses.OBJECTIVES["kd"].loss(b, student, student, targets, setup)
    terms["loss/total"].backward()
    optimizer.step()
    return terms["loss/total"].item(), optimizer


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    teacher = tiny_unet(tiny_sdxl_config()).requires_grad_(False)
    student, spec = build_student(teacher, load_preset("ssd-1b"))
    student.train()
    reference = copy.deepcopy(student)
    setup = losses.KDSetup(losses.LossWeights(), spec.feature_pairs("layer"))
    full = sum(p.numel() for p in student.parameters())
    mesh = init_device_mesh("cpu", (world,))
    units = [m for m in student.modules() if type(m).__name__ in FSDP_UNITS]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(student, mesh=mesh)
    local = sum(p.to_local().numel() for p in student.parameters())
    value, optimizer = step(student, teacher, half(batch(2 * world), rank), setup)
    loss = torch.tensor(value)
    dist.all_reduce(loss)
    states = sum(v.to_local().numel() for s in optimizer.state.values() for v in s.values() if v.dim())
    # the full gradients and weights: collectives, every rank takes part
    grads = {n: p.grad.full_tensor() for n, p in student.named_parameters()}
    weights = {n: p.full_tensor() for n, p in student.named_parameters()}
    if rank == 0:
        expected, _ = step(reference, teacher, batch(2 * world), setup)
        named = list(reference.named_parameters())
        grad_err = max(((grads[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-12)).item() for n, p in named)
        moved = max((weights[n] - p.detach()).abs().max().item() for n, p in named)
        result = {"units": len(units), "params": full, "local": local, "local_states": states,
                  "loss": loss.item() / world, "expected": expected, "grad_rel_err": grad_err,
                  "max_weight_diff": moved}  # fmt: skip
        with open(out, "w", encoding="utf-8") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
