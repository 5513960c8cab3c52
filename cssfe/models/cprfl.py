"""The CPRFL head (Yan et al., ACM MM 2024, "Category-Prompt Refined Feature Learning"), a second
method beside CSSFE on the same backbones, text encoders, losses and schedule.

Category prompts P = MLP(E) [C, d] from the label embeddings E; visual tokens X = W F [B, N, d] from
the feature map F; a pre-norm transformer encoder over [X; P]; the output prompt tokens Z [B, C, d]
are each scored against their own prompt: logit_c = <z_c, p_c>. Both paths carry gradient into the
prompts ("dual-path back-propagation"): through the encoder (prompts as tokens) and through the
score (prompts as classifier weights). The two switches of the public code stop one path each:
``stop_feature_grad`` detaches Z in the score, ``stop_prompt_grad`` detaches P in the score.

Only standard ops (linear layers, layer norm, GELU, softmax attention), none of ``cssfe.ops``: the
head runs the same under every ``kernels`` setting. See docs/method.md for where the paper and the
public code differ and which this follows.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cssfe.models.heads import HEADS, Head


class PromptEncoderLayer(nn.Module):
    """Pre-norm multi-head self-attention + GELU feed-forward. ``residual=False`` is the public
    code's layer (each sublayer's output replaces its input); ``True`` the usual pre-norm block."""

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float, residual: bool):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head, self.residual = heads, dim_head, residual
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.out = nn.Identity() if heads == 1 and dim_head == dim else nn.Linear(inner, dim)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        b, n, _ = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        if return_attention:  # explicit softmax: the weights are wanted
            attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.dim_head), dim=-1)
            mixed = attn @ v
        else:
            attn, mixed = None, F.scaled_dot_product_attention(q, k, v)
        h = self.dropout(self.out(mixed.transpose(1, 2).reshape(b, n, -1)))
        x = x + h if self.residual else h
        h = self.dropout(self.ff(self.ff_norm(x)))
        return (x + h if self.residual else h), attn


@HEADS.register("cprfl")
class CPRFLHead(Head):
    """Feature map [B, D, h, w] -> {"logits" [B, C]} (and "maps" [B, C, h*w] with ``return_maps``:
    each prompt's attention over the visual tokens in the last layer, averaged over heads)."""

    uses_label_embeddings = True
    has_class_maps = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        embeddings: torch.Tensor,
        groups=None,
        dim: int = 128,
        depth: int = 1,
        heads: int = 8,
        dim_head: Optional[int] = None,
        mlp_dim: Optional[int] = None,
        prompt_expand: float = 0.5,
        dropout: float = 0.1,
        residual: bool = False,
        learnable_embeddings: bool = False,
        stop_feature_grad: bool = False,
        stop_prompt_grad: bool = False,
    ):
        super().__init__()
        if embeddings is None or embeddings.dim() != 2 or embeddings.shape[0] != num_classes:
            shape = None if embeddings is None else tuple(embeddings.shape)
            raise ValueError(f"cprfl head: label embeddings must be [{num_classes} classes, E], got {shape}")
        if stop_feature_grad and stop_prompt_grad:
            raise ValueError("cprfl head: stop_feature_grad and stop_prompt_grad together leave the scores without any gradient")
        for name, value in (("depth", depth), ("heads", heads), ("dim", dim)):
            if value < 1:
                raise ValueError(f"cprfl head: {name} must be >= 1, got {value}")
        # The public code: 8 heads of width 512 at model width 2048, so heads * dim_head = 2 * dim.
        dim_head = dim_head or max(1, 2 * dim // heads)
        emb = embeddings.detach().float().clone()
        if learnable_embeddings:
            self.embeddings = nn.Parameter(emb)
        else:
            self.register_buffer("embeddings", emb)
        hidden = max(1, int(dim * prompt_expand))
        self.prompt_mlp = nn.Sequential(nn.Linear(emb.shape[1], hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.visual = nn.Linear(in_channels, dim)
        self.layers = nn.ModuleList(
            PromptEncoderLayer(dim, heads, dim_head, mlp_dim or dim, dropout, residual) for _ in range(depth)
        )
        self.stop_feature_grad, self.stop_prompt_grad = stop_feature_grad, stop_prompt_grad

    @classmethod
    def config_options(cls, cfg, learnable_embeddings: bool) -> Dict:
        """``model.dim`` is the width d, ``model.head_options`` the rest (checked, naming the key at fault)."""
        check_options(cfg.head_options)
        return dict(dim=cfg.dim, learnable_embeddings=learnable_embeddings, **cfg.head_options)

    def prompts(self, dtype: torch.dtype) -> torch.Tensor:
        return self.prompt_mlp(self.embeddings.to(dtype))  # [C, d]

    def forward(self, feats: torch.Tensor, return_maps: bool = False, mask: Optional[bool] = None) -> Dict[str, torch.Tensor]:
        """``mask`` is accepted for the heads' common call signature; CPRFL has no mask."""
        b, _, h, w = feats.shape
        prompts = self.prompts(feats.dtype)
        visual = self.visual(feats.flatten(2).transpose(1, 2))  # [B, N, d]
        x = torch.cat([visual, prompts.unsqueeze(0).expand(b, -1, -1)], dim=1)
        attn = None
        for i, layer in enumerate(self.layers):
            x, attn = layer(x, return_attention=return_maps and i == len(self.layers) - 1)
        z = x[:, h * w:]  # the output prompt tokens [B, C, d]
        z = z.detach() if self.stop_feature_grad else z
        weights = prompts.detach() if self.stop_prompt_grad else prompts
        out = {"logits": (z * weights).sum(-1)}
        if return_maps:
            out["maps"] = attn[:, :, h * w:, : h * w].mean(1)  # prompt rows, visual-token columns
        return out


# What ``model.head_options`` may set (``model.dim`` is the width d).
OPTION_NAMES = ("depth", "heads", "dim_head", "mlp_dim", "prompt_expand", "dropout", "residual",
                "stop_feature_grad", "stop_prompt_grad")


def check_options(options: Dict) -> None:
    """Raise ConfigError naming ``model.head_options`` and the key at fault (called by config validation)."""
    from cssfe.config import ConfigError

    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"config key 'model.head_options': unknown cprfl option {unknown[0]!r}; valid: {', '.join(OPTION_NAMES)}")
    if options.get("stop_feature_grad") and options.get("stop_prompt_grad"):
        raise ConfigError("config key 'model.head_options': stop_feature_grad and stop_prompt_grad together leave no gradient")

