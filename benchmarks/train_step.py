"""Images/s and peak memory of the DINO training step: ours against reference settings, in the same run.

"ours" is exactly what ``train_dino.py`` runs (``simpool.dino.build.build_dino_step``): fused SDPA attention,
bf16 autocast, fused AdamW, foreach EMA and clipping, no host sync per step, torch.compile on CUDA.
"reference settings" is the same model and step code with what the reference does instead: no fused attention,
no compile, fp32 (or fp16 with a GradScaler), and a host sync (``loss.item()``) after every step.
Crops are synthetic and already on the device, at the paper's sizes (2 x 224 + 6 x 96, out_dim 65536).

    python benchmarks/train_step.py                      # CUDA: the four models of the GPU-speed issue
    python benchmarks/train_step.py --tiny               # CPU: tiny sizes, proves the script works
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from simpool.dino.build import build_dino_step
from simpool.dino.config import parse_args
from simpool.dino.step import DINOStep, StepSchedule
from simpool.distributed import DistInfo, unwrap
from simpool.models import arch_family

# Constant values for timing: the schedules' values do not change the cost of a step.
SCHEDULE = StepSchedule(lr=1e-4, weight_decay=0.04, momentum=0.996, teacher_temp=0.04)

# name: (train_dino.py flags, batch)
CASES = {
    "vit_small_simpool": (["--arch", "vit_small", "--mode", "simpool", "--optimizer", "adamw", "--clip_grad", "3.0",
                           "--use_bn_in_head", "False", "--out_dim", "65536"], 100),
    "vit_small_official": (["--arch", "vit_small", "--mode", "official", "--optimizer", "adamw", "--clip_grad",
                            "3.0", "--use_bn_in_head", "False", "--out_dim", "65536"], 100),
    "resnet50_simpool": (["--arch", "resnet50", "--mode", "simpool", "--optimizer", "lars", "--use_bn_in_head",
                          "True", "--out_dim", "60000", "--global_crops_scale", "0.14", "1"], 90),
    "convnext_small_simpool": (["--arch", "convnext_small", "--mode", "simpool", "--optimizer", "adamw",
                                "--clip_grad", "0.3", "--use_bn_in_head", "False", "--out_dim", "65536",
                                "--drop_path_rate", "0.4"], 60),
}
TINY_FLAGS = ["--patch_size", "8", "--model_overrides", "depth=2", "embed_dim=64", "num_heads=2", "img_size=32",
              "--out_dim", "256", "--head_hidden_dim", "64", "--head_bottleneck_dim", "32",
              "--global_crops_size", "32", "--local_crops_size", "16"]


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> None:
    """Toggle timm's fused scaled-dot-product attention on every attention layer."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def case_flags(name: str, tiny: bool) -> tuple[list[str], int]:
    """train_dino.py flags and batch size of a case; ``tiny`` shrinks the model and crops for a CPU run."""
    flags, batch = CASES[name]
    if not tiny:
        return flags, batch
    flags = [*flags, *TINY_FLAGS]
    convnet_crops = ["--global_crops_size", "64", "--local_crops_size", "32"]  # 5 stride-2 stages
    family = arch_family(flags[flags.index("--arch") + 1])
    if family == "resnet":
        flags += ["--model_overrides", "layers=[1,1,1,1]", *convnet_crops]
    if family == "convnext":
        flags += ["--model_overrides", "depths=[1,1,1,1]", "dims=[16,32,64,128]", *convnet_crops]
    return flags, 4


def build_case(flags: list[str], batch: int, device: torch.device, ours: bool, precision: str, local_crops: int,
               compile_models: bool) -> tuple[DINOStep, list[torch.Tensor]]:
    """The step train_dino.py builds for these flags (``ours=False``: unfused attention) and synthetic crops."""
    args = parse_args([*flags, "--data_path", "fashion-mnist", "--batch_size_per_gpu", str(batch),
                       "--local_crops_number", str(local_crops)])
    torch.manual_seed(0)
    step = build_dino_step(args, DistInfo(0, 1, 0, device), precision, compile_models=compile_models)
    if not ours:
        set_fused_attention(step.student, False)
        set_fused_attention(step.teacher, False)
    channels_last = device.type == "cuda" and unwrap(step.student).backbone.is_convnet
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    crops = [torch.randn(batch, 3, args.global_crops_size, args.global_crops_size, device=device)
             for _ in range(2)]
    crops += [torch.randn(batch, 3, args.local_crops_size, args.local_crops_size, device=device)
              for _ in range(local_crops)]
    return step, [c.contiguous(memory_format=memory_format) for c in crops]


def measure(flags: list[str], batch: int, device: torch.device, ours: bool, precision: str, steps: int,
            warmup: int, local_crops: int, compile_models: bool) -> dict:
    step, crops = build_case(flags, batch, device, ours, precision, local_crops, compile_models)

    def run(n: int) -> torch.Tensor:
        loss = torch.zeros((), device=device)
        for _ in range(n):
            stats = step(crops, SCHEDULE)
            loss = stats.loss
            if not ours:
                float(stats.loss)  # the reference reads the loss on the host every step
        return loss

    start = time.perf_counter()
    run(warmup)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    final_loss = float(run(steps))  # one sync at the end
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"img_per_s": steps * batch / elapsed, "peak_GiB": peak, "warmup_s": warmup_s, "loss": final_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--local_crops", type=int, default=6)
    parser.add_argument("--reference_precision", default="fp16", choices=["fp32", "fp16"],
                        help="precision of the reference-settings run (the fork's default is fp32)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and crops (CPU smoke run)")
    parser.add_argument("--no_compile", nargs="*", default=[], choices=list(CASES),
                        help="cases whose 'ours' run skips torch.compile (to fit a short GPU lease)")
    parser.add_argument("--json", default=None, help="also write the results here")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    ours_precision = "bf16" if device.type == "cuda" else "fp32"
    results = {}
    print(f"{'case':<24} {'setting':<22} {'img/s':>9} {'peak GiB':>9} {'warm-up s':>10}")
    for name in opts.cases:
        flags, batch = case_flags(name, opts.tiny)
        rows = {}
        reference_precision = opts.reference_precision if device.type == "cuda" else "fp32"
        compile_ours = device.type == "cuda" and name not in opts.no_compile
        ours_label = "ours" + ("" if compile_ours else " (no compile)")
        for setting, ours, precision in ((ours_label, True, ours_precision),
                                         (f"reference ({reference_precision})", False, reference_precision)):
            rows[setting] = measure(flags, batch, device, ours, precision, opts.steps, opts.warmup, opts.local_crops,
                                    compile_models=ours and compile_ours)
            r = rows[setting]
            print(f"{name:<24} {setting:<22} {r['img_per_s']:>9.1f} {r['peak_GiB']:>9.2f} {r['warmup_s']:>10.1f}",
                  flush=True)
        ours_rate = rows[ours_label]["img_per_s"]
        ref_rate = rows[f"reference ({reference_precision})"]["img_per_s"]
        print(f"{name:<24} {'ratio ours/reference':<22} {ours_rate / ref_rate:>9.2f}x", flush=True)
        results[name] = rows
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
                       else "cpu", "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
