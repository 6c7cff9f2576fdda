"""Flow-matching samplers for Wan2.1: the distilled 4-step sampler, flow Euler with CFG and flow UniPC with CFG.

Flow matching: x_t = (1-σ)·x0 + σ·ε and the model predicts v = ε - x0, so x0 = x_t - σ·v.
Shift: σ' = s·σ / (1 + (s-1)·σ). Distill and Euler feed the model the timestep σ'·1000 (fractional, never
truncated, as lightx2v); UniPC feeds the integer-truncated timesteps of the reference's scheduler.

The distill step comes in the two forms LightX2V's ``WanStepDistillScheduler.step_post`` has had
(lightx2v/models/schedulers/wan/step_distill/scheduler.py): "renoise" — x0 = x − σ·v, then re-noise to σ_next
with fresh noise (PR #127, July 2025, the consistency-model sampler the 4-step students are trained for) — and
"euler" — x ← x0 + σ_next·v, deterministic (the form of later versions, e.g. the reputationly/LightX2V fork).

All noise comes from one seeded CPU ``torch.Generator``, so a seed gives the same video on any device.

Two-expert backbones (Wan2.2 A14B) run a high-noise expert for the first steps and a low-noise one for the rest:
``expert_for`` says which, from the step index (LightX2V's ``boundary_step_index``: steps before it are high
noise, ``MultiDistillModelStruct``) or from the timestep the step feeds (Wan2.2 ``image2video.py``: high noise
while t >= boundary·1000, t being the scheduler's timestep, integers for UniPC).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import replace

import torch

from ..core.devices import on_host
from ..core.errors import NumericError, UsageError
from ..effects.preset import SamplerSpec
from ..effects.rules import DISTILL_STEPS, SAMPLER_KINDS

# denoise(x [B,16,F,H,W] fp32, t [B] float, cond: bool) → velocity [B,16,F,H,W] fp32
Denoise = Callable[[torch.Tensor, torch.Tensor, bool], torch.Tensor]
StepHook = Callable[[int, int], object]  # (step index, number of steps); wraps each step (e.g. a timer stage)


class NonFiniteError(NumericError):
    def __init__(self, step: int, hint: str = ""):
        super().__init__(f"latents became NaN/Inf at denoising step {step}{hint}")
        self.step = step


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigma / (1 + (shift - 1) * sigma)


# The reference UniPC (Wan's FlowUniPCMultistepScheduler, built with shift=1) spaces σ from its σ_max, the float32
# value of 1 - 1/1000, down to 0 (wan/utils/fm_solvers_unipc.py: __init__ and set_timesteps).
UNIPC_SIGMA_MAX = float(torch.tensor(1 - 1 / 1000, dtype=torch.float32))


def unipc_scheduler(spec: SamplerSpec):
    """diffusers' ``UniPCMultistepScheduler`` configured for flow matching, set to the reference's σ grid.

    diffusers' own flow grid is linspace(1, 1/1000); passing the reference's raw σ (which diffusers shifts by
    ``flow_shift``) gives exactly the reference's σ and integer timesteps ``int64(σ·1000)``. Needs diffusers ≥ 0.37
    (``set_timesteps(sigmas=…)``): the ``cinecli[unipc]`` extra.
    """
    try:
        from diffusers import UniPCMultistepScheduler
    except ImportError:
        raise UsageError("the unipc sampler needs diffusers: pip install 'cinecli[unipc]' (or use --sampler euler)") from None
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=spec.shift,
        solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero",
    )
    if "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise UsageError("the unipc sampler needs diffusers >= 0.37: pip install -U 'cinecli[unipc]'")
    scheduler.set_timesteps(sigmas=torch.linspace(UNIPC_SIGMA_MAX, 0, spec.steps + 1, dtype=torch.float64)[:-1].numpy())
    return scheduler


def choose_sampler(spec: SamplerSpec, kind: str | None, step: str | None, backbone: str) -> tuple[SamplerSpec, list[str]]:
    """Apply the run options ``--sampler`` and ``--distill-step`` to a backbone's or preset's sampler → (spec, notices)."""
    notices = []
    if kind is not None and kind != spec.kind:
        if kind not in SAMPLER_KINDS:
            raise UsageError(f"unknown --sampler '{kind}' ({', '.join(SAMPLER_KINDS)})")
        if kind == "distill":
            raise UsageError(f"backbone {backbone} is not step-distilled: --sampler distill needs a distilled backbone")
        if spec.kind == "distill":
            notices.append(f"warning: the {kind} sampler on a step-distilled backbone runs its {spec.num_steps} steps without "
                           "CFG; it was trained for the distill sampler")
            spec = replace(spec, steps=spec.num_steps)
        spec = replace(spec, kind=kind)
    if step is not None:
        if step not in DISTILL_STEPS:
            raise UsageError(f"unknown --distill-step '{step}' ({' or '.join(DISTILL_STEPS)})")
        if spec.kind != "distill":
            raise UsageError(f"--distill-step applies to the distill sampler; this run uses {spec.kind}")
        spec = replace(spec, step=step)
    if spec.kind == "unipc":
        unipc_scheduler(spec)  # diffusers missing or too old: fail now, before any model loads
    return spec, notices


def expert_for(spec: SamplerSpec, step: int, timestep: float) -> str:
    """Which expert runs step ``step`` (0-based) that feeds the model ``timestep``: "high_noise" or "low_noise"."""
    if spec.boundary_step_index is not None:
        return "high_noise" if step < spec.boundary_step_index else "low_noise"
    if spec.boundary is not None:
        return "high_noise" if timestep >= spec.boundary * 1000 else "low_noise"
    return "high_noise"  # one DiT: it runs every step


def timesteps_for(spec: SamplerSpec) -> list[float]:
    """The timestep each step feeds the model (as ``sample`` does): σ·1000, or UniPC's integer timesteps."""
    with on_host():
        if spec.kind == "unipc":
            return [float(t) for t in unipc_scheduler(spec).timesteps]
        return [float(s) * 1000 for s in sigmas_for(spec)[:-1]]


