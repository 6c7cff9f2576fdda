"""Samplers against independent references: LightX2V's two distill steps, the reference UniPC schedule, and diffusers'
UniPCMultistepScheduler driven directly. A toy velocity that depends on x, t and the CFG branch makes every detail
of a scheduler (timestep values and types, σ grid, noise draws, guidance) show in the result."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from cinecli.core.errors import UsageError
from cinecli.effects.preset import SamplerSpec
from cinecli.generate.sampler import choose_sampler, sample, sigmas_for

SHAPE = (1, 16, 2, 4, 6)  # [B, C, F, H, W] latents


def toy_denoise(calls: list):
    w = torch.randn(16, 16, generator=torch.Generator().manual_seed(3)) * 0.2

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: bool) -> torch.Tensor:
        calls.append((t.clone(), cond))
        return torch.einsum("ij,bjfhw->bifhw", w, x) + (t / 1000).view(-1, 1, 1, 1, 1) * (1.0 if cond else -0.5)

    return denoise


def run(spec: SamplerSpec, seed: int = 0) -> tuple[torch.Tensor, list]:
    calls: list = []
    out = sample(toy_denoise(calls), spec, SHAPE, torch.Generator().manual_seed(seed), torch.device("cpu"))
    return out, calls


def lightx2v_sigmas(step_list, shift):
    """LightX2V WanStepDistillScheduler.set_denoising_timesteps, written out: σ = linspace(1, 0, 1001)[:-1], shifted,
    indexed at 1000 - t."""
    s = np.linspace(1.0, 0.0, 1001)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return s[[1000 - t for t in step_list]]


def test_distill_schedule_is_lightx2v():
    got = sigmas_for(SamplerSpec(kind="distill", timesteps=(1000, 750, 500, 250), shift=5.0))
    want = np.append(lightx2v_sigmas([1000, 750, 500, 250], 5.0), 0.0)
    assert np.allclose(got.numpy(), want, atol=1e-12) and np.allclose(want[:4], [1.0, 0.9375, 5 / 6, 0.625])


@pytest.mark.parametrize("step", ["renoise", "euler"])
def test_distill_steps_match_lightx2v_step_post(step):
    """renoise: x0 = x - σv, then (1-σ')x0 + σ'·fresh noise (LightX2V PR #127); euler: x0 + σ'·v (later versions)."""
    spec = SamplerSpec(kind="distill", timesteps=(1000, 750, 500, 250), shift=5.0, step=step)
    got, calls = run(spec, seed=11)
    sig = list(lightx2v_sigmas([1000, 750, 500, 250], 5.0)) + [0.0]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(SHAPE, generator=g)
    denoise = toy_denoise([])
    for i in range(4):
        v = denoise(x, torch.tensor([sig[i] * 1000], dtype=torch.float32), True)
        x0 = x - sig[i] * v
        if i == 3:
            x = x0
        elif step == "euler":
            x = x0 + sig[i + 1] * v
        else:
            x = (1 - sig[i + 1]) * x0 + sig[i + 1] * torch.randn(SHAPE, generator=g)
    assert torch.allclose(got, x, atol=1e-5, rtol=1e-5)
    assert [c[1] for c in calls] == [True] * 4  # no CFG pass
    other, _ = run(SamplerSpec(kind="distill", shift=5.0, step="euler" if step == "renoise" else "renoise"), seed=11)
    assert (got - other).abs().max() > 1e-2  # the two steps give different videos for one seed


def reference_unipc_timesteps(steps: int, shift: float) -> np.ndarray:
    """Wan's FlowUniPCMultistepScheduler (shift=1 at construction): σ = linspace(σ_max = f32(0.999), 0, n+1)[:-1],
    shifted in set_timesteps, timesteps = int64(σ·1000)."""
    s = np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1]
    s = shift * s / (1 + (shift - 1) * s)
    return (s * 1000).astype(np.int64)


@pytest.mark.parametrize("steps,shift,guidance", [(50, 3.0, 5.0), (7, 5.0, 6.0), (3, 3.0, 1.0)])
def test_unipc_equals_diffusers_driven_directly_with_reference_timesteps(steps, shift, guidance):
    from diffusers import UniPCMultistepScheduler

    spec = SamplerSpec(kind="unipc", steps=steps, shift=shift, guidance=guidance)
    got, calls = run(spec, seed=5)

    # the model is fed the reference's integer timesteps, once per step (twice with CFG)
    fed = [c[0].item() for c in calls if c[1]]
    assert fed == [float(t) for t in reference_unipc_timesteps(steps, shift)]
    assert len(calls) == steps * (2 if guidance != 1.0 else 1)
    if (steps, shift) == (50, 3.0):
        assert fed[:4] == [999, 992, 985, 978]

    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0.0, steps + 1)[:-1])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    denoise = toy_denoise([])
    for t in scheduler.timesteps:
        tt = t.float().view(1)
        v = denoise(x, tt, True)
        if guidance != 1.0:
            u = denoise(x, tt, False)
            v = u + guidance * (v - u)
        x = scheduler.step(v, t, x).prev_sample
    assert torch.equal(got, x)
    euler, _ = run(SamplerSpec(kind="euler", steps=steps, shift=shift, guidance=guidance), seed=5)
    assert (got - euler).abs().max() > 1e-3  # a different solver, not Euler under another name


def test_unipc_without_diffusers_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(UsageError, match=r"pip install 'cinecli\[unipc\]'"):
        choose_sampler(SamplerSpec(kind="euler", steps=4, guidance=5.0), "unipc", None, "bb")


def test_run_options_switch_kind_and_step():
    distill = SamplerSpec(kind="distill", timesteps=(1000, 750, 500, 250), shift=5.0)
    spec, notices = choose_sampler(distill, None, "euler", "bb")
    assert spec.step == "euler" and spec.kind == "distill" and not notices
    spec, notices = choose_sampler(distill, "euler", None, "bb")
    assert (spec.kind, spec.num_steps, spec.uses_cfg) == ("euler", 4, False) and notices[0].startswith("warning")
    cfg = SamplerSpec(kind="euler", steps=30, shift=5.0, guidance=6.0)
    assert choose_sampler(cfg, "unipc", None, "bb")[0] == SamplerSpec(kind="unipc", steps=30, shift=5.0, guidance=6.0)
    for kind, step, match in [("distill", None, "not step-distilled"), (None, "euler", "applies to the distill"),
                              ("heun", None, "unknown --sampler"), (None, "lcm", "unknown --distill-step")]:
        with pytest.raises(UsageError, match=match):
            choose_sampler(cfg if kind != "heun" and step != "lcm" else distill, kind, step, "bb")
