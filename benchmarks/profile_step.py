"""Where does the DINO step spend its time? torch.profiler over a few steps of the code train_dino.py runs.

Builds the same step as ``benchmarks/train_step.py`` (``simpool.dino.build.build_dino_step``, synthetic crops on the
device), warms it up, profiles ``--steps`` steps and prints the ``--top`` operators by self device time (CUDA) or
self CPU time (CPU), then the share of the step spent in broad groups (matmuls, attention, normalisation,
elementwise, optimizer, copies/casts). Optionally writes a Chrome trace (open it in https://ui.perfetto.dev).
For the GPU-speed issue: it shows whether the ViT-S step is bound by matmuls (good) or by many small kernels
(then compile, CUDA graphs or fusing help).

    python benchmarks/profile_step.py --case vit_small_simpool              # CUDA: ours, bf16, compiled
    python benchmarks/profile_step.py --case vit_small_simpool --no_compile --trace /tmp/step.json
    python benchmarks/profile_step.py --tiny --device cpu                   # CPU smoke run

Written without a GPU at hand: the CPU path is tested; the CUDA path (device-time columns) had not run yet on
2026-11-26.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_step import CASES, SCHEDULE, build_case, case_flags  # noqa: E402

# Operator-name patterns of the groups, tried in order; the first match wins.
GROUPS = [
    ("attention (SDPA)", r"attention|flash|sdpa|fmha|_efficient_"),
    ("matmul / linear / conv", r"mm|matmul|linear|gemm|conv|cutlass|sm90|sm80|xmma"),
    ("normalisation", r"norm"),
    ("optimizer / EMA (foreach)", r"foreach|adam|lars|_amp_"),
    ("softmax / loss", r"softmax|log_softmax|cross_entropy|nll"),
    ("copy / cast / layout", r"copy|to_copy|cat|contiguous|clone|transpose|permute|index|gather|scatter"),
    ("elementwise / reductions", r"add|mul|div|sub|gelu|pow|exp|log|sum|mean|max|min|where|clamp|fill|sqrt"),
]


def group_of(name: str) -> str:
    lowered = name.lower()
    for group, pattern in GROUPS:
        if re.search(pattern, lowered):
            return group
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--case", default="vit_small_simpool", choices=list(CASES))
    parser.add_argument("--reference", action="store_true", help="profile the reference settings instead of ours")
    parser.add_argument("--no_compile", action="store_true", help="profile without torch.compile")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=5, help="steps before profiling (compile happens here)")
    parser.add_argument("--local_crops", type=int, default=6)
    parser.add_argument("--top", type=int, default=25, help="operators listed")
    parser.add_argument("--tiny", action="store_true", help="tiny model and crops (CPU smoke run)")
    parser.add_argument("--trace", default=None, help="also write a Chrome trace here")
    opts = parser.parse_args(argv)
    device = torch.device(opts.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ours = not opts.reference
    precision = ("bf16" if ours else "fp16") if cuda else "fp32"
    flags, batch = case_flags(opts.case, opts.tiny)
    step, crops = build_case(flags, batch, device, ours, precision, opts.local_crops,
                             compile_models=cuda and ours and not opts.no_compile)

    def run(n: int) -> None:
        for _ in range(n):
            stats = step(crops, SCHEDULE)
            if not ours:
                float(stats.loss)
        if cuda:
            torch.cuda.synchronize(device)

    run(opts.warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        run(opts.steps)
    wall = (time.perf_counter() - started) / opts.steps
    events = prof.key_averages()
    self_time = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    unit = "device" if cuda else "CPU"
    total = sum(self_time(e) for e in events) or 1.0
    print(f"{opts.case} ({'reference settings' if opts.reference else 'ours'}, {precision}, "
          f"{'no compile' if opts.no_compile or not cuda else 'compiled'}), batch {batch}, {device}: "
          f"{wall * 1000:.1f} ms per step under the profiler ({batch / wall:.0f} img/s), "
          f"self {unit} time {total / 1000 / opts.steps:.1f} ms per step")
    print(prof.key_averages().table(sort_by=f"self_{'device' if cuda else 'cpu'}_time_total", row_limit=opts.top,
                                    max_name_column_width=60))
    groups: dict[str, float] = defaultdict(float)
    launches = 0
    for event in events:
        groups[group_of(event.key)] += self_time(event)
        if cuda and event.self_device_time_total > 0:
            launches += event.count
    print(f"{'group':<28} {'share of self ' + unit + ' time':>26}")
    for group, value in sorted(groups.items(), key=lambda item: -item[1]):
        print(f"{group:<28} {100 * value / total:>25.1f}%")
    if cuda:
        print(f"operators with device time per step: {launches / opts.steps:.0f}")
    if opts.trace:
        prof.export_chrome_trace(opts.trace)
        print(f"trace written to {opts.trace}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