def expert_schedule(spec: SamplerSpec) -> list[str]:
    """The expert of every step, in order (``--dry-run`` prints where it switches)."""
    return [expert_for(spec, i, t) for i, t in enumerate(timesteps_for(spec))]


def rescale_boundary(spec: SamplerSpec, steps: int) -> SamplerSpec:
    """A distilled list's ``boundary_step_index`` for ``steps`` steps instead of its own (``--steps``): the same
    share of the schedule (2 of 4 → 4 of 8)."""
    if spec.boundary_step_index is None or spec.num_steps == steps:
        return spec
    return replace(spec, boundary_step_index=round(spec.boundary_step_index * steps / spec.num_steps))


def sigmas_for(spec: SamplerSpec) -> torch.Tensor:
    """The σ at each step plus the terminal 0, float64: [steps + 1]."""
    if spec.kind == "unipc":
        return unipc_scheduler(spec).sigmas.double()
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
    low_noise: Denoise | None = None,
) -> torch.Tensor:
    """Run the sampler from pure noise → clean latents [B,16,F,H,W] float32.

    ``step_hook(i, n)`` returns a context manager wrapped around step i (timing, progress). ``low_noise``: a
    two-expert backbone's low-noise expert, which runs the steps ``expert_for`` gives it (``denoise`` the others).
    """
    with on_host():  # the schedule is host arithmetic in float64 (read as Python floats below)
        unipc = unipc_scheduler(spec) if spec.kind == "unipc" else None
        sigmas = unipc.sigmas.double() if unipc is not None else sigmas_for(spec)
    n = len(sigmas) - 1
    x = noise_like(shape, generator, device)
    batch = shape[0]
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        timestep = float(unipc.timesteps[i]) if unipc is not None else sigma * 1000  # UniPC: integers, as the reference
        t = torch.full((batch,), timestep, device=device)
        model = low_noise if low_noise is not None and expert_for(spec, i, timestep) == "low_noise" else denoise
        with step_hook(i, n) if step_hook else contextlib.nullcontext():
            v = model(x, t, True)
            if spec.kind == "distill":
                x0 = x - sigma * v
                if i == n - 1:
                    x = x0
                elif spec.step == "euler":  # deterministic: back along the predicted velocity to σ_next
                    x = x0 + sigma_next * v
                else:  # consistency-style: jump to the clean estimate, then re-noise with *fresh* noise
                    x = (1 - sigma_next) * x0 + sigma_next * noise_like(shape, generator, device)
            else:
                if spec.uses_cfg:
                    uncond = model(x, t, False)
                    v = uncond + spec.guidance * (v - uncond)
                if unipc is not None:
                    x = unipc.step(v, unipc.timesteps[i], x, return_dict=False)[0]
                else:
                    x = x + (sigma_next - sigma) * v
            if not torch.isfinite(x).all():
                raise NonFiniteError(i + 1, nonfinite_hint)
    return x
