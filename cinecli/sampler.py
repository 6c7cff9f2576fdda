"""Flow-matching samplers for Wan2.1: the distilled 4-step sampler and flow Euler with CFG.

Flow matching: x_t = (1-σ)·x0 + σ·ε and the model predicts v = ε - x0, so x0 = x_t - σ·v.
Shift: σ' = s·σ / (1 + (s-1)·σ); the model is fed the timestep σ'·1000 (fractional, never truncated).

All noise comes from one seeded CPU ``torch.Generator``, so a seed gives the same video on any device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .errors import NumericError
from .preset import SamplerSpec

# denoise(x [B,16,F,H,W] fp32, t [B] float, cond: bool) → velocity [B,16,F,H,W] fp32
Denoise = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
StepHook = Callable[[int, int], object]  # (step index, number of steps); wraps each step (e.g. a timer stage)


class NonFiniteError(NumericError):
    def __init__(self, step: int, hint: str = ""):
        super().__init__(f"latents became NaN/Inf at denoising step {step}{hint}")
        self.step = step


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigmas_for(spec: SamplerSpec) -> torch.Tensor:
    """The σ at each step plus the terminal 0, float64: [steps + 1]."""
    if spec.kind == "distill":
        # lightx2v's schedule: σ = linspace(1, 0, 1001)[:-1] shifted, indexed at 1000 - t ⇒ raw σ = t/1000
        raw = torch.tensor(spec.timesteps, dtype=torch.float64) / 1000
    else:
        raw = torch.linspace(1, 0, spec.steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([shift_sigma(raw, spec.shift), torch.zeros(1, dtype=torch.float64)])


def noise_like(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Gaussian noise drawn on the CPU (device-independent for a seed), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device)


def sample(
    denoise: Denoise,
    spec: SamplerSpec,
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    step_hook: Callable[[int, int], object] | None = None,
    nonfinite_hint: str = "",
) -> torch.Tensor:
    """Run the sampler from pure noise → clean latents [B,16,F,H,W] float32.

    ``step_hook(i, n)`` returns a context manager wrapped around step i (timing, progress).
    """
    sigmas = sigmas_for(spec)
    n = len(sigmas) - 1
    x = noise_like(shape, generator, device)
    batch = shape[0]
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        t = torch.full((batch,), sigma * 1000, device=device)
        with step_hook(i, n) if step_hook else contextlib.nullcontext():
            v = denoise(x, t, True)
            if spec.kind == "distill":
                x0 = x - sigma * v
                # Consistency-style step: jump to the clean estimate, then re-noise with *fresh* noise.
                x = x0 if i == n - 1 else (1 - sigma_next) * x0 + sigma_next * noise_like(shape, generator, device)
            else:
                if spec.guidance != 1.0:
                    uncond = denoise(x, t, False)
                    v = uncond + spec.guidance * (v - uncond)
                x = x + (sigma_next - sigma) * v
            if not torch.isfinite(x).all():
                raise NonFiniteError(i + 1, nonfinite_hint)
    return x
