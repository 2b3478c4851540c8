"""The four operator families of a UniNet-style network plus its context-aware down-sampling.

UniNet (Liu et al., ECCV 2022) searches over convolution, transformer and MLP operators
and over *down-sampling modules* (DSMs) placed between stages. Its finding that matters for
dense prediction: convolutions serve the high-resolution early stages best, global attention
the low-resolution late ones, and a transformer stage should receive features down-sampled
with global context (queries from a strided conv, keys/values from the full-resolution
tokens) instead of a plain strided conv. The blocks here follow that recipe:

* :class:`FusedMBConv` / :class:`MBConv` (EfficientNetV2), both with squeeze-excitation;
* :class:`AttentionBlock`: pre-norm multi-head self-attention whose position information
  comes from a depth-wise 3x3 convolution (conditional position encoding - it works at any
  input size, which detection needs), plus an MLP, both behind LayerScale;
* :class:`MixerBlock`: MLP-Mixer style token mixing; to stay resolution-agnostic the token
  MLP mixes the ``w x w`` tokens of each local window (padding to whole windows);
* :class:`ContextDownsample`: strided conv ("local" DSM), optionally plus attention from the
  down-sampled queries to the full-resolution keys/values ("context" DSM).

All blocks keep NCHW in and out, so stages of different kinds can follow each other.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from agvm_ds.models.layers import ConvNormAct, DropPath, LayerScale, SqueezeExcite
from agvm_ds.partition import NORM_TYPES

__all__ = ["MBConv", "FusedMBConv", "AttentionBlock", "MixerBlock", "ContextDownsample", "Mlp"]


def _zero_last_norm(block: nn.Module) -> None:
    """Start a residual branch as the identity (Goyal et al.): its last norm's scale is 0."""
    norms = [m for m in block.modules() if isinstance(m, NORM_TYPES)]
    if norms and getattr(norms[-1], "weight", None) is not None:
        nn.init.zeros_(norms[-1].weight)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depth-wise -> SE -> 1x1 project (+ residual)."""

    def __init__(self, dim: int, expansion: float, kernel: int = 3, se_ratio: float = 0.25,
                 norm: str = "bn", drop_path: float = 0.0):
        super().__init__()
        mid = max(1, round(dim * expansion))
        self.expand = ConvNormAct(dim, mid, 1, norm=norm)
        self.dw = ConvNormAct(mid, mid, kernel, groups=mid, norm=norm)
        self.se = SqueezeExcite(mid, max(1, int(dim * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.project = ConvNormAct(mid, dim, 1, norm=norm, act=None)
        _zero_last_norm(self.project)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.project(self.se(self.dw(self.expand(x)))))


class FusedMBConv(nn.Module):
    """Fused inverted residual: kxk expand conv -> SE -> 1x1 project (+ residual).

    With ``expansion == 1`` the projection is dropped and the kxk conv maps ``dim -> dim``
    directly (EfficientNetV2's rule), since a 1x1 conv after it would add little.
    """

    def __init__(self, dim: int, expansion: float, kernel: int = 3, se_ratio: float = 0.25,
                 norm: str = "bn", drop_path: float = 0.0):
        super().__init__()
        mid = max(1, round(dim * expansion))
        single = mid == dim
        self.conv = ConvNormAct(dim, mid, kernel, norm=norm)
        self.se = SqueezeExcite(mid, max(1, int(dim * se_ratio))) if se_ratio > 0 else nn.Identity()
        self.project = nn.Identity() if single else ConvNormAct(mid, dim, 1, norm=norm, act=None)
        _zero_last_norm(self.conv if single else self.project)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.project(self.se(self.conv(x))))


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear over the last axis."""

    def __init__(self, dim: int, hidden: int, out: int | None = None):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, out or dim))


