"""Vision Transformer (timm) pooled by SimPool or by its [CLS] token.

``mode="simpool"``: no [CLS] token at all (``pos_embed`` has one entry per patch); SimPool (with a learnable
``beta``) pools the last block's tokens, then the encoder's final LayerNorm ``norm`` normalises the pooled vector.
``mode="official"``: DINO's ViT -- [CLS] token, final LayerNorm on all tokens, output token 0.

Parameter names are timm's, which are also those of DINO and of the SimPool fork, so their checkpoints load
without renaming.

Position embeddings for another input size (local crops, 96 px) are resampled bicubically. Two rules exist:

* ``"exact"`` (our models): keep them as they are when the patch grid matches the one they were trained for;
  otherwise resample to exactly the new grid (``F.interpolate(size=...)``).
* ``"reference"`` (weights written by DINO / the SimPool fork): what that code does, which we must repeat to
  reproduce its features. It resamples with ``scale_factor=((h + 0.1) / s, (w + 0.1) / s)`` (h, w the new grid,
  s the trained grid side), so the sampling positions are shifted even when the sizes agree; and in SimPool mode it
  resamples at *every* size, 224 px included, because its "nothing to do" test counts a [CLS] token that does
  not exist (``npatch = tokens - 1`` never equals N without one; about 9% relative change at 224 px). Released
  SimPool ViT weights were trained that way. ``simpool.load_pretrained`` switches a model to this rule when it
  loads a reference checkpoint.

Both rules are in :mod:`simpool.models.pos_embed`, which also keeps them functions of the input size in a traced
(ONNX) graph.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer

from simpool.models.base import PooledBackbone, check_mode
from simpool.models.pos_embed import POS_EMBED_RESAMPLING, resample_patch_pos_embed
from simpool.pooling import pooled_attention_grid


class SimPoolViT(VisionTransformer, PooledBackbone):
    """timm ``VisionTransformer`` whose ``forward`` returns the pooled feature (B, embed_dim).

    Example:
        >>> vit = SimPoolViT(mode="simpool", gamma=1.25, embed_dim=192, depth=2, num_heads=3)
        >>> vit(torch.randn(2, 3, 96, 96)).shape
        torch.Size([2, 192])
    """

    family = "vit"

    def __init__(
        self,
        mode: str = "simpool",
        gamma: float | None = 1.25,
        patch_size: int = 16,
        img_size: int = 224,
        pos_embed_resampling: str = "exact",
        arch: str = "vit",
        **timm_kwargs: Any,
    ) -> None:
        check_mode(mode)
        official = mode == "official"
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            global_pool="token" if official else "",
            class_token=official,
            dynamic_img_size=True,  # accept any input size divisible by the patch (96 px local crops)
            **timm_kwargs,
        )
        self.patch_size = patch_size
        self.pos_embed_resampling = pos_embed_resampling
        self._init_pooling(arch, mode, gamma, self.embed_dim,
                           {"patch_size": patch_size, "img_size": img_size, **timm_kwargs}, use_beta=True)

    # -- position embeddings -------------------------------------------------------------------------
    @property
    def pos_embed_resampling(self) -> str:
        return self._pos_embed_resampling

    @pos_embed_resampling.setter
    def pos_embed_resampling(self, rule: str) -> None:
        if rule not in POS_EMBED_RESAMPLING:
            raise ValueError(f"pos_embed_resampling must be one of {POS_EMBED_RESAMPLING}, got {rule!r}")
        self._pos_embed_resampling = rule

    def patch_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Position embeddings of the patch tokens for a grid_h x grid_w grid, shape (1, grid_h * grid_w, d)."""
        return resample_patch_pos_embed(self.pos_embed[:, self.num_prefix_tokens:], grid_h, grid_w,
                                        rule=self.pos_embed_resampling, official=self.mode == "official")

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, grid_h, grid_w, dim = x.shape  # dynamic_img_size: patch_embed returns NHWC
        x = x.reshape(batch, grid_h * grid_w, dim) + self.patch_pos_embed(grid_h, grid_w)
        if self.cls_token is not None:
            cls = self.cls_token + self.pos_embed[:, :1]
            x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
        return self.pos_drop(x)

    # -- forward ---------------------------------------------------------------------------------------
    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding (+ [CLS] token in official mode)."""
        x = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's tokens, before the final norm: (B, [1 +] N, d).

        With ``set_grad_checkpointing(True)`` (timm's switch) each block's activations are recomputed in
        backward instead of kept, as timm's own ``forward_features`` does.
        """
        x = self.prepare_tokens(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        if self.simpool is not None:
            return self.norm(self.simpool(tokens))
        return self.norm(tokens)[:, 0]

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w): the last block's patch tokens after the final LayerNorm, prefix tokens dropped, on the
        patch grid (dinov2's ``get_intermediate_layers(norm=True)``, which its linear segmentation reads).

        Example:
            >>> vit = SimPoolViT(mode="simpool", gamma=1.25, embed_dim=192, depth=2, num_heads=3)
            >>> vit.patch_features(torch.randn(1, 3, 96, 64)).shape
            torch.Size([1, 192, 6, 4])
        """
        grid_h, grid_w = self._grid(x)
        tokens = self.norm(self.forward_tokens(x))[:, self.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, grid_h, grid_w)

    def last_block_outputs(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalised token sequences ``norm(block_i(...))`` of the last ``n`` blocks, each (B, [1 +] N, d), prefix
        tokens first (DINO's ``get_intermediate_layers``).

        Example:
            >>> vit = SimPoolViT(mode="official", gamma=None, embed_dim=192, depth=2, num_heads=3)
            >>> [out.shape for out in vit.last_block_outputs(torch.randn(1, 3, 96, 96), n=2)]
            [torch.Size([1, 37, 192]), torch.Size([1, 37, 192])]
        """
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n_last_blocks={n} is out of range: this ViT has {len(self.blocks)} blocks")
        outputs = self.forward_intermediates(x, indices=n, norm=True, output_fmt="NLC", intermediates_only=True,
                                             return_prefix_tokens=True)
        if not self.num_prefix_tokens:
            return outputs
        return [torch.cat([prefix, patches], dim=1) for patches, prefix in outputs]

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax self-attention of the last block, (B, heads, T, T) over all its tokens."""
        x = self.blocks[:-1](self.prepare_tokens(x))
        last = self.blocks[-1]
        attn = last.attn
        batch, num_tokens, _ = x.shape
        qkv = attn.qkv(last.norm1(x)).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, h, w): SimPool's attention in simpool mode, the last block's [CLS] attention otherwise."""
        grid_h, grid_w = self._grid(x)
        if self.simpool is not None:
            _, attn = self.simpool(self.forward_tokens(x), return_attention=True)
        else:
            attn = self.get_last_selfattention(x)[:, :, 0, self.num_prefix_tokens:]
        return pooled_attention_grid(attn, grid_h, grid_w)
