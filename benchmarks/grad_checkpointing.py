"""Peak activation memory of one training step with and without ``--grad_checkpointing``, same run, same input.

A step here is the student backbone's forward and backward on one batch of global crops (224 px by default):
what checkpointing changes. The parameters and their gradients are allocated before the measurement (one
warm-up step), so the peak is what the step's activations and temporaries add on top of them.

* CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the step.
* CPU: the allocator events of ``torch.profiler`` (``profile_memory=True``), replayed in time order: the
  largest running total of bytes allocated minus bytes freed during the step.

    python benchmarks/grad_checkpointing.py                               # ViT-S/16 and ResNet-50, batch 64
    python benchmarks/grad_checkpointing.py --batch 16 --archs vit_small  # a smaller batch on a small machine
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from simpool import build_backbone


def _step(model: torch.nn.Module, images: torch.Tensor) -> None:
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: they are not activations
    model(images).float().square().mean().backward()


def peak_step_bytes_cpu(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Peak of (allocated - freed) bytes over one step, from the profiler's allocator events in time order.

    The allocation events sit in the profiler's event tree (what torch's own memory timeline reads); torch
    exposes no public accessor for them, hence the private ``_EventType``.
    """
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, images)
    allocations = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocations.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(allocations):
        running += size
        peak = max(peak, running)
    return peak


def peak_step_bytes_cuda(model: torch.nn.Module, images: torch.Tensor) -> int:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _step(model, images)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(arch: str, batch: int, size: int, device: torch.device, checkpointing: bool) -> tuple[int, float]:
    torch.manual_seed(0)
    model = build_backbone(arch, mode="simpool").to(device)
    model.set_grad_checkpointing(checkpointing)
    images = torch.randn(batch, 3, size, size, device=device)
    _step(model, images)  # warm-up: gradient buffers, allocator caches, kernels
    start = time.perf_counter()
    peak = peak_step_bytes_cuda(model, images) if device.type == "cuda" else peak_step_bytes_cpu(model, images)
    return peak, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["vit_small", "resnet50"])
    parser.add_argument("--batch", type=int, default=64, help="images per step (the paper's batch per GPU: 64)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    how = "max_memory_allocated" if device.type == "cuda" else "torch.profiler allocator events"
    print(f"device {device}, batch {opts.batch} x {opts.size} px, peak step memory above weights+grads ({how})")
    print(f"{'arch':<10} {'without':>12} {'with':>12} {'ratio':>7} {'time without':>13} {'time with':>10}")
    for arch in opts.archs:
        plain, t_plain = measure(arch, opts.batch, opts.size, device, checkpointing=False)
        ckpt, t_ckpt = measure(arch, opts.batch, opts.size, device, checkpointing=True)
        print(f"{arch:<10} {plain / 2**20:>9.0f} MiB {ckpt / 2**20:>8.0f} MiB {plain / ckpt:>6.2f}x "
              f"{t_plain:>12.2f}s {t_ckpt:>9.2f}s", flush=True)


if __name__ == "__main__":
    main()
