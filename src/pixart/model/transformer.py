"""The PixArt-α / PixArt-Σ diffusion transformer (one file, official parameter names).

Parameter names follow the official code (``x_embedder``, ``t_embedder``, ``t_block``, ``y_embedder``,
``blocks.i.attn.qkv`` …) so an official checkpoint loads with no renaming; :mod:`pixart.checkpoints.diffusers`
maps them to and from diffusers. The model only predicts: it knows nothing of noise schedules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache, partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixart.errors import PixArtError
from pixart.model.config import PixArtConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sincos_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars (timesteps, sizes): cos first, then sin, as in GLIDE/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)


def pos_embed_2d(dim: int, h: int, w: int, base_size: int, scale: float, device=None) -> torch.Tensor:
    """2-D sin-cos position embedding of an h × w token grid, (h*w, dim).

    Coordinates are stretched so that any grid spans the range of the base_size grid, then divided by
    ``scale``; the first dim/2 channels encode the column (width) coordinate, the rest the row.
    Frequencies are computed in float64 as the reference implementations do.
    """
    rows = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (h, w) each
    dtype = torch.float32 if (device is not None and torch.device(device).type == "mps") else torch.float64
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=dtype, device=device) / (dim / 4))

    def axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1).to(dtype)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(grid_cols), axis(grid_rows)], dim=1).float()


class Mlp(nn.Module):
    """Two linears around an activation (official ``fc1``/``fc2`` names)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fusable_on_cpu(self.fc1, x):
            # oneDNN applies the bias and the GELU in the matmul's epilogue (the kernel inductor picks): in bf16
            # the separate GELU pass and the bias copy were about a third of fc1's time on two AVX-512 cores.
            return self.fc2(torch.ops.mkldnn._linear_pointwise(x, self.fc1.weight, self.fc1.bias, "gelu", [], "tanh"))
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def fusable_on_cpu(linear: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``linear`` then GELU may run as one oneDNN kernel: a plain nn.Linear (not int8, not a LoRA wrapper)
    in bf16 on a CPU build with oneDNN, no gradient needed (the fused op has no backward), and neither traced nor
    compiled (exports must see plain ops; inductor fuses by itself)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and type(linear) is nn.Linear
        and linear.weight.dtype == torch.bfloat16
        and not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and onednn_bf16()
    )


@cache
def onednn_bf16() -> bool:
    """This torch build has oneDNN's fused linear and this CPU runs its bf16 kernels (AVX-512 at least)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_is_mkldnn_bf16_supported")
        and bool(ops._is_mkldnn_bf16_supported())
    )


class PatchEmbed(nn.Module):
    """Latents (B, C, H, W) → tokens (B, H/p · W/p, D) by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous tokens: the transposed conv output is channels-first in memory, and the residual
        # adds would carry that layout through every block (each LayerNorm and linear then copies).
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


