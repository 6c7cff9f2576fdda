"""Wan2.1 diffusion transformer (t2v, i2v, flf2v), any size, with the reference numerics.

Module and parameter names are the original Wan2.1 checkpoint names (``blocks.0.self_attn.q.weight``…), so
original, ComfyUI and LoRA keys map onto it without renaming, and peft can target ``self_attn.q`` directly.

Numerics follow the reference (wan2.1-reference.md §A, §K): the residual stream, modulation, gates, norms,
time embedding and head are float32; matmuls and attention run in the compute dtype (bf16/fp16/fp32);
RoPE tables are built in float64. Work that does not change between denoising steps — text and image
embeddings, the cross-attention keys and values of every block, RoPE tables — is done once per video:
``prepare_context`` returns a ``Context`` that ``forward`` fills on first use and reuses afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.devices import on_host
from .attention import attention
from .layers import Linear, weights_held


@dataclass(frozen=True)
class DiTConfig:
    model_type: str = "i2v"  # "t2v" | "i2v" | "flf2v" | "i2v-noclip" (Wan2.2 A14B: the photo enters through y only)
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 36  # 16 noise latent ‖ 4 mask ‖ 16 condition latent (i2v); 16 for t2v
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int = 1280
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def has_image_input(self) -> bool:
        """CLIP image tokens (``img_emb``, the cross-attention's ``k_img``/``v_img``): Wan2.1's i2v and flf2v."""
        return self.model_type in ("i2v", "flf2v")

    @property
    def has_latent_input(self) -> bool:
        """The mask ‖ condition latent ``y`` on the input channels: every model but t2v (Wan2.2's i2v has no CLIP)."""
        return self.model_type != "t2v"


DIT_CONFIGS: dict[str, DiTConfig] = {
    "wan2.1-t2v-1.3b": DiTConfig(model_type="t2v", in_dim=16),
    "wan2.1-fun-1.3b-inp": DiTConfig(),
    "cinemobile-1.2b": DiTConfig(num_layers=27),  # the paper's depth-pruned student of Fun-1.3B-InP
    "wan2.1-i2v-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    "wan2.1-flf2v-14b": DiTConfig(model_type="flf2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Each expert of Wan2.2-I2V-A14B (high noise, low noise): the 14B shape without the image embedding or the
    # cross-attention's image keys/values (Wan-Video/Wan2.2 wan/configs/wan_i2v_A14B.py; wan2.2-reference.md).
    "wan2.2-i2v-a14b": DiTConfig(model_type="i2v-noclip", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tiny configs for tests and the self-test backbone: real head_dim 128, so RoPE splits 44/42/42 as in release.
    "tiny-i2v": DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=32, image_dim=32, freq_dim=64),
}

FFN_CHUNK_ELEMENTS = 1 << 22  # 4M elements of FFN hidden activations per chunk: 16 MB in fp32
# Tokens × width per chunk everywhere else in a block (modulated inputs, norms, RoPE, attention queries and
# outputs, cross-attention): their temporaries stay ~16 MB (fp32) whatever the video size, so a block's memory
# is the fp32 residual stream plus one q, k and v (bench/memory.py: 480p 49 frames, 20k tokens).
TOKEN_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Chunking:
    """How a block splits its work over tokens: bounded memory against kernel launches (bench/ops.py counts both).

    The defaults bound every temporary to ~16 MB (fp32), what a CPU run within 2 GB needs. A GPU with room runs the
    whole sequence at once with every converted weight held for the block call (``whole()``): a handful of large
    GEMMs instead of thousands of small ones, which a GPU would spend launching. On devices whose SDPA materialises
    fp32 scores (MPS), ``score_bytes`` caps one attention call's score matrix [B, H, q, L], so no tensor reaches
    the device's size limit (devices.limits). The memory plan chooses (plan/memory.py) and the loader applies it.
    """

    token_elements: int | None = TOKEN_CHUNK_ELEMENTS  # tokens × width per chunk of per-token work (None: all tokens)
    ffn_elements: int | None = FFN_CHUNK_ELEMENTS  # tokens × FFN width per FFN chunk (None: all tokens)
    score_bytes: int | None = None  # one attention call's fp32 scores at most (None: the kernel makes none)
    hold_weights: bool = False  # every quantized/upcast weight converted once per block call (else the FFN's only)

    @classmethod
    def whole(cls, score_bytes: int | None = None) -> Chunking:
        return cls(token_elements=None, ffn_elements=None, score_bytes=score_bytes, hold_weights=True)

    @classmethod
    def for_device(cls, lim) -> Chunking:
        """The loader's default for a device (a ``devices.DeviceLimits`` row): bounded chunks, and where SDPA makes
        fp32 scores, each score matrix at most half the largest tensor (its softmax is a second one)."""
        return cls(score_bytes=lim.max_tensor_bytes // 2 if lim.fp32_scores and lim.max_tensor_bytes else None)

    def tokens(self, elements: int | None, width: int, n: int) -> int:
        return n if elements is None else max(1, min(n, elements // width))

    def queries(self, step: int, batch: int, heads: int, keys: int) -> int:
        """Queries per attention call: the token chunk, fewer where the fp32 scores would pass ``score_bytes``."""
        if self.score_bytes is None:
            return step
        return max(1, min(step, self.score_bytes // (batch * heads * keys * 4)))

# Parameters kept in float32 whatever the weight dtype (reference §A.6): norms and modulation tables, which
# form the fp32 residual stream directly. The time embedding, time projection and head *compute* in fp32 as
# the reference does (their inputs are fp32 and layers.Linear multiplies in the input's dtype) but keep the
# checkpoint's 16-bit weights: upcasting a bf16 checkpoint's weights to fp32 storage adds no precision.
FP32_PARAMS = ("norm", "modulation", "img_emb.proj.0", "img_emb.proj.4")


def keeps_fp32(name: str) -> bool:
    return any(part in name for part in FP32_PARAMS)


# --- building blocks ----------------------------------------------------------------------------------------------
def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t: [B] raw timesteps in [0, 1000] → [B, dim] float32, cos first, computed in float64."""
    half = dim // 2
    host = t.device if t.is_meta else torch.device("cpu")  # meta: shape traces stay on meta
    with on_host():  # float64 on the CPU, whatever the device (MPS has none), then float32 to the device
        freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=host) / half)
        args = t.to(host, torch.float64)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()
    return emb.to(t.device)


def rope_tables(head_dim: int, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """3D RoPE for a (frames, rows, cols) token grid → (cos, sin), each [L, 1, head_dim/2] float32.

    The head dim splits into frame / height / width parts of d-4(d//6), 2(d//6), 2(d//6) real dims (44/42/42
    for 128), each axis with its own denominator; rotations apply to interleaved pairs (x[2i], x[2i+1]).
    """
    f, h, w = grid
    dh = 2 * (head_dim // 6)
    dims = (head_dim - 2 * dh, dh, dh)
    with on_host():  # float64 on the CPU (MPS has none; once per grid, cached by the model), float32 to the device
        angles = []
        for d, n in zip(dims, grid):
            inv = 1.0 / torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
            angles.append(torch.arange(n, dtype=torch.float64)[:, None] * inv[None])  # [n, d/2]
        a_f, a_h, a_w = angles
        grid_angles = torch.cat([
            a_f[:, None, None].expand(f, h, w, -1),
            a_h[None, :, None].expand(f, h, w, -1),
            a_w[None, None, :].expand(f, h, w, -1),
        ], dim=-1).reshape(f * h * w, 1, head_dim // 2)  # token index = f·H·W + h·W + w
        cos, sin = torch.cos(grid_angles).float(), torch.sin(grid_angles).float()
    return cos.to(device), sin.to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, L, H, D] float32; rotate pairs (x[2i], x[2i+1]) by the table angles."""
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, H, D/2] each
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


class RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, in float32 (returns float32)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (returns float32), affine or not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)  # over the whole width, before heads

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [B, l, dim] compute dtype (any run of tokens; cos/sin its rows) → q, k, v [B, H, l, D] compute dtype.

        Views in heads-first order over token-major storage: the caller copies them into its contiguous
        [B, H, L, D] buffers (one copy, which the dtype cast needs anyway), the layout SDPA's kernels read fastest.
        """
        dtype = x.dtype
        q = apply_rope(self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)  # [B, l, H, D] fp32
        k = apply_rope(self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), cos, sin)
        return tuple(t.to(dtype).transpose(1, 2) for t in (q, k, self.v(x).unflatten(-1, (self.num_heads, -1))))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim] compute dtype → [B, L, dim] (the whole sequence at once; ``Block`` runs it in chunks)."""
        q, k, v = (t.contiguous() for t in self.qkv(x, cos, sin))  # [B, H, L, D]
        return self.o(attention(q, k, v).transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention; i2v adds an image branch whose output is summed before the one ``o``."""

    def __init__(self, dim: int, num_heads: int, eps: float, image: bool):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)
        if image:
            self.k_img, self.v_img = Linear(dim, dim), Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def key_values(self, text: torch.Tensor, image: torch.Tensor | None, store: torch.dtype) -> tuple[torch.Tensor, ...]:
        """text: [B, 512, dim], image: [B, 257|514, dim] → per-video keys/values, each [B, H, Lk, D] in ``store``.

        Kept for the whole video, so stored in the weights' 16-bit dtype even when activations run in fp32
        (30 blocks × 769 rows × 2 × 1536 fp32 would be 283 MB for the 1.3B model), and contiguous heads-first,
        the layout SDPA reads without a copy at every call.
        """
        split = lambda t: t.to(store).unflatten(-1, (self.num_heads, -1)).transpose(1, 2).contiguous()  # noqa: E731
        kv = (split(self.norm_k(self.k(text))), split(self.v(text)))
        if image is not None:
            kv += (split(self.norm_k_img(self.k_img(image))), split(self.v_img(image)))
        return kv

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, ...], text_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, L, dim] compute dtype → [B, L, dim]; text_bias: pad-row logit bias (see ``Context``)."""
        q = self.norm_q(self.q(x)).to(x.dtype).unflatten(-1, (self.num_heads, -1)).transpose(1, 2).contiguous()  # [B, H, L, D]
        kv = [t.to(x.dtype) for t in kv]  # one block's keys/values at a time in the activation dtype
        out = attention(q, kv[0], kv[1], bias=text_bias)  # [B, H, L, D]
        if len(kv) == 4:
            out = out + attention(q, kv[2], kv[3])
        return self.o(out.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True)  # the cross-attention pre-norm (affine)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps, image=cfg.has_image_input)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, kv: tuple[torch.Tensor, ...], rope: tuple, dtype: torch.dtype,
                text_bias: torch.Tensor | None = None, chunking: Chunking = Chunking()) -> torch.Tensor:
        """x: [B, L, dim] float32 residual stream (updated in place); e0: [B, 6, dim] float32 → [B, L, dim] float32.

        Same math as the reference block; only the order of work differs. Everything but the attention core is
        per token, so it runs over token chunks and adds into the residual stream in place: the live set is x, the
        whole-sequence q, k, v (self-attention needs every key) and chunk-sized temporaries — 16 B per token and
        width with fp32 activations instead of ~33 (memory_plan.DIT_STEP_PER_TOKEN_DIM).
        """
        with weights_held(self, enabled=chunking.hold_weights):
            return self._forward(x, e0, kv, rope, dtype, text_bias, chunking)

    def _forward(self, x, e0, kv, rope, dtype, text_bias, chunking: Chunking) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).unsqueeze(2).unbind(1)  # [B,1,dim]
        b, n, dim = x.shape
        cos, sin = rope
        step = chunking.tokens(chunking.token_elements, dim, n)
        heads = self.self_attn.num_heads
        # q, k, v contiguous in [B, H, L, D], the layout SDPA wants: on its strided [B, L, H, D] views the CPU
        # kernel took 1.12-1.15x the time at 7,800-20,280 tokens (bench/attention.py --layouts).
        if step >= n:  # one chunk: no preallocated buffers to copy into
            h = (self.norm1(x) * (1 + scale1) + shift1).to(dtype)
            q, k, v = (t.contiguous() for t in self.self_attn.qkv(h, cos, sin))  # [B, H, L, D]
            del h
        else:
            q, k, v = (x.new_empty(b, heads, n, dim // heads, dtype=dtype) for _ in range(3))  # [B, H, L, D]
            for s in range(0, n, step):  # q, k, v of every token before any token's residual changes
                h = (self.norm1(x[:, s:s + step]) * (1 + scale1) + shift1).to(dtype)
                q[:, :, s:s + step], k[:, :, s:s + step], v[:, :, s:s + step] = self.self_attn.qkv(
                    h, cos[s:s + step], sin[s:s + step])
        q_step = chunking.queries(step, b, heads, n)
        for s in range(0, n, q_step):  # queries in chunks, every key: exact attention, chunk-sized output
            out = attention(q[:, :, s:s + q_step], k, v).transpose(1, 2).flatten(2)  # [B, l, dim]
            x[:, s:s + q_step] += self.self_attn.o(out) * gate1
        del q, k, v
        for s in range(0, n, step):  # cross-attention is per query token
            x[:, s:s + step] += self.cross_attn(self.norm3(x[:, s:s + step]).to(dtype), kv, text_bias)
        # The FFN's hidden layer is the largest activation ([L, ffn_dim]): the same token chunking, with its own
        # chunk size. Weights held over the chunks: a quantized/upcast FFN weight is converted once per call.
        step = chunking.tokens(chunking.ffn_elements, self.ffn[0].out_features, n)
        with weights_held(self.ffn, enabled=n > step and not chunking.hold_weights):
            for s in range(0, n, step):
                h = (self.norm2(x[:, s:s + step]) * (1 + scale2) + shift2).to(dtype)
                x[:, s:s + step] += self._ffn(h) * gate2
        return x

    def _ffn(self, h: torch.Tensor) -> torch.Tensor:
        """[B, l, dim] → [B, l, dim]. Under fp16 the down projection takes its input in fp32 and returns fp32: Wan's
        FFN outputs pass fp16's 65504 (diffusers#12896: wrong Wan I2V output on MPS in fp16), bf16's range is fp32's."""
        if h.dtype != torch.float16:
            return self.ffn(h)
        return self.ffn[2](self.ffn[1](self.ffn[0](h)).float())


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x: [B, L, dim] float32, e: [B, dim] float32 (time embedding, not the 6·dim projection) → [B, L, 64]."""
        shift, scale = (self.modulation.float() + e.unsqueeze(1)).unsqueeze(2).unbind(1)  # [B, 1, dim]
        h = self.norm(x) * (1 + scale) + shift
        return self.head(h)  # h is fp32, so head.head computes in fp32


class ImageEmbedding(nn.Module):
    """CLIP features [B, 257|514, 1280] → image tokens [B, 257|514, dim]; flf2v adds ``emb_pos`` first."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d_in = cfg.image_dim
        self.proj = nn.Sequential(LayerNorm(d_in, 1e-5), Linear(d_in, d_in), nn.GELU(), Linear(d_in, cfg.dim), LayerNorm(cfg.dim, 1e-5))
        if cfg.model_type == "flf2v":
            self.emb_pos = nn.Parameter(torch.zeros(1, 514, d_in))

    def forward(self, clip_fea: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = clip_fea.float()
        if hasattr(self, "emb_pos"):
            x = x + self.emb_pos.float()
        x = self.proj[3](self.proj[2](self.proj[1](self.proj[0](x).to(dtype))))  # LayerNorms are fp32, Linears compute dtype
        return self.proj[4](x).to(dtype)


# --- the model -----------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """Per-video conditioning, computed once and reused by every denoising step of that video.

    Holds the embedded text and image [B, 257|514, dim] tokens and every block's cross-attention keys/values.
    Build a new one when the weights change (a LoRA switch).

    The reference pads the text to 512 rows and attends to every pad. All pad rows are MLP(0), so they give
    identical keys and values; attending to p identical keys equals attending to one of them with its logit
    raised by log(p). So the text keeps its L given rows plus one pad row carrying that bias: the same
    attention as the reference (to rounding), with ~20x fewer text keys/values to store and attend to.
    """

    text: torch.Tensor
    image: torch.Tensor | None
    kv: list[tuple[torch.Tensor, ...]]
    text_bias: torch.Tensor | None = None  # [1, 1, 1, Lk] additive logit bias: log(count) on the pad row


class WanDiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), Linear(dim, dim))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, dim), nn.SiLU(), Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.has_image_input:
            self.img_emb = ImageEmbedding(cfg)
        self._rope_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.compute_dtype: torch.dtype | None = None  # activations; set by the loader (devices.activation_dtype)
        self.chunking = Chunking()  # set by the loader for its device, and by the memory plan
        self.block_stream = None  # streaming.BlockStream when blocks are streamed to the device, else None

    def resident_blocks(self):
        """The blocks in order, each with its weights on the compute device while in use (see streaming.py)."""
        return iter(self.blocks) if self.block_stream is None else iter(self.block_stream)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype: ``compute_dtype`` if set, else that of the (never quantized) patch embedding."""
        return self.compute_dtype or self.patch_embedding.weight.dtype

    def prepare_context(self, context: torch.Tensor, clip_fea: torch.Tensor | None = None) -> Context:
        """Embed the conditioning once per video.

        context: [B, L, text_dim] text-encoder states, L ≤ 512, unpadded (rows past a prompt's length must be 0)
        clip_fea: [B, 257, 1280] (i2v) or [B, 514, 1280] (flf2v: first ‖ last frame) CLIP features, or None
        """
        cfg, dtype = self.config, self.dtype
        b, n, _ = context.shape
        if n > cfg.text_len:
            raise ValueError(f"text context has {n} rows, at most {cfg.text_len} allowed")
        # The reference zero-pads to 512 rows *before* the MLP (pad rows become MLP(0), not zeros). We embed one
        # zero row for all 512 - n pads and weight it by their count (see Context).
        pads = cfg.text_len - n
        padded = context.new_zeros(b, n + (pads > 0), cfg.text_dim, dtype=dtype)
        padded[:, :n] = context.to(dtype)
        text = self.text_embedding(padded)  # [B, n (+1), dim]
        bias = None
        if pads > 1:
            bias = torch.zeros(1, 1, 1, n + 1, device=text.device, dtype=torch.float32)
            bias[..., -1] = math.log(pads)
        image = None
        if cfg.has_image_input:
            if clip_fea is None:
                raise ValueError(f"a {cfg.model_type} model needs CLIP image features (clip_fea)")
            image = self.img_emb(clip_fea, dtype)
        text = text.to(dtype)
        store = self.patch_embedding.weight.dtype  # the 16-bit weight dtype (activations may be fp32)
        return Context(text=text, image=image, kv=[blk.cross_attn.key_values(text, image, store) for blk in self.resident_blocks()],
                       text_bias=bias)

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (grid, device)
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_tables(self.config.head_dim, grid, device)
        return self._rope_cache[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | Context,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity.

        x: [B, 16, F, H, W] noisy latents; t: [B] timesteps in [0, 1000] (fractional allowed)
        context: [B, L≤512, 4096] text states, or a ``Context`` from ``prepare_context`` (then clip_fea is unused)
        clip_fea: [B, 257|514, 1280] or None; y: [B, 20, F, H, W] mask ‖ condition latents (i2v/flf2v) or None
        → velocity [B, 16, F, H, W] float32
        """
        cfg, dtype = self.config, self.dtype
        ctx = context if isinstance(context, Context) else self.prepare_context(context, clip_fea)
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # [B, 36, F, H, W]: noise ‖ mask ‖ condition latent
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"model expects {cfg.in_dim} input channels, got {x.shape[1]} (is y missing?)")
        b, _, f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, h // ph, w // pw)

        # Patchify as one matmul (same math as the strided Conv3d, faster on CPU): [B, L, C·pt·ph·pw] → [B, L, dim]
        patches = x.to(dtype).unflatten(2, (grid[0], pt)).unflatten(4, (grid[1], ph)).unflatten(6, (grid[2], pw))
        patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4).flatten(1, 3)  # [B, L, C·pt·ph·pw]
        weight = self.patch_embedding.weight.flatten(1).to(dtype)
        tokens = F.linear(patches, weight, self.patch_embedding.bias.to(dtype)).float()  # [B, L, dim] residual fp32

        # Time: e [B, dim] for the head, e0 [B, 6, dim] for the blocks; float32 throughout.
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim)).float()  # fp32 in: computed in fp32
        e0 = self.time_projection(e).float().unflatten(1, (6, cfg.dim))

        rope = self.rope(grid, x.device)
        for blk, kv in zip(self.resident_blocks(), ctx.kv):
            tokens = blk(tokens, e0, kv, rope, dtype, ctx.text_bias, self.chunking)

        out = self.head(tokens, e)  # [B, L, pt·ph·pw·16], channel fastest
        out = out.view(b, *grid, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, F, pt, H, ph, W, pw]
        return out.reshape(b, cfg.out_dim, f, h, w).float()

