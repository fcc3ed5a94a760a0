"""What a DINO run is made of, built from the flags: student and teacher, the DDP / compile wrappers, the
multi-crop loader, and the ``DINOStep`` that joins them (``train.py`` drives them; ``benchmarks/train_step.py``
times the very same step).

Example:
    >>> args = parse_args(["--arch", "vit_small", "--mode", "simpool", "--data_path", "/imagenet/train"])
    >>> step = build_dino_step(args, init_distributed(), precision="bf16", compile_models=True)
    >>> loader, sampler = build_train_loader(args, init_distributed())
"""

from __future__ import annotations

import argparse
import functools
import json
import logging

import torch
from torch import nn
from torch.utils.data import DataLoader

from simpool.data import DataError, ResumableDistributedSampler, build_dataset, collate_skip_bad, seed_worker
from simpool.dino.augment import DataAugmentationDINO, DecodeForGPU, collate_padded_skip_bad
from simpool.dino.head import DINOHead, MultiCropWrapper
from simpool.dino.loss import DINOLoss
from simpool.dino.optim import build_optimizer, get_params_groups
from simpool.dino.step import DINOStep
from simpool.distributed import DistInfo, unwrap
from simpool.models import build_backbone
from simpool.run.config import ConfigError
from simpool.run.flags import data_source_options
from simpool.run.model_check import checked_build, parameter_count
from simpool.run.output import float32_bytes

log = logging.getLogger(__name__)