def _attend(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head scaled dot-product attention of ``[B, N, C]`` tokens -> ``[B, Nq, C]``."""
    b, nq, c = q.shape
    q = q.reshape(b, nq, heads, -1).transpose(1, 2)
    k = k.reshape(b, k.shape[1], heads, -1).transpose(1, 2)
    v = v.reshape(b, v.shape[1], heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, nq, c)


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with a depth-wise-conv position embedding and LayerScale."""

    def __init__(self, dim: int, head_dim: int, expansion: float, layer_scale: float = 1e-5,
                 drop_path: float = 0.0):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"attention block: channels {dim} not divisible by head_dim {head_dim}")
        self.heads = dim // head_dim
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, max(1, round(dim * expansion)))
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x = x + self.pos_embed(x)
        t = x.flatten(2).transpose(1, 2)  # [B, N, C]
        q, k, v = self.qkv(self.norm1(t)).chunk(3, dim=-1)
        t = t + self.drop_path(self.ls1(self.proj(_attend(q, k, v, self.heads))))
        t = t + self.drop_path(self.ls2(self.mlp(self.norm2(t))))
        return t.transpose(1, 2).reshape(b, c, h, w)


class MixerBlock(nn.Module):
    """MLP-Mixer block with window-local token mixing (any input size)."""

    def __init__(self, dim: int, window: int, expansion: float, layer_scale: float = 1e-5,
                 drop_path: float = 0.0):
        super().__init__()
        self.window = window
        tokens = window * window
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = Mlp(tokens, tokens)
        self.ls1 = LayerScale(dim, layer_scale)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, max(1, round(dim * expansion)))
        self.ls2 = LayerScale(dim, layer_scale)
        self.drop_path = DropPath(drop_path)

    def _mix_tokens(self, t: Tensor) -> Tensor:
        b, h, w, c = t.shape
        s = self.window
        ph, pw = (-h) % s, (-w) % s
        t = F.pad(t, (0, 0, 0, pw, 0, ph))
        hh, ww = (h + ph) // s, (w + pw) // s
        t = t.reshape(b, hh, s, ww, s, c).permute(0, 1, 3, 5, 2, 4).reshape(b, hh, ww, c, s * s)
        t = self.token_mlp(t)
        t = t.reshape(b, hh, ww, c, s, s).permute(0, 1, 4, 2, 5, 3).reshape(b, hh * s, ww * s, c)
        return t[:, :h, :w]

    def forward(self, x: Tensor) -> Tensor:
        t = x.permute(0, 2, 3, 1)  # NHWC
        t = t + self.drop_path(self.ls1(self._mix_tokens(self.norm1(t))))
        t = t + self.drop_path(self.ls2(self.channel_mlp(self.norm2(t))))
        return t.permute(0, 3, 1, 2)


class ContextDownsample(nn.Module):
    """Down-sampling module between stages (and channel change at stride 1).

    The local path is a strided 3x3 conv (1x1 at stride 1). With ``context=True`` each
    down-sampled position also attends to *all* full-resolution positions of the input, so
    a following transformer stage starts from globally informed tokens. The attention path
    is behind LayerScale, so the module starts as the local DSM and learns how much
    context to mix in.
    """

    def __init__(self, cin: int, cout: int, stride: int, context: bool, head_dim: int,
                 norm: str = "bn", layer_scale: float = 1e-5):
        super().__init__()
        k = 3 if stride > 1 else 1
        self.local = ConvNormAct(cin, cout, k, stride, norm=norm, act=None)
        self.context = context
        if context:
            if cout % head_dim:
                raise ValueError(f"context down-sampling: channels {cout} not divisible by "
                                 f"head_dim {head_dim}")
            self.heads = cout // head_dim
            self.q_norm = nn.LayerNorm(cout)
            self.kv_norm = nn.LayerNorm(cin)
            self.q = nn.Linear(cout, cout)
            self.kv = nn.Linear(cin, 2 * cout)
            self.proj = nn.Linear(cout, cout)
            self.ls = LayerScale(cout, layer_scale)

    def forward(self, x: Tensor) -> Tensor:
        y = self.local(x)
        if not self.context:
            return y
        b, c, h, w = y.shape
        q = self.q(self.q_norm(y.flatten(2).transpose(1, 2)))
        k, v = self.kv(self.kv_norm(x.flatten(2).transpose(1, 2))).chunk(2, dim=-1)
        ctx = self.ls(self.proj(_attend(q, k, v, self.heads)))
        return y + ctx.transpose(1, 2).reshape(b, c, h, w)