class TimestepEmbedder(nn.Module):
    """Scalar (timestep, or a size for micro-conditions) → 256-d sinusoid → MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sincos_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to the model width; holds α's learned null caption ``y_embedding``."""

    def __init__(self, caption_channels: int, hidden_size: int, max_length: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(max_length, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class SelfAttention(nn.Module):
    """Multi-head self-attention with optional Σ KV token compression and qk-norm.

    With compression factor r > 1, keys and values (after projection and qk-norm) are reduced r × r on
    the token grid. ``sampling`` is the official Σ option: 'conv' pools by a depthwise conv (initialised
    to average pooling) followed by a LayerNorm, the same ``sr``/``norm`` serving both; 'uniform' keeps
    every r-th row and column; 'ave' resizes by 1/r with nearest-neighbour interpolation, as the official
    code does under that name. Only 'conv' has weights.
    """

    def __init__(self, dim: int, num_heads: int, kv_factor: int = 1, qk_norm: bool = False, sampling: str = "conv"):
        super().__init__()
        self.num_heads = num_heads
        self.kv_factor = kv_factor
        self.sampling = sampling
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        if kv_factor > 1 and sampling == "conv":
            self.sr = nn.Conv2d(dim, dim, kernel_size=kv_factor, stride=kv_factor, groups=dim)
            self.norm = nn.LayerNorm(dim)
        self.q_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim) if qk_norm else nn.Identity()

    def compress(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, _, c = x.shape
        r = self.kv_factor
        x = x.transpose(1, 2).reshape(b, c, *hw)  # (B, C, h, w)
        if self.sampling == "uniform":
            x = x[:, :, ::r, ::r]
        elif self.sampling == "ave":
            x = F.interpolate(x, scale_factor=1 / r, mode="nearest")
        else:
            return self.norm(self.sr(x).flatten(2).transpose(1, 2))  # (B, h/r · w/r, C)
        return x.flatten(2).transpose(1, 2)  # (B, h/r · w/r, C)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_factor > 1:
            k, v = self.compress(k, hw), self.compress(v, hw)
        q, k, v = (t.reshape(b, -1, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; padded caption tokens are masked out."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        heads, head_dim = self.num_heads, c // self.num_heads
        q = self.q_linear(x).reshape(b, n, heads, head_dim).transpose(1, 2)
        k, v = (t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in self.kv_linear(y).chunk(2, dim=-1))
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by adaLN-single; cross-attention to text in between."""

    def __init__(self, config: PixArtConfig, kv_factor: int = 1):
        super().__init__()
        c = config.hidden_size
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(
            c, config.num_heads, kv_factor=kv_factor, qk_norm=config.qk_norm, sampling=config.kv_compress_sampling
        )
        self.cross_attn = CrossAttention(c, config.num_heads)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(c, int(c * config.mlp_ratio), c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def forward(self, x, y, t0, mask, hw):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(x.shape[0], 6, -1)
        ).chunk(6, dim=1)  # each (B, 1, C)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw)
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm, modulation by the timestep embedding t (not t0), linear to patch² · out channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def text_attention_mask(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Drop padding columns no caption in the batch uses and turn the mask into an SDPA key mask.

    Trimming is exact (masked keys have zero weight) and makes cross-attention cheaper: captions are
    padded to 120/300 tokens but usually use a few dozen. Returns (y, mask (B, 1, 1, L) bool or None).
    Under torch.jit.trace (the OpenVINO export) nothing is trimmed: the kept length is a Python int that
    a trace would freeze, so the whole padded caption is attended through the key mask instead.
    """
    if mask is None:
        return y, None
    keep = mask.to(device=y.device, dtype=torch.bool)
    keep = keep.reshape(keep.shape[0] if keep.ndim > 1 else 1, -1)  # (rows, L)
    if keep.shape[1] != y.shape[1] or y.shape[0] % keep.shape[0]:
        raise PixArtError(
            f"text mask of shape {tuple(mask.shape)} does not fit captions of shape {tuple(y.shape)}: expected "
            f"(B, {y.shape[1]}) rows for a batch of {y.shape[0]}, or a number of rows that divides it"
        )
    if keep.shape[0] != y.shape[0]:  # one row for a CFG batch: the official model repeats it the same way
        keep = keep.repeat(y.shape[0] // keep.shape[0], 1)
    keep = keep | ~keep.any(dim=1, keepdim=True)  # all padding: attend to everything, as diffusers' -10000 bias does
    if torch.jit.is_tracing():
        return y, keep[:, None, None, :]
    length = int(keep.any(dim=0).nonzero().max()) + 1
    y, keep = y[:, :length], keep[:, :length]
    return y, (None if bool(keep.all()) else keep[:, None, None, :])


BlockHook = Callable[[int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]
"""``hook(i, x, run) -> x``: stands in for block i of :meth:`PixArtTransformer.forward`.

x is the block's input tokens (B, h*w, C); ``run(x)`` runs block i on them (with gradient
checkpointing when it is on), and ``run(x, block=other)`` runs another block with the same caption,
timestep and mask (a ControlNet's copied blocks). A hook may run the block and change its output
(ControlNet adds a control residual), skip it (step caching reuses a residual), or only look (collect
features).
"""


class PixArtTransformer(nn.Module):
    """PixArt-α/Σ: noisy latents, timesteps and T5 caption features → ε (and variance) prediction."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.gradient_checkpointing = False
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(config.caption_channels, c, config.model_max_length)
        if config.micro_conditions:
            self.csize_embedder = TimestepEmbedder(c // 3)  # image (h, w), one embedding each
            self.ar_embedder = TimestepEmbedder(c // 3)  # aspect ratio h / w
        self.blocks = nn.ModuleList(PixArtBlock(config, config.kv_factor(i)) for i in range(config.depth))
        self.final_layer = FinalLayer(c, config.patch_size, config.out_channels)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation, which matters when training from scratch."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight.data  # like a linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        embedders = [self.t_embedder] + (
            [self.csize_embedder, self.ar_embedder] if self.config.micro_conditions else []
        )
        for emb in embedders:
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)  # each block starts as identity on the text path
            nn.init.zeros_(block.cross_attn.proj.bias)
            if hasattr(block.attn, "sr"):  # KV compression starts as plain average pooling
                nn.init.constant_(block.attn.sr.weight, 1.0 / block.attn.kv_factor**2)
                nn.init.zeros_(block.attn.sr.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def pos_embed(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        key = (h, w, str(device))
        if key not in self._pos_cache:
            cfg = self.config
            self._pos_cache[key] = pos_embed_2d(cfg.hidden_size, h, w, cfg.base_size, cfg.pe_scale, device)[None]
        return self._pos_cache[key]

    def embed_timestep(self, timestep, resolution=None, aspect_ratio=None) -> torch.Tensor:
        """Timestep (+ micro-conditions) → t, (B, C)."""
        t = self.t_embedder(timestep)
        if self.config.micro_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this model has micro-conditions: pass resolution (B, 2) and aspect_ratio (B,)")
            b = t.shape[0]
            resolution = resolution.reshape(-1, 2).to(t.device).expand(b, 2)
            aspect_ratio = aspect_ratio.reshape(-1, 1).to(t.device).expand(b, 1)
            csize = self.csize_embedder(resolution.reshape(-1)).reshape(b, -1)  # (B, 2C/3): h then w
            ar = self.ar_embedder(aspect_ratio.reshape(-1)).reshape(b, -1)  # (B, C/3)
            t = t + torch.cat([csize, ar], dim=1)
        return t

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        resolution: torch.Tensor | None = None,
        aspect_ratio: torch.Tensor | None = None,
        *,
        block_hook: BlockHook | None = None,
    ) -> torch.Tensor:
        """Predict noise (and variance) for latents.

        x: (B, in_channels, H, W) latents, H and W multiples of patch_size.
        timestep: (B,) or scalar diffusion timesteps in [0, 1000).
        y: (B, L, caption_channels) caption features; mask: (B, L), 1 for real tokens, 0 for padding.
        A mask of m rows, m dividing B, is repeated B/m times as the official model does (a one-row mask
        for a guidance batch [uncond, cond]).
        resolution: (B, 2) image (height, width) in pixels; aspect_ratio: (B,) height / width
        (both only for models with micro-conditions).
        block_hook: called in place of each block as ``block_hook(i, x, run)`` (see :data:`BlockHook`);
        None runs every block plainly.
        Returns (B, out_channels, H, W).
        """
        x, y, mask, t, t0, hw = self.embed(x, timestep, y, mask, resolution, aspect_ratio)
        for i, block in enumerate(self.blocks):
            if block_hook is None:
                x = self.run_block(x, y, t0, mask, hw, block)
            else:
                x = block_hook(i, x, partial(self.run_block, y=y, t0=t0, mask=mask, hw=hw, block=block))
        return self.head(x, t, hw)

    def run_block(self, x: torch.Tensor, y, t0, mask, hw, block: PixArtBlock) -> torch.Tensor:
        """One block on tokens x (B, h*w, C), recomputed in the backward pass under gradient checkpointing."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, y, t0, mask, hw, use_reentrant=False)
        return block(x, y, t0, mask, hw)

    def compile(self, *, regional: bool = False, **kwargs) -> None:
        """torch.compile in place (inductor; compiling happens on the first call).

        regional=False compiles the whole forward. regional=True compiles each block instead, for runs
        with a block hook, whose Python between blocks would break a whole-forward graph: the blocks hold
        nearly all the work, and blocks of one shape share one compiled graph ("regional compilation").
        """
        if regional:
            for block in self.blocks:
                block.compile(**kwargs)
        else:
            super().compile(**kwargs)  # in place: attributes such as .config and .y_embedder stay reachable

    def embed(self, x, timestep, y, mask=None, resolution=None, aspect_ratio=None):
        """What the blocks take, from :meth:`forward`'s inputs: (image tokens (B, h*w, C), caption tokens
        (B, L', C) trimmed of unused padding (:func:`text_attention_mask`), SDPA key mask or None, t (B, C),
        t0 (B, 6C), (h, w))."""
        b, _, height, width = x.shape
        p = self.config.patch_size
        h, w = height // p, width // p
        x = x.to(self.dtype)
        x = self.x_embedder(x) + self.pos_embed(h, w, x.device).to(x.dtype)  # (B, h*w, C)
        timestep = torch.as_tensor(timestep, device=x.device).reshape(-1).expand(b)
        t = self.embed_timestep(timestep, resolution, aspect_ratio).to(x.dtype)  # (B, C)
        t0 = self.t_block(t)  # (B, 6C)
        y, mask = text_attention_mask(y, mask)
        y = self.y_embedder(y.to(x.dtype))  # (B, L, C)
        return x, y, mask, t, t0, (h, w)

    def head(self, x: torch.Tensor, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """The last block's tokens → (B, out_channels, H, W)."""
        return self.unpatchify(self.final_layer(x, t), *hw)  # final layer: (B, h*w, p*p*out)

    def unpatchify(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) → (B, C, h*p, w*p)."""
        p, c = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)