def build_student_teacher(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, nn.Module, int]:
    """Student and teacher MultiCropWrappers with identical initial weights (the teacher has no drop path)."""
    gamma = args.gamma  # AUTO_GAMMA (the arch's default), None or a float
    overrides = dict(args.model_overrides or {})
    student_backbone = build_backbone(
        args.arch,
        mode=args.mode,
        gamma=gamma,
        patch_size=args.patch_size,
        drop_path_rate=args.drop_path_rate,
        **overrides,
    )
    teacher_backbone = build_backbone(args.arch, mode=args.mode, gamma=gamma, patch_size=args.patch_size, **overrides)
    if args.grad_checkpointing:
        try:  # only the student: the teacher runs without gradients
            student_backbone.set_grad_checkpointing(True)
        except ValueError as err:
            raise ConfigError(f"--grad_checkpointing True: {err}") from None
    embed_dim = student_backbone.embed_dim
    head_kwargs = {"use_bn": args.use_bn_in_head, "nlayers": args.head_nlayers, "hidden_dim": args.head_hidden_dim,
                   "bottleneck_dim": args.head_bottleneck_dim}
    student_head = DINOHead(embed_dim, args.out_dim, norm_last_layer=args.norm_last_layer, **head_kwargs)
    student = MultiCropWrapper(student_backbone, student_head)
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, args.out_dim, **head_kwargs))
    student, teacher = student.to(device), teacher.to(device)
    if device.type == "cuda" and student_backbone.is_convnet:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    teacher.load_state_dict(student.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, embed_dim


def _student(args: argparse.Namespace) -> MultiCropWrapper:
    backbone = build_backbone(args.arch, mode=args.mode, gamma=args.gamma, patch_size=args.patch_size,
                              drop_path_rate=args.drop_path_rate, **dict(args.model_overrides or {}))
    head = DINOHead(backbone.embed_dim, args.out_dim, norm_last_layer=args.norm_last_layer, use_bn=args.use_bn_in_head,
                    nlayers=args.head_nlayers, hidden_dim=args.head_hidden_dim, bottleneck_dim=args.head_bottleneck_dim)
    return MultiCropWrapper(backbone, head)


_MODEL_FLAGS = ("arch", "mode", "gamma", "patch_size", "drop_path_rate", "model_overrides", "out_dim",
                "norm_last_layer", "use_bn_in_head", "head_nlayers", "head_hidden_dim", "head_bottleneck_dim")


@functools.lru_cache(maxsize=8)
def _student_parameters(flags: str) -> int:
    args = argparse.Namespace(**json.loads(flags))
    overrides = " ".join(f"{k}={v}" for k, v in dict(args.model_overrides or {}).items())
    what = f"--arch {args.arch}" + (f" --model_overrides {overrides}" if overrides else "")
    return parameter_count(checked_build(lambda: _student(args), what))


def student_parameters(args: argparse.Namespace) -> int:
    """Parameters of the student (backbone + head) the flags describe, built on the meta device: a ConfigError
    naming ``--model_overrides`` when its values cannot build one (``depth=-1``, ``embed_dim=50`` with 3 heads)."""
    return _student_parameters(json.dumps({k: getattr(args, k) for k in _MODEL_FLAGS}, sort_keys=True, default=str))


def checkpoint_bytes(args: argparse.Namespace) -> int:
    """About what one ``checkpoint.pth`` of this run takes: student and teacher, and the optimizer's state
    (AdamW: two moments per parameter; SGD / LARS: one momentum), all float32."""
    optimizer_states = 2 if args.optimizer == "adamw" else 1
    return float32_bytes(student_parameters(args) * (2 + optimizer_states))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap_for_training(student: nn.Module, teacher: nn.Module, dist_info: DistInfo, compile_models: bool):
    """SyncBatchNorm + DDP when distributed; torch.compile when asked. Returns (student, teacher)."""
    if dist_info.world_size > 1:
        if dist_info.device.type == "cuda" and has_batchnorm(student):
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(student, device_ids=device_ids)
        # DDP broadcast rank 0's weights to the student; the teacher starts from the same ones.
        teacher.load_state_dict(student.module.state_dict())
    if compile_models:
        student, teacher = torch.compile(student), torch.compile(teacher)
    return student, teacher


def use_gpu_augment(args: argparse.Namespace, device: torch.device) -> bool:
    """The batched multi-crop runs on the GPU by default on CUDA; CPU workers then only decode."""
    return args.gpu_augment if args.gpu_augment is not None else device.type == "cuda"


def build_train_loader(args: argparse.Namespace, dist_info: DistInfo) -> tuple[DataLoader, ResumableDistributedSampler]:
    """Shuffled, resumable loader; crops made by the workers (CPU path) or later on the device (GPU path)."""
    if use_gpu_augment(args, dist_info.device):
        transform, collate = DecodeForGPU(), collate_padded_skip_bad
    else:
        transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                         global_crops_size=args.global_crops_size,
                                         local_crops_size=args.local_crops_size)
        collate = collate_skip_bad
    dataset = build_dataset(args.data_path, "train", transform=transform,
                            subset=args.subset if args.subset > 0 else None,
                            options=data_source_options(args, listing_dir=args.output_dir, log=log.info))
    if len(dataset) < args.batch_size_per_gpu * dist_info.world_size:
        raise DataError(f"{args.data_path} holds {len(dataset)} images, fewer than one global batch "
                        f"({args.batch_size_per_gpu} x {dist_info.world_size}); lower --batch_size_per_gpu")
    sampler = ResumableDistributedSampler(dataset, batch_size=args.batch_size_per_gpu,
                                          num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=args.seed, drop_last=True)
    generator = torch.Generator().manual_seed(args.seed + dist_info.rank)
    loader = DataLoader(dataset, batch_size=args.batch_size_per_gpu, sampler=sampler,
                        num_workers=args.num_workers, pin_memory=dist_info.device.type == "cuda",
                        drop_last=True, collate_fn=collate, worker_init_fn=seed_worker,
                        generator=generator, persistent_workers=False)
    return loader, sampler


def build_dino_step(args: argparse.Namespace, dist_info: DistInfo, precision: str,
                    compile_models: bool) -> DINOStep:
    """Student, teacher, loss and optimizer wired into one ``DINOStep`` (shared with benchmarks/train_step.py)."""
    student, teacher, _ = build_student_teacher(args, dist_info.device)
    student, teacher = wrap_for_training(student, teacher, dist_info, compile_models)
    loss_fn = DINOLoss(args.out_dim, args.local_crops_number + 2,
                       center_momentum=args.center_momentum).to(dist_info.device)
    optimizer = build_optimizer(args.optimizer, get_params_groups(unwrap(student)))
    return DINOStep(student, teacher, loss_fn, optimizer, precision=precision, clip_grad=args.clip_grad)
