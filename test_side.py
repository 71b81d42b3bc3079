"""Tests for side.py. Run: python -m pytest -q

Every step of Algorithm 1 has a test aimed at its paper-relevant behaviour, and tools/mutate.py
plants a list of one-line bugs in a copy of side.py and reports which test catches each one;
every bug in that list fails this suite. A bug outside that list may still pass it."""
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import experiments
import side

torch.set_num_threads(1)  # tiny networks run fastest on one thread, and shared CI cores are not oversubscribed
ROOT = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"real sample data not found at {SHARED}")
slow = pytest.mark.skipif(os.environ.get("SIDE_SLOW") != "1",
                          reason="slow (two-process torchrun runs, bf16 at 64 px on a CPU): SIDE_SLOW=1 python -m pytest -q")

# A tiny run: every stage, a few seconds on a CPU. TINY fixes lambda, so nothing is tuned.
TINY_TUNED = ["--n", "12", "--image-size", "8", "--channels", "16,32", "--train-steps", "60", "--batch-size", "16",
              "--n-syn", "48", "--clusters", "4", "--cohesion", "0", "--clf-steps", "15", "--clf-batch", "16",
              "--n-gen", "12", "--sampler", "ddim10", "--device", "cpu"]
TINY = [*TINY_TUNED, "--guidance", "10"]


def tiny_config(**overrides) -> side.Config:
    cfg = side.Config(n=12, image_size=8, channels="16,32", train_steps=60, batch_size=16, n_syn=48, clusters=4,
                      cohesion=0.0, clf_steps=15, clf_batch=16, n_gen=12, sampler="ddim10", device="cpu",
                      out="/tmp/unused")
    cfg = side.apply_profile(cfg)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


def run_cli(*args, env=None, script="side.py"):
    """side.py (or `script`) in a subprocess: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, cwd=ROOT, timeout=300)
    return result.returncode, result.stdout, result.stderr


class Recorder(torch.nn.Module):
    """Wraps a network (or a stand-in `respond(x, t)`) and keeps a copy of every (x, t) it is asked about."""

    def __init__(self, net=None, respond=None):
        super().__init__()
        self.net, self.respond, self.calls = net, respond, []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), None if t is None else t.detach().clone()))
        return self.respond(x, t) if self.respond is not None else self.net(x, t)

    def seen(self):
        return torch.cat([x for x, _ in self.calls]), torch.cat([t for _, t in self.calls])


def one_image_repeated(count=20, seed=0):
    """`count` copies of one random 8x8 image (uint8) and that image in [-1, 1]: every x_t has a known x_0."""
    pattern = np.random.default_rng(seed).integers(0, 256, (1, 8, 8, 1), dtype=np.uint8)
    return np.repeat(pattern, count, 0), torch.from_numpy(pattern).permute(0, 3, 1, 2).float() / 127.5 - 1


def unit_noise(x_t, t, x0):
    """(x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t): the eps that made x_t from x_0 at step t."""
    abar = side.Diffusion().alpha_bar[t].float().view(-1, 1, 1, 1)
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def assert_is_q_of_xt_given_x0(x_t, t, x0):
    """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) at the t given, with t ~ U{0..T-1}."""
    eps = unit_noise(x_t, t, x0)
    per_sample = eps.pow(2).mean(dim=(1, 2, 3))  # chi-square(64) / 64 per sample: 0.3..2.5 is > 5 sigma
    assert eps.pow(2).mean().item() == pytest.approx(1.0, abs=0.06), \
        "the variance around sqrt(abar_t) x_0 is not 1 - abar_t"
    assert abs(eps.mean().item()) < 0.05
    assert per_sample.min() > 0.3 and per_sample.max() < 2.5, "some x_t was not noised at the t it was told"
    assert t.min() < 100 and t.max() > 900 and len(t.unique()) > len(t) // 3, "t is not drawn uniformly"


def spy_on_classifiers(monkeypatch):
    """Every classifier side.py builds is wrapped in a Recorder; returns the list of them."""
    built, real = [], side.build_classifier

    def build(*args, **kwargs):
        built.append(Recorder(real(*args, **kwargs)))
        return built[-1]
    monkeypatch.setattr(side, "build_classifier", build)
    return built


# ------------------------------------------------------------------------------------------------
# diffusion maths and samplers
# ------------------------------------------------------------------------------------------------

def test_forward_noising_has_the_mean_and_variance_of_q():
    diffusion, x0 = side.Diffusion(), torch.full((20000, 1, 1, 1), 0.7)
    for t in (0, 250, 999):
        a = diffusion.alpha_bar[t].item()
        x_t = diffusion.q_sample(x0, torch.full((20000,), t), torch.randn(x0.shape, generator=torch.Generator().manual_seed(t)))
        assert x_t.mean().item() == pytest.approx(0.7 * a ** 0.5, abs=0.02)
        assert x_t.var().item() == pytest.approx(1 - a, rel=0.05, abs=1e-4)
    assert diffusion.alpha_bar[-1] < 1e-4  # x_T is (almost) pure noise with T = 1000 linear betas


def test_ddpm_step_is_the_posterior_q_of_x_prev_given_x_t_and_x0():
    """DDIM with eta = 1 and t_prev = t - 1 is ancestral DDPM: mean and variance of q(x_{t-1} | x_t, x_0)."""
    diffusion, t = side.Diffusion(), 500
    x, eps, noise = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -0.8), torch.ones(1, 1, 1, 1)
    a_t, a_prev, beta = diffusion.alpha_bar[t], diffusion.alpha_bar[t - 1], diffusion.betas[t]
    x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x
    beta_tilde = (1 - a_prev) / (1 - a_t) * beta
    no_noise = side.reverse_step(x, eps, t, t - 1, 1.0, 0 * noise)
    assert no_noise.item() == pytest.approx(mean.item(), rel=1e-4)
    step = side.reverse_step(x, eps, t, t - 1, 1.0, noise) - no_noise
    assert step.item() == pytest.approx(beta_tilde.sqrt().item(), rel=1e-4)
    last = side.reverse_step(x, eps, 0, -1, 1.0, noise)  # no noise is added on the last step
    assert torch.equal(last, side.reverse_step(x, eps, 0, -1, 1.0, 0 * noise))
    # DDIM, eta = 0: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, deterministic
    ddim = side.reverse_step(x, eps, t, 480, 0.0, noise)
    a_480 = diffusion.alpha_bar[480]
    eps_clamped = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    assert ddim.item() == pytest.approx((a_480.sqrt() * x0 + (1 - a_480).sqrt() * eps_clamped).item(), rel=1e-4)
    assert side.sampling_timesteps(1000) == list(range(999, -1, -1))
    ddim_steps = side.sampling_timesteps(50)
    assert ddim_steps[:2] == [980, 960] and ddim_steps[-1] == 0
    assert side.sampling_timesteps(250)[:2] == [996, 992]  # ddpm250: the ancestral step, stride 4


def test_reverse_step_agrees_with_diffusers_ddim_and_ddpm_schedulers():
    """Against a peer. Convention: side.reverse_step clamps the x_0 estimate to [-1, 1] and then
    re-derives eps from the clamped x_0, so x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev) eps is
    consistent with the x_0 it reports, and eta = 1 with t_prev = t - 1 is exactly the DDPM posterior.
    In diffusers that is DDIMScheduler(clip_sample=True) stepped with use_clipped_model_output=True;
    its default (False) keeps the network's raw eps next to the clamped x_0, and differs wherever the
    clamp bites, which is most of the early, noisy steps."""
    diffusers = pytest.importorskip("diffusers")
    schedule = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True)
    ddim = diffusers.DDIMScheduler(**schedule, set_alpha_to_one=True, timestep_spacing="leading", steps_offset=0)
    ddim.set_timesteps(50)
    diffusion = side.Diffusion()
    steps = side.sampling_timesteps(50)
    assert [int(t) for t in ddim.timesteps] == steps
    np.testing.assert_allclose(diffusion.alpha_bar.numpy(), ddim.alphas_cumprod.numpy(), rtol=1e-5)

    def eps_model(x, t):  # a deterministic stand-in, large enough that the x_0 estimate is often clamped
        return 1.5 * torch.sin(3 * x + t / 100)

    x_side = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref, clamped = x_side.clone(), 0
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        a_t = diffusion.alpha_bar[t].float()
        clamped += int((((x_side - (1 - a_t).sqrt() * eps_model(x_side, t)) / a_t.sqrt()).abs() > 1).sum())
        one_step = ddim.step(eps_model(x_side, t), t, x_side, eta=0.0, use_clipped_model_output=True).prev_sample
        x_side = side.reverse_step(x_side, eps_model(x_side, t), t, t_prev, 0.0, 0)
        torch.testing.assert_close(x_side, one_step, atol=2e-5, rtol=1e-5)
        x_ref = ddim.step(eps_model(x_ref, t), t, x_ref, eta=0.0, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(x_side, x_ref, atol=1e-4, rtol=1e-4)  # the whole 50-step trajectory
    assert clamped > 100  # the case exercises the clamp, where the two conventions differ
    ddpm = diffusers.DDPMScheduler(**schedule, variance_type="fixed_small")
    ddpm.set_timesteps(1000)
    x0, noise, t = torch.rand(5, 1, 8, 8) * 2 - 1, torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 250, 700, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), ddpm.add_noise(x0, noise, t))  # q(x_t | x_0)
    for t in (999, 600, 100, 10, 0):  # (near t = 1, 1 - abar_t ~ 3e-4 and float32 rounding reaches 4e-4)
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(t))
        reference = ddpm.step(eps_model(x, t), t, x, generator=torch.Generator().manual_seed(7)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))  # the noise diffusers drew
        torch.testing.assert_close(side.reverse_step(x, eps_model(x, t), t, t - 1, 1.0, noise), reference,
                                   atol=1e-4, rtol=1e-4)


def test_unet_output_is_an_eps_shaped_prediction_that_depends_on_t():
    cfg, unet, _ = tiny_networks()
    torch.manual_seed(2)
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        early, late = unet(x, torch.tensor([10, 10])), unet(x, torch.tensor([900, 900]))
    assert early.shape == x.shape
    assert (early - late).abs().mean() > 1e-3  # eps_theta(x_t, t) is told t


def test_encoder_skips_are_each_blocks_output_after_its_attention():
    unet = side.UNet(1, [16, 32], 2, [8], 8)  # attention at 8 px: the first level, two blocks
    attended = []
    for layer in unet.encoder.levels[0]:
        if isinstance(layer, side.SelfAttention):
            layer.register_forward_hook(lambda module, inputs, output: attended.append(output))
    _, skips = unet.encoder(torch.randn(2, 1, 8, 8), unet.time(torch.zeros(2, dtype=torch.long)))
    assert len(skips) == 4 and len(attended) == 2  # one skip per block, as many as the decoder pops
    for skip, output in zip(skips, attended):
        assert torch.equal(skip, output)  # the decoder sees what attention made of the block's output


def test_networks_judge_each_sample_on_its_own():
    """Guidance differentiates the sum of per-sample log-probabilities (and eps_theta runs on a batch), so
    no layer, attention included, may mix the samples of a batch: batched outputs equal one-at-a-time ones."""
    cfg, unet, classifier = tiny_networks()
    cfg.attn_res = "8,4"
    torch.manual_seed(3)
    attended = side.build_classifier(cfg, 1, 3, True).eval()  # self-attention at both resolutions
    for net in (unet, classifier, attended):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 950])
    with torch.no_grad():
        for net in (unet, classifier, attended):
            alone = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(net(x, t), alone, atol=1e-5, rtol=1e-4)


def test_ddpm_loss_is_l_simple_on_q_samples_at_the_t_the_model_is_told():
    """L_simple: the model sees x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with the t of that noising,
    and its output is compared with that very eps. A zero predictor's loss is then mean(eps^2)."""
    _, x0 = one_image_repeated()
    model = Recorder(respond=lambda x, t: torch.zeros_like(x))
    loss = side.ddpm_loss(model, x0.expand(20, -1, -1, -1), torch.Generator().manual_seed(0), 400)
    x_t, t = model.seen()
    assert_is_q_of_xt_given_x0(x_t, t, x0)
    assert loss.item() == pytest.approx(unit_noise(x_t, t, x0).pow(2).mean().item(), rel=1e-4)


def test_ema_update_moves_the_average_one_minus_decay_toward_the_model():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for e, p in zip(ema.parameters(), model.parameters()):
        e.data.fill_(0.0)
        p.data.fill_(1.0)
    side.ema_update(ema, model, 0.99, step=10_000)  # past the warm-up: decay 0.99
    assert all(torch.allclose(e, torch.full_like(e, 0.01)) for e in ema.parameters())
    side.ema_update(ema, model, 0.99, step=0)  # warm-up: decay min(0.99, 1 / 10)
    assert all(torch.allclose(e, torch.full_like(e, 0.01 + 0.99 * 0.9)) for e in ema.parameters())


def tiny_networks(num_classes=3, time_dependent=True):
    cfg = tiny_config()
    torch.manual_seed(0)
    return cfg, side.build_unet(cfg, 1).eval(), side.build_classifier(cfg, 1, num_classes, time_dependent).eval()


def test_guidance_zero_gives_exactly_the_unguided_samples():
    cfg, unet, classifier = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)  # a non-trivial eps prediction
    targets = np.array([0, 1, 2, 0, 1])
    plain = side.sample(unet, cfg, 5, torch.device("cpu"))
    guided = side.sample(unet, cfg, 5, torch.device("cpu"), classifier=classifier, targets=targets, guidance=0.0)
    np.testing.assert_array_equal(plain, guided)
    pushed = side.sample(unet, cfg, 5, torch.device("cpu"), classifier=classifier, targets=targets, guidance=50.0)
    assert not np.array_equal(plain, pushed)  # ...and guidance > 0 does change them


def test_a_range_of_generations_drawn_alone_matches_the_same_range_of_a_full_draw():
    """sample(start=...) is what lets generations be split across processes by index."""
    cfg, unet, classifier = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    targets = np.array([0, 1, 2, 0, 1, 2])
    full = side.sample(unet, cfg, 6, torch.device("cpu"), classifier=classifier, targets=targets,
                       guidance=5.0)
    tail = side.sample(unet, cfg, 4, torch.device("cpu"), classifier=classifier, targets=targets[2:],
                       guidance=5.0, start=2)
    np.testing.assert_array_equal(full[2:], tail)


class Brightness(torch.nn.Module):
    """A two-class classifier with a known meaning: class 0 = bright image, class 1 = dark image."""
    def forward(self, x, t):
        score = 4 * x.mean(dim=(1, 2, 3))
        return torch.stack([score, -score], 1)


def test_guidance_raises_the_log_probability_of_the_target():
    cfg, unet, _ = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    classifier, targets = Brightness(), np.array([0, 1] * 8)

    def target_log_prob(images):
        log_p = torch.log_softmax(classifier(side.to_unit_range(images), None), 1)
        return log_p[torch.arange(len(images)), torch.as_tensor(targets)]

    base = side.sample(unet, cfg, 16, torch.device("cpu"), classifier=classifier, targets=targets, guidance=0.0)
    guided = side.sample(unet, cfg, 16, torch.device("cpu"), classifier=classifier, targets=targets, guidance=3.0)
    assert target_log_prob(guided).mean() > target_log_prob(base).mean() + 0.1
    assert (target_log_prob(guided) >= target_log_prob(base) - 1e-3).float().mean() > 0.8  # nearly every sample
    assert guided[targets == 0].mean() > guided[targets == 1].mean() + 20  # bright for 0, dark for 1


def test_guided_eps_subtracts_lambda_sqrt_one_minus_abar_times_the_gradient():
    """Eq. 1 in eps-space, checked against a classifier whose gradient is known in closed form."""
    class Linear(torch.nn.Module):  # log-softmax of [w.x, 0]; d/dx log p(0|x) = (1 - p0) w
        def forward(self, x, t):
            score = x.flatten(1).sum(1, keepdim=True)
            return torch.cat([score, torch.zeros_like(score)], 1)

    class ZeroEps(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros_like(x)

    diffusion, x, t = side.Diffusion(), torch.zeros(1, 1, 2, 2), torch.tensor([400])
    eps = side.guided_eps(ZeroEps(), Linear(), x, t, torch.tensor([0]), 2.0)
    expected = -2.0 * (1 - diffusion.alpha_bar[400]).sqrt().item() * 0.5  # p0 = 0.5 at x = 0
    assert torch.allclose(eps, torch.full_like(eps, expected), atol=1e-6)


def test_guidance_asks_the_classifier_about_the_current_x_t_at_the_current_t():
    """Algorithm 1 line 24: grad log p_phi(c | x_t, t) at the sampler's own x_t and t. The stand-in
    classifier pushes toward bright images only while t >= 500, so asking it at another t changes the result."""
    cfg, unet, _ = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    model = Recorder(unet)
    model.head = unet.head  # sample() reads the image channels from the head

    def bright_while_t_is_large(x, t):
        score = 4 * x.mean(dim=(1, 2, 3)) * (t >= 500).float()
        return torch.stack([score, -score], 1)
    classifier, targets = Recorder(respond=bright_while_t_is_large), np.zeros(3, dtype=int)
    guided = side.sample(model, cfg, 3, torch.device("cpu"), classifier=classifier, targets=targets, guidance=5.0)
    steps = side.sampling_timesteps(side.parse_sampler(cfg.sampler)[1])
    assert [int(t[0]) for _, t in classifier.calls] == steps and all((t == t[0]).all() for _, t in classifier.calls)
    assert len(model.calls) == len(classifier.calls)
    for (x_model, t_model), (x_clf, t_clf) in zip(model.calls, classifier.calls):
        assert torch.equal(x_model, x_clf) and torch.equal(t_model, t_clf)
    plain = side.sample(unet, cfg, 3, torch.device("cpu"))
    late_only = side.sample(unet, cfg, 3, torch.device("cpu"), classifier=Recorder(
        respond=lambda x, t: bright_while_t_is_large(x, 999 - t)), targets=targets, guidance=5.0)
    assert guided.mean() > plain.mean() + 5 and not np.array_equal(guided, late_only)


def test_vanishing_guidance_through_the_gradient_path_gives_the_unguided_samples():
    """lambda -> 0 through the guided code path (not the lambda = 0 shortcut): the same sampler, noise and
    seeds as the unconditional run, and guided_eps is linear in lambda."""
    cfg, unet, classifier = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    for p in classifier.parameters():
        torch.nn.init.normal_(p, std=0.2)
    targets = np.array([0, 1, 2, 1])
    for sampler in ("ddim10", "ddpm10"):  # deterministic, and with fresh noise at every step (ancestral)
        cfg.sampler = sampler
        plain = side.sample(unet, cfg, 4, torch.device("cpu")).astype(int)
        faint = side.sample(unet, cfg, 4, torch.device("cpu"), classifier=classifier, targets=targets, guidance=1e-6)
        assert np.abs(faint.astype(int) - plain).max() <= 1, sampler
    diffusion, x, t = side.Diffusion(), torch.randn(4, 1, 8, 8), torch.full((4,), 300)
    y = torch.as_tensor(targets)
    eps0, eps1, eps2 = (side.guided_eps(unet, classifier, x, t, y, lam) for lam in (1e-9, 1.0, 2.0))
    assert (eps1 - eps0).abs().max() > 1e-4
    torch.testing.assert_close(eps2 - eps0, 2 * (eps1 - eps0), atol=1e-5, rtol=1e-4)


def test_targets_are_drawn_uniformly_over_the_kept_labels():
    """Algorithm 1 line 17: c ~ U{1..K'}. Chi-square over K' bins with a bound far in the tail (p < 1e-8):
    fixed seeds make it deterministic, and a constant or a missing label exceeds it a hundredfold."""
    for kept in (2, 7, 13):
        targets = side.draw_targets(seed=3, count=2000, num_classes=kept)
        counts = np.bincount(targets, minlength=kept)
        assert len(counts) == kept and targets.min() >= 0
        chi_square = ((counts - 2000 / kept) ** 2 / (2000 / kept)).sum()
        assert chi_square < 3 * (kept - 1) + 40, (kept, counts)
    assert not np.array_equal(side.draw_targets(3, 50, 5), side.draw_targets(4, 50, 5))


def test_ddpm_sampler_is_ancestral_and_ddim_is_deterministic(monkeypatch):
    """--sampler ddpm1000 visits t = 999..0 with eta = 1 (fresh noise every step: ancestral DDPM); ddim10
    takes every 100th t with eta = 0 and no noise. A stand-in eps model keeps the 1000 steps cheap."""
    steps_taken, real_step = [], side.reverse_step

    def spy(x, eps, t, t_prev, eta, noise):
        steps_taken.append((t, t_prev, eta, float(torch.as_tensor(noise).abs().sum())))
        return real_step(x, eps, t, t_prev, eta, noise)
    monkeypatch.setattr(side, "reverse_step", spy)
    model = Recorder(respond=lambda x, t: 0.1 * x)
    model.head = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))  # sample() reads the image channels from the head
    cfg = tiny_config(sampler="ddpm1000")
    side.sample(model, cfg, 2, torch.device("cpu"))
    assert [(t, t_prev) for t, t_prev, _, _ in steps_taken] == [(t, t - 1) for t in range(999, -1, -1)]
    assert all(eta == 1.0 and noise > 0 for _, _, eta, noise in steps_taken)
    steps_taken.clear()
    side.sample(model, tiny_config(sampler="ddim10"), 2, torch.device("cpu"))
    assert [(t, t_prev) for t, t_prev, _, _ in steps_taken] == [(t, t - 100) for t in range(900, 0, -100)] + [(0, -1)]
    assert all(eta == 0.0 and noise == 0 for _, _, eta, noise in steps_taken)


# ------------------------------------------------------------------------------------------------
# surrogate labels and classifiers
# ------------------------------------------------------------------------------------------------

def test_kmeans_recovers_planted_clusters_and_drops_a_diffuse_one():
    rng = np.random.default_rng(0)
    directions = np.eye(16)[:3] * 5
    tight = [d + 0.3 * rng.standard_normal((40, 16)) for d in directions]
    diffuse = rng.standard_normal((40, 16)) * 3
    features = np.concatenate(tight + [diffuse])
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    result = side.surrogate_labels(features.astype(np.float32), clusters=4, cohesion=0.6, seed=0)
    assert len(result["kept"]) == 3  # the diffuse cluster fails the cohesion filter
    for block in range(3):  # every planted cluster maps to exactly one kept label
        assert len(np.unique(result["labels"][block * 40:(block + 1) * 40])) == 1
    assert len(np.unique(result["labels"][:120])) == 3
    assert result["sizes"].sum() == 160  # dropped-cluster samples are re-assigned, not dropped
    with pytest.raises(side.UserError, match="best cohesion"):
        side.surrogate_labels(features.astype(np.float32), clusters=4, cohesion=0.999, seed=0)


def test_time_independent_classifier_ignores_t_and_time_dependent_one_does_not():
    _, _, cond = tiny_networks(time_dependent=False)
    _, _, side_clf = tiny_networks(time_dependent=True)
    torch.manual_seed(1)
    for p in side_clf.parameters():  # break the zero-ish start so t has a visible effect
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(cond(x, torch.tensor([0, 0])), cond(x, torch.tensor([900, 900])))
        assert not torch.allclose(side_clf(x, torch.tensor([0, 0])), side_clf(x, torch.tensor([900, 900])))


def test_soft_cross_entropy_is_cross_entropy_for_one_hot_targets():
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert side.soft_cross_entropy(logits, torch.eye(4)[labels]).item() == pytest.approx(expected.item(), rel=1e-6)


def planted_clusters():
    """Five well-separated directions in 16-D: three tight clusters and two loose ones (40 each)."""
    rng = np.random.default_rng(5)
    spreads = [0.1, 0.1, 0.1, 0.5, 0.7]
    blocks = [np.eye(16)[k] + s * rng.standard_normal((40, 16)) / 4 for k, s in enumerate(spreads)]
    features = np.concatenate(blocks)
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def test_cohesion_filter_drops_exactly_the_clusters_below_tau_and_relabels_to_the_nearest_kept_centroid():
    """Algorithm 1 lines 4-5, recomputed from the planted clusters: cohesion = mean cosine to the
    cluster's (normalized) mean, keep iff >= tau, members of dropped clusters go to the nearest kept centroid."""
    features = planted_clusters()
    blocks = [slice(40 * k, 40 * (k + 1)) for k in range(5)]
    centres = np.stack([features[b].mean(0) for b in blocks])
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cohesion = np.array([(features[b] @ centres[k]).mean() for k, b in enumerate(blocks)])
    assert cohesion[:3].min() > cohesion[3:].max() + 0.05  # the case: three tight, two loose
    tau = (cohesion[:3].min() + cohesion[3:].max()) / 2
    result = side.surrogate_labels(features, clusters=5, cohesion=tau, seed=0)
    np.testing.assert_allclose(np.sort(result["cohesion"]), np.sort(cohesion[:3]), atol=1e-4)
    label_of_block = [int(np.unique(result["labels"][blocks[k]])[0]) for k in range(3)]
    for k in range(3):
        assert len(np.unique(result["labels"][blocks[k]])) == 1
    assert sorted(label_of_block) == [0, 1, 2]
    dropped = np.arange(120, 200)
    nearest_kept_block = (features[dropped] @ centres[:3].T).argmax(1)
    assert len(np.unique(nearest_kept_block)) == 3  # the re-assignment is not trivially one label
    np.testing.assert_array_equal(result["labels"][dropped], np.array(label_of_block)[nearest_kept_block])
    np.testing.assert_array_equal(result["sizes"], np.bincount(result["labels"], minlength=3))
    at_the_edge = side.surrogate_labels(features, clusters=5, cohesion=float(np.sort(result["cohesion"])[0]), seed=0)
    assert len(at_the_edge["kept"]) == 3  # a cluster whose cohesion equals tau is kept (>= tau)


def test_kmeans_starts_from_the_runs_seed_so_reported_seeds_cluster_independently():
    """Each seed's clustering starts from its own initialisation: the same seed gives the same
    partition, another seed another one (on data with many near-equal k-means optima)."""
    features = side.pixel_features(np.random.default_rng(0).integers(0, 256, (200, 4, 4, 1), dtype=np.uint8))
    cfg = tiny_config(clusters=8, cohesion=0.0)
    runs = {seed: side.label_synthetic(dataclasses.replace(cfg, seed=seed), None, {}, "cpu", features)["labels"]
            for seed in (7, 8)}
    again = side.label_synthetic(dataclasses.replace(cfg, seed=7), None, {}, "cpu", features)["labels"]
    np.testing.assert_array_equal(again, runs[7])
    from sklearn.metrics import adjusted_rand_score  # 1 only when the two partitions are the same
    assert adjusted_rand_score(runs[7], runs[8]) < 0.99


def test_pixel_features_are_the_centred_pixels_scaled_to_unit_length():
    images = np.random.default_rng(4).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    mean = images.reshape(10, -1).mean(0) / 255.0
    expected = images.reshape(10, -1) / 255.0 - mean
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(side.pixel_features(images), expected, atol=1e-5)


def inputs_seen_in_training(monkeypatch, time_dependent: bool, steps: int, batch: int):
    """Train a classifier on one image repeated; return (x0, every (x, t) its network was given)."""
    cfg = tiny_config(clf_steps=steps, clf_batch=batch)
    images, x0 = one_image_repeated()
    built = spy_on_classifiers(monkeypatch)
    targets = np.eye(3, dtype=np.float32)[np.arange(20) % 3]
    side.train_classifier(cfg, images, targets, time_dependent, torch.device("cpu"), "spied")
    return x0, built[-1].seen()


def test_time_dependent_classifier_trains_on_q_xt_given_x0_told_the_t_used(monkeypatch):
    """Eq. 2: p_phi(y | x_t, t) is trained on x_t ~ q(x_t | x_0) with t ~ U{0..T-1}, and is told that t."""
    x0, (x_t, t) = inputs_seen_in_training(monkeypatch, True, steps=12, batch=32)
    assert len(x_t) == 12 * 32
    assert_is_q_of_xt_given_x0(x_t, t, x0)


def test_time_independent_classifier_trains_on_clean_x0_only(monkeypatch):
    """Carlini Cond: p(y | x) sees the clean generated images, nothing noised."""
    x0, (x, _) = inputs_seen_in_training(monkeypatch, False, steps=5, batch=16)
    assert len(x) == 5 * 16 and torch.equal(x, x0.expand_as(x))


def bright_and_dark(count, seed):
    """Two classes a classifier must learn from x_t: label 0 = bright images, label 1 = dark images."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % 2
    images = np.where(labels[:, None, None, None] == 0, 200, 55) + rng.integers(-40, 41, (count, 8, 8, 1))
    return images.astype(np.uint8), labels


def test_classifier_learns_its_labels_and_accuracy_by_t_scores_each_range_of_t():
    cfg = tiny_config(clf_steps=40, clf_batch=32)
    images, labels = bright_and_dark(64, seed=0)
    net = side.train_classifier(cfg, images, np.eye(2, dtype=np.float32)[labels], True, torch.device("cpu"), "b")
    held_out, held_labels = bright_and_dark(40, seed=1)
    accuracy = side.accuracy_by_t(net, held_out, held_labels, torch.device("cpu"), seed=0)
    assert accuracy["t0-199"] >= 0.9, accuracy  # the labels were learnt, each with its own image
    recorder = Recorder(respond=lambda x, t: torch.stack([x.mean((1, 2, 3)), -x.mean((1, 2, 3))], 1))
    by_sign = side.accuracy_by_t(recorder, held_out, held_labels, torch.device("cpu"), seed=0)
    assert list(by_sign) == [f"t{a}-{b - 1}" for a, b in side.T_RANGES]
    for (x_t, t), (low, high) in zip(recorder.calls, side.T_RANGES):  # each range is scored on its own x_t
        assert t.min() >= low and t.max() < high
        x0 = torch.from_numpy(held_out).permute(0, 3, 1, 2).float() / 127.5 - 1
        eps = unit_noise(x_t, t, x0)
        assert eps.pow(2).mean().item() == pytest.approx(1.0, abs=0.1)
    assert by_sign["t0-199"] == 1.0 and by_sign["t800-999"] < 0.9  # the sign of the mean fades with noise


# ------------------------------------------------------------------------------------------------
# memorization metrics
# ------------------------------------------------------------------------------------------------

def test_memorization_check_flags_planted_copies_and_passes_fresh_noise():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (50, 8, 8, 1), dtype=np.uint8)
    copies = np.clip(train[[3, 3, 7]].astype(int) + rng.integers(-2, 3, (3, 8, 8, 1)), 0, 255).astype(np.uint8)
    fresh = rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
    generated = np.concatenate([copies, fresh])
    metrics = side.memorization_metrics(generated, train, side.PIXEL_BANDS, "cpu")
    per, summary = metrics["per_sample"], metrics["summary"]
    assert list(per["nn_index"][:3]) == [3, 3, 7]
    assert (per["nn_ratio"][:3] < 1 / 3).all() and (per["nn_ratio"][3:] > 1 / 3).all()
    assert summary["memorized"] == 3 and summary["unique_memorized"] == 2
    assert (per["normalized_l2"][:3] < 0.05).all() and (per["normalized_l2"][3:] > 1.0).all()
    assert summary["ams_high"] == pytest.approx(100 * 3 / 23)


def test_gu_threshold_is_one_third_not_one_half():
    """Gu et al.: memorized iff d1 / d2 < 1/3. Two generations between two flat training images, one
    at d1/d2 = 0.30 and one at 0.41: a threshold of 1/2 would flag both."""
    train = np.stack([np.full((8, 8, 1), level, np.uint8) for level in (0, 100, 255)])
    generated = np.stack([np.full((8, 8, 1), level, np.uint8) for level in (23, 29)])  # 23/77, 29/71
    per = side.memorization_metrics(generated, train, side.PIXEL_BANDS, "cpu")["per_sample"]
    np.testing.assert_allclose(per["nn_ratio"], [23 / 77, 29 / 71], rtol=1e-5)
    assert per["nn_ratio"][1] < 1 / 2
    summary = side.memorization_metrics(generated, train, side.PIXEL_BANDS, "cpu")["summary"]
    assert summary["memorized"] == 1 and summary["memorized_fraction"] == 0.5


def test_blocked_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(1)
    gen, train = rng.integers(0, 256, (37, 4, 4, 3), dtype=np.uint8), rng.integers(0, 256, (53, 4, 4, 3), dtype=np.uint8)
    dist, index = side.nearest_neighbours(gen, train, k=5, block=8)  # many blocks on both sides
    full = np.linalg.norm(gen.reshape(37, 1, -1) / 255.0 - train.reshape(1, 53, -1) / 255.0, axis=2)
    np.testing.assert_array_equal(index, np.argsort(full, axis=1)[:, :5])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :5], rtol=1e-4)


def test_pixel_similarity_band_hits_match_brute_force_over_the_whole_training_set():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, (300, 4, 4, 1), dtype=np.uint8)
    spread = np.linspace(2, 80, 40).reshape(40, 1, 1, 1)  # from near copies to loose look-alikes
    generated = np.clip(train[:40] + spread * rng.standard_normal((40, 4, 4, 1)), 0, 255).astype(np.uint8)
    dist, index = side.nearest_neighbours(generated, train, side.CARLINI_NEIGHBOURS)
    best, _, hits = side.pixel_similarity(dist, index, len(train), side.PIXEL_BANDS)
    full = np.linalg.norm(generated.reshape(40, 1, -1) / 255.0 - train.reshape(1, 300, -1) / 255.0, axis=2)
    gamma = 1 - full / (side.CARLINI_ALPHA * np.sort(full, axis=1)[:, :50].mean(1, keepdims=True))
    for name, in_band in side.band_masks(gamma, side.PIXEL_BANDS).items():
        np.testing.assert_array_equal(hits[name], in_band.any(0), err_msg=name)
    assert all(h.any() for h in hits.values())  # the case exercises every band
    np.testing.assert_allclose(best, gamma.max(1), rtol=1e-4)


def test_ams_and_ums_on_a_hand_made_case():
    """Three generations, four training images, known cosines (bands 0.4 / 0.5 / 0.6)."""
    train = np.eye(6, dtype=np.float32)[:4]  # training embeddings e0..e3; dims 4-5 are "elsewhere"
    def unit(v):
        v = np.asarray(v, dtype=np.float32)
        return v / np.linalg.norm(v)
    generated = np.stack([unit([0.95, 0.312, 0, 0, 0, 0]),       # high for train 0; train 1 at 0.31 (no band)
                          unit([0.55, 0, 0.45, 0, 0.5, 0.4966]),  # mid for train 0; train 2 at 0.45 (low band)
                          unit([0.1, 0.1, 0.1, 0.98, 0, 0])])     # high for train 3 only
    best, best_index, hits = experiments.similarity_scan(generated, train, torch.as_tensor, (0.4, 0.5, 0.6))
    assert list(best_index) == [0, 0, 3]
    summary = side.summarize(np.zeros(3, bool), best_index, np.ones(3), np.ones(3), best, hits, (0.4, 0.5, 0.6))
    assert summary["ams_high"] == pytest.approx(100 * 2 / 3)  # generations 0 and 2, each counted once
    assert summary["ams_mid"] == pytest.approx(100 / 3) and summary["ams_low"] == 0
    assert summary["ums_high"] == pytest.approx(100 * 2 / 3)  # train 0 and 3, divided by N_G = 3
    assert summary["ums_mid"] == pytest.approx(100 / 3)       # train 0
    assert summary["ums_low"] == pytest.approx(100 / 3)       # train 2: phi collects every image in the band
    assert summary["ams_ge_low"] == pytest.approx(100.0)


def test_embed_loads_a_torchscript_embedding(tmp_path):
    class Embed(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    path = tmp_path / "embed.pt"
    torch.jit.save(torch.jit.script(Embed()), str(path))
    embed = experiments.load_embedding(str(path), "cpu")
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    features = embed(images)
    assert features.shape == (5, 3)
    assert torch.allclose(features.norm(dim=1), torch.ones(5))
    (tmp_path / "junk.pt").write_text("not a model")
    with pytest.raises(side.UserError, match="TorchScript"):
        experiments.load_embedding(str(tmp_path / "junk.pt"), "cpu")


# ------------------------------------------------------------------------------------------------
# the DDPM really learns (and memorizes)
# ------------------------------------------------------------------------------------------------

def test_the_module_docstring_runs_the_lesson_from_a_python_shell_without_a_run_folder(tmp_path, monkeypatch):
    """side.py's docstring shows every stage called by hand; run it as printed, on a tiny profile."""
    shell = side.__doc__.split("Python shell")[1]
    lines = [line[4:] for line in shell.splitlines() if line.startswith("    ")]
    assert len(lines) >= 8, "the docstring should call the lesson step by step"
    tiny = dict(n=12, image_size=8, channels="16,32", train_steps=30, batch_size=16, n_syn=48, clusters=4,
                cohesion=0.0, clf_steps=5, clf_batch=16, n_gen=6, sampler="ddim5")
    monkeypatch.setattr(side, "PROFILES", {key: {**value, **tiny} for key, value in side.PROFILES.items()})
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec("\n".join(lines), scope)
    assert not list(tmp_path.iterdir()), "a lesson function wrote a file"
    assert scope["found"]["images"].shape == (6, 8, 8, 1)


def test_tiny_ddpm_memorizes_a_handful_of_images(tmp_path):
    cfg = tiny_config(n=6, train_steps=300, batch_size=32, lr=2e-3, sampler="ddim20", out=str(tmp_path))
    train, _, _ = side.load_digits(cfg)
    x0 = side.to_unit_range(train)
    model = side.train_ddpm(cfg, x0)  # from a Python shell: no run folder, no checkpoint
    generated = side.sample(model, cfg, 24, torch.device("cpu"))
    summary = side.memorization_metrics(generated, train, side.PIXEL_BANDS, "cpu")["summary"]
    assert summary["memorized_fraction"] >= 0.5, summary


# ------------------------------------------------------------------------------------------------
# Theorem 1, numerically
# ------------------------------------------------------------------------------------------------

def test_theorem1_gap_is_negative_and_tends_to_minus_kl():
    rows = experiments.theorem1_table(epsilons=(0.5, 0.05, 0.005), subset_size=20000, seed=1)
    for row in rows:
        assert row["neg_kl"] < 0
        assert all(gap <= 0.02 for eps, gap in row["gaps"].items() if eps <= 0.05)
        assert row["gaps"][0.005] == pytest.approx(row["neg_kl"], abs=0.05)


# ------------------------------------------------------------------------------------------------
# Why guidance toward a cluster copies: the 1-D toy of experiments.py section E2
# ------------------------------------------------------------------------------------------------

def test_mechanism_toy_eps_posterior_and_copy_test_match_quadrature_and_gu_s_third():
    """The toy's closed forms against brute-force quadrature over x_0: the perfect model's eps,
    the exact noisy posterior of a cell, and Gu's d1/d2 < 1/3 (not 1/2) on hand-placed points."""
    e = experiments
    grid = torch.linspace(-2.5, 2.5, 100001, dtype=torch.float64)
    mean, width, weight = e.mech_components()
    p0 = (weight * torch.exp(-((grid[:, None] - mean) / width) ** 2 / 2) / width).sum(1)
    x = torch.linspace(-1.1, 1.1, 9, dtype=torch.float64)
    lo, hi = torch.full((9,), -0.2, dtype=torch.float64), torch.full((9,), 0.2, dtype=torch.float64)
    for t in (20, 200, 600):
        abar = side.DIFFUSION.alpha_bar[t]
        joint = p0 * torch.exp(-(x[:, None] - abar.sqrt() * grid) ** 2 / (2 * (1 - abar)))
        score = (joint * (abar.sqrt() * grid - x[:, None])).sum(1) / (1 - abar) / joint.sum(1)
        assert torch.allclose(e.mech_eps(x, abar), -(1 - abar).sqrt() * score, atol=1e-6)
        in_cell = ((grid >= -0.2) & (grid < 0.2)).double()
        posterior = (joint * in_cell).sum(1) / joint.sum(1)
        assert torch.allclose(e.cell_log_posterior(x, abar, lo, hi).exp(), posterior, atol=1e-4)
    near = e.MECH_POINTS[4] + np.array([0.045, 0.06, -0.045])  # neighbours 0.2 away: ratios .29 .43
    assert e.mech_copies(near).tolist() == [True, False, True]
    assert e.mech_exact(np.array([-np.inf, np.inf]))[0][0] == pytest.approx(0.744, abs=0.002)


def test_mechanism_toy_power_prior_copies_through_one_point_cells_and_shuffled_labels_do_not():
    """lambda = 3 toward k-means cells that hold one training point each lifts the copy rate far
    above the unguided one; toward cells holding two it lowers it (the surest place is the gap);
    shuffled labels, learned by the same fitted classifier, barely push and copy no more."""
    e = experiments
    synthetic, _ = e.mech_sample(2000, 0, stream=side.STREAM_SYNTHETIC)  # N_syn, as the command
    one = e.cell_guidance(synthetic, 8, (0, 3), 0, 600)  # K = 8: one training point per cell
    two = e.cell_guidance(synthetic, 4, (3,), 0, 600)  # K = 4: two per cell
    assert one["held"].tolist() == [1] * 8 and two["held"].tolist() == [2] * 4
    base = one["copies"][0].mean()
    assert one["copies"][3].mean() > base + 0.2 and two["copies"][3].mean() < base - 0.1
    rows = {r["name"].split(" (")[0]: r for r in e.shuffled_rows(synthetic, 8, 3, 0, 300, 0.02)}
    unguided = rows["none"]["copy"]
    assert rows["k-means, fitted"]["copy"] > unguided + 0.2
    assert abs(rows["shuffled, fitted"]["copy"] - unguided) < 0.07
    assert rows["shuffled, fitted"]["push"] < 0.25 * rows["k-means, fitted"]["push"]
    assert rows["shuffled, exact posterior = w_c"]["copy"] == unguided  # gradient exactly 0
    assert rows["shuffled, fitted"]["gain"] == rows["k-means, fitted"]["gain"]  # same sizes


def test_mechanism_toy_coarse_sampler_copies_less_than_the_model_and_the_full_chain_as_much():
    """With the exact eps, the full ancestral chain samples p itself (its copy rate is p's, 0.744 by
    quadrature), while 50 DDIM steps are too coarse for spikes of width 0.02 and copy less: the
    baseline's shortfall at 50 steps is the sampler's, not the model's."""
    e = experiments
    coarse = e.mech_copies(e.mech_sample(600, 0, sampler="ddim50")[0]).mean()
    full = e.mech_copies(e.mech_sample(600, 0, sampler="ddpm1000")[0]).mean()
    exact = e.mech_exact(np.array([-np.inf, np.inf]))[0][0]
    assert coarse < exact - 0.1 and abs(full - exact) < 0.05


def test_theory_md_pointers_name_code_that_exists():
    text = (ROOT / "theory.md").read_text()
    modules = {"side": side, "experiments": experiments}
    # a pointer is `side.py: name()`, `side.py: Class`, `side.py: Class.method()` or `side.py#L10-L20 name()`,
    # and the same into experiments.py
    pointers = re.findall(r"`(side|experiments)\.py(?:#L(\d+)-L(\d+))?:?\s+([A-Za-z_][\w.]*)(?:\(\))?`", text)
    assert sum(module == "side" for module, *_ in pointers) >= 15, "theory.md should point into side.py throughout"
    for module, start, end, name in pointers:
        obj = modules[module]
        for part in name.split("."):
            assert hasattr(obj, part), f"theory.md points at {module}.py {name}, which does not exist"
            obj = getattr(obj, part)
        if start:
            source = (ROOT / f"{module}.py").read_text().splitlines()
            span = "\n".join(source[int(start) - 1:int(end)])
            assert re.search(rf"\b{re.escape(name.split('.')[-1])}\b", span), f"lines {start}-{end} no longer hold {name}"


def test_theory_md_quotes_are_verbatim_side_py():
    """Every ```python block after `<!-- quote: side.py NAME -->` is a character-for-character
    substring of side.py, and of NAME's own source (a function, class or Class.method)."""
    import inspect
    text, source = (ROOT / "theory.md").read_text(), (ROOT / "side.py").read_text()
    quotes = re.findall(r"<!-- quote: side\.py ([\w.]+) -->\n```python\n(.*?)```", text, re.S)
    assert len(quotes) == text.count("<!-- quote:"), "a quote marker not followed by a python block"
    assert len(quotes) >= 4, "theory.md should quote the code of Eq. 1 and Eq. 2"
    for name, block in quotes:
        assert block.strip() and block in source, f"theory.md's quote of {name} is not in side.py"
        obj = side
        for part in name.split("."):
            assert hasattr(obj, part), f"theory.md quotes side.py {name}, which does not exist"
            obj = getattr(obj, part)
        assert block in inspect.getsource(obj), f"theory.md's quote is not from {name}"



def test_run_exercises_runs_theory_md_s_commands_as_printed():
    """tools/run_exercises.sh holds a copy of every exercise's commands: each of its lines is a
    line of theory.md, and every exercise of theory.md has its function, so the two cannot drift
    apart unnoticed."""
    script, text = (ROOT / "tools" / "run_exercises.sh").read_text(), (ROOT / "theory.md").read_text()
    bodies = dict(re.findall(r"^ex(\w+)\(\) \{\n(.*?)^\}", script, re.S | re.M))
    exercises = set(re.findall(r"^#+ Exercise (\w+)\.", text, re.M))
    assert set(bodies) == exercises and len(exercises) == 12, "one function per exercise: 0 to 11"
    for listed in re.findall(r"^(?:EXERCISES|DEFAULT_ORDER)=\((.*)\)$", script, re.M):
        assert sorted(listed.split()) == sorted(exercises), "the script's lists name every exercise once"
    doc_lines = set(text.splitlines())
    for number, body in bodies.items():
        for line in filter(None, body.splitlines()):
            assert line in doc_lines, f"exercise {number}: {line!r} is not a line of theory.md"

# ------------------------------------------------------------------------------------------------
# real data loaders (../shared/data)
# ------------------------------------------------------------------------------------------------

@needs_shared
def test_celeba_loader_reads_the_first_images_by_name():
    cfg = tiny_config(dataset="celeba", data_root=str(SHARED), n=500, image_size=16)
    images, indices, labels = side.load_celeba(cfg)
    assert images.shape == (500, 16, 16, 3) and images.dtype == np.uint8
    assert list(indices[:3]) == [0, 1, 2] and images.std() > 20
    assert labels is None  # side.py needs no labels; experiments.py's teacher reads the identities
    identities = experiments.celeba_identities(cfg, indices)
    assert len(identities) == 500 and (identities >= 0).all() and len(np.unique(identities)) > 1
    from PIL import Image  # the first image by file name, cropped around the face and resized
    first_name = sorted(p.name for p in (SHARED / "celeba" / "img_align_celeba").glob("*.jpg"))[0]
    with Image.open(SHARED / "celeba" / "img_align_celeba" / first_name) as first:
        expected = np.asarray(first.convert("RGB").crop((19, 51, 159, 191)).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(images[0], expected)
    with pytest.raises(side.UserError, match="more than the 500"):
        side.load_celeba(tiny_config(dataset="celeba", data_root=str(SHARED), n=501))


@needs_shared
def test_cifar10_loader_reads_train_and_test_pickles_in_order():
    def options(**overrides):  # experiments.py's dataset options
        return experiments.ExperimentConfig(**{**dataclasses.asdict(tiny_config(
            dataset="cifar10", data_root=str(SHARED), n=20)), **overrides})
    images, indices, labels = experiments.load_cifar10(options(n=1000, image_size=32))
    with open(SHARED / "cifar-10-batches-py" / "data_batch_1", "rb") as handle:
        raw = pickle.load(handle, encoding="latin1")
    assert images.shape == (1000, 32, 32, 3) and list(indices[:3]) == [0, 1, 2]
    np.testing.assert_array_equal(images[5], raw["data"][5].reshape(3, 32, 32).transpose(1, 2, 0))
    np.testing.assert_array_equal(labels, raw["labels"])
    test_images, _, _ = experiments.load_cifar10(options(n=200, split="test"))
    assert test_images.shape == (200, 8, 8, 3)
    cats, _, cat_labels = experiments.load_cifar10(options(classes="3"))
    assert (cat_labels == 3).all()
    _, _, balanced = experiments.load_cifar10(options(balanced=True))
    assert np.bincount(balanced, minlength=10).tolist() == [2] * 10


def test_folder_loader_reads_images_recursively_in_path_order(tmp_path):
    from PIL import Image
    (tmp_path / "b").mkdir()
    for name, value in (("b/z.png", 200), ("a.jpg", 10), ("b/c.webp", 90)):
        Image.new("RGB", (20, 12), (value, value, value)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    images, _, _ = experiments.load_folder(tiny_config(dataset="folder", data_root=str(tmp_path), n=3, image_size=8))
    assert images.shape == (3, 8, 8, 3)
    assert [int(images[i].mean()) for i in range(3)] == pytest.approx([10, 90, 200], abs=3)


# ------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2, no traceback
# ------------------------------------------------------------------------------------------------

def bad_input_cases(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "000001.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    return {
        "extract sampler": (["--extract-sampler", "side=fast"], "--extract-sampler 'side=fast': give ddim<S>"),
        "extract sampler steps": (["--extract-sampler", "ddim3"], "with S dividing T=1000"),
        "unknown dataset": (["--dataset", "mnist"], "--dataset: invalid choice"),
        "experiments.py's dataset": (["--dataset", "cifar10"], "--dataset: invalid choice"),
        "missing celeba": (["--dataset", "celeba", "--data-root", str(tmp_path / "nowhere")],
                           "python experiments.py download --dataset celeba"),
        "too few images": (["--n", "5000"], "more than the 1797"),
        "corrupt image": (["--dataset", "celeba", "--data-root", str(corrupt), "--n", "1"], "000001.jpg"),
        "n <= 0": (["--n", "0"], "--n must be positive"),
        "image size": (["--image-size", "9"], "multiple of 2"),
        "negative guidance": (["--guidance", "-1"], "--guidance"),
        "too few clusters": (["--clusters", "1"], "--clusters"),
        "too many clusters": (["--clusters", "5000"], "--clusters"),
        "cohesion range": (["--cohesion", "1.5"], "[0, 1]"),
        "n_gen <= 0": (["--n-gen", "0"], "--n-gen"),
        "unwritable out": (["--out", str(blocker / "run")], "not writable"),
        "cuda missing": (["--device", "cuda"], "CUDA is not available"),
    }


def bad_experiments_cases(tmp_path):
    """experiments.py's own inputs: its datasets and --embed."""
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (tmp_path / "junk.pt").write_text("not a model")
    (tmp_path / "junk.pt2").write_text("not a program")
    torch.jit.save(torch.jit.script(FeatureMaps()), str(tmp_path / "maps.pt"))
    return {
        "missing root": (["--dataset", "cifar10", "--data-root", str(tmp_path / "nowhere")], "--download"),
        "empty folder": (["--dataset", "folder", "--data-root", str(empty)], "no images"),
        "extract sampler pair": (["--extract-sampler", "side=fast"], "'side=fast': give ddim<S>"),
        "extract sampler row": (["--extract-sampler", "sidee=ddim50"], "names 'sidee', which is no row"),
        "embed missing": (["--embed", str(tmp_path / "sscd.pt")], "--embed " + str(tmp_path / "sscd.pt") + " is not a file"),
        "embed not torchscript": (["--embed", str(tmp_path / "junk.pt")], "not a loadable TorchScript model"),
        "embed not export": (["--embed", str(tmp_path / "junk.pt2")], "not a loadable torch.export program"),
        "embed no vector": (["--embed", str(tmp_path / "maps.pt")], "one embedding vector per image"),
    }


class FeatureMaps(torch.nn.Module):
    """A model that returns feature maps, not one vector per image."""
    def forward(self, x):
        return x * 2


def test_every_bad_input_gets_one_clear_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = bad_input_cases(tmp_path)
    experiments_cases = bad_experiments_cases(tmp_path)
    capsys.readouterr()  # drop what building the cases printed (torch.jit's deprecation warning)
    for main, table in ((side.main, cases), (experiments.main, experiments_cases)):
        for name, (args, message) in table.items():
            code = main(["--out", str(tmp_path / "run"), *args] if "--out" not in args else args)
            err = capsys.readouterr().err
            assert code == 2, name
            assert message in err, (name, err)
            assert err.count("\n") == 1 and "Traceback" not in err, (name, err)


def test_cohesion_so_strict_that_no_cluster_survives_says_how_many_and_the_best(tmp_path, capsys):
    code = side.main([*TINY, "--out", str(tmp_path), "--cohesion", "1.0"])
    err = capsys.readouterr().err
    assert code == 2 and "keeps none of the 4 clusters (best cohesion" in err


def test_cli_errors_have_no_traceback_and_download_offline_names_the_fix(tmp_path):
    offline = {"https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    code, _, err = run_cli("download", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                           env=offline, script="experiments.py")
    assert code == 2 and "Traceback" not in err
    assert "--download of cifar10 failed" in err and "cifar-10-batches-py" in err
    code, _, err = run_cli("--dataset", "folder", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"),
                           script="experiments.py")
    assert code == 2 and "Traceback" not in err and "does not exist" in err


# ------------------------------------------------------------------------------------------------
# end to end, caching, resume and determinism
# ------------------------------------------------------------------------------------------------

def snapshot(out: Path) -> dict:
    """Every saved array, the report, and the weights of every saved network in a run folder."""
    saved = {path.name: dict(np.load(path)) for path in out.glob("*.npz")}
    for arrays in saved.values():
        arrays.pop("seconds", None)  # the wall time a row's sampling took: a measurement, not a result
    saved["report.json"] = json.loads((out / "report.json").read_text())
    for path in [out / "ddpm.pt", *sorted(out.glob("classifier_*.pt"))]:
        checkpoint = torch.load(path, weights_only=False)
        if "net" in checkpoint:  # a classifier's stage file holds the network itself
            checkpoint = dict(state=checkpoint["net"].state_dict())
        saved[path.name] = {part: checkpoint[part] for part in ("model", "ema", "state") if part in checkpoint}
    return saved


def report_rows(saved: dict) -> list:
    """The rows (methods) the snapshotted run reported, in --methods order."""
    return list(saved["report.json"]["methods"])


SPIED = ("sample", "train_classifier", "accuracy_by_t", "memorization_metrics")


@pytest.fixture(scope="module")
def tiny_run_record(tmp_path_factory):
    """The tiny run, with every call of the SPIED lesson functions recorded as (arguments by name, result),
    and a snapshot of the run folder before later tests rerun it with other settings."""
    import inspect
    out, calls = tmp_path_factory.mktemp("tiny"), {name: [] for name in SPIED}
    with pytest.MonkeyPatch.context() as patch:
        for name in SPIED:
            def spy(*args, _real=getattr(side, name), _name=name, **kwargs):
                result = _real(*args, **kwargs)
                bound = inspect.signature(_real).bind(*args, **kwargs)
                bound.apply_defaults()
                calls[_name].append((bound.arguments, result))
                return result
            patch.setattr(side, name, spy)
        assert experiments.main([*TINY, "--out", str(out)]) == 0  # every row, lambda fixed
    return out, calls, snapshot(out)


@pytest.fixture(scope="module")
def tiny_run(tiny_run_record):
    return tiny_run_record[0]


def rows_of(images: np.ndarray) -> list:
    return [image.tobytes() for image in images]


def test_classifiers_learn_from_generated_samples_only_and_are_scored_on_held_out_ones(tiny_run_record):
    """Threat model: on the k-means path the attacker's classifiers never see a training image, only the
    N_syn generations; and the accuracy reported for each is measured on generations it was not trained on."""
    _, calls, saved = tiny_run_record
    (synthetic,) = [images for args, images in calls["sample"] if args["count"] == 48]  # N_syn of TINY
    index_of = {row: i for i, row in enumerate(rows_of(synthetic))}
    assert len(index_of) == 48  # every generation is distinct, so rows identify samples
    training_rows = set(rows_of(saved["train_subset.npz"]["images"]))
    labels = saved["labels.npz"]
    trained = calls["train_classifier"]
    # the rows' classifiers in --methods order: cond p(y|x), side p(y|x_t,t), and the shuffled
    # control's p(y|x_t,t), which learns the same labels permuted among the samples (seed 0)
    assert [args["time_dependent"] for args, _ in trained] == [False, True, True]
    shuffled = experiments.shuffled_labels(tiny_config(seed=0), dict(labels))
    learned = [labels, labels, shuffled]
    assert not np.array_equal(shuffled["labels"], labels["labels"])
    for (args, net), (scored, _), learns in zip(trained, calls["accuracy_by_t"], learned):
        assert scored["net"] is net
        rows = rows_of(args["images_u8"])
        assert not training_rows & set(rows), "a classifier was trained on a training-set image"
        assert all(row in index_of for row in rows), "a classifier was trained on something not generated"
        fit = np.array([index_of[row] for row in rows])
        held = np.array([index_of[row] for row in rows_of(scored["images_u8"])])
        assert len(held) > 0 and not set(fit) & set(held), "accuracy measured on samples the classifier saw"
        np.testing.assert_array_equal(args["targets"], learns["soft"][fit])
        np.testing.assert_array_equal(scored["labels"], learns["labels"][held])
    for method in report_rows(saved):  # the evaluation draws are fresh, not the synthetic set again
        assert not set(rows_of(saved[f"samples_{method}.npz"]["images"])) & set(index_of), method


def test_each_row_guides_with_its_own_classifier_judging_what_the_row_says(tiny_run_record):
    """cond and cond_x0 share the time-independent classifier; only cond_x0 hands it the predicted
    x_0. side and shuffled each have their own."""
    _, calls, _ = tiny_run_record
    by_row = {args["desc"].removeprefix("generate "): args for args, _ in calls["sample"]
              if args["desc"].startswith("generate ")}
    assert list(by_row) == ["uncond", "cond", "cond_x0", "side", "shuffled"]
    assert by_row["uncond"]["classifier"] is None
    wrapped = by_row["cond_x0"]["classifier"]
    assert isinstance(wrapped, experiments.SeesPredictedX0) and wrapped.classifier is by_row["cond"]["classifier"]
    nets = [by_row[row]["classifier"] for row in ("cond", "side", "shuffled")]
    assert not any(isinstance(net, experiments.SeesPredictedX0) for net in nets)
    assert len({id(net) for net in nets}) == 3
    assert [by_row[row]["guidance"] for row in by_row] == [0.0, 10.0, 10.0, 10.0, 10.0]


def test_cond_classifier_is_time_independent_and_side_classifier_is_not(tiny_run_record):
    _, _, saved = tiny_run_record
    assert not any(".time" in key for key in saved["classifier_cond.pt"]["state"])
    assert any(".time" in key for key in saved["classifier_side.pt"]["state"])


def test_memorization_check_scores_every_method_against_exactly_the_train_subset(tiny_run_record):
    """The nearest neighbour of each generation is its true nearest image in train_subset.npz, by brute force."""
    _, calls, saved = tiny_run_record
    train = saved["train_subset.npz"]["images"]
    report = saved["report.json"]["methods"]
    for method in report_rows(saved):
        generated, per = saved[f"samples_{method}.npz"]["images"], saved[f"nn_{method}.npz"]
        dist = np.linalg.norm(generated.reshape(len(generated), 1, -1) / 255.0
                              - train.reshape(1, len(train), -1) / 255.0, axis=2)
        ranked = np.sort(dist, axis=1)
        np.testing.assert_array_equal(per["nn_index"], dist.argmin(1), err_msg=method)
        np.testing.assert_allclose(per["d1"], ranked[:, 0], rtol=1e-4, atol=1e-6, err_msg=method)
        np.testing.assert_allclose(per["d2"], ranked[:, 1], rtol=1e-4, atol=1e-6, err_msg=method)
        assert report[method]["memorized"] == int((ranked[:, 0] / ranked[:, 1] < 1 / 3).sum())
    assert all(len(args["train"]) == len(train) for args, _ in calls["memorization_metrics"])


def test_guided_methods_share_their_targets_and_draw_them_from_the_kept_labels(tiny_run_record):
    _, _, saved = tiny_run_record
    kept = len(saved["labels.npz"]["kept"])
    side_targets = saved["samples_side.npz"]["targets"]
    assert side_targets.min() >= 0 and side_targets.max() < kept
    for method in report_rows(saved):  # every method uses the same per-sample seeds
        if method != "uncond":  # ...and every guided one the same targets
            np.testing.assert_array_equal(saved[f"samples_{method}.npz"]["targets"], side_targets)
        np.testing.assert_array_equal(saved[f"samples_{method}.npz"]["seeds"], saved["samples_uncond.npz"]["seeds"])


def test_tiny_run_writes_every_output_with_sane_contents(tiny_run):
    for name in ("config.json", "train_subset.npz", "samples_uncond.npz", "samples_cond.npz", "samples_side.npz",
                 "ddpm.pt", "classifier_side.pt", "classifier_cond.pt", "labels.npz", "report.json", "report.md",
                 "nn_side.npz", "figures/matches.png"):
        assert (tiny_run / name).is_file(), name
    subset = np.load(tiny_run / "train_subset.npz")
    assert subset["images"].shape == (12, 8, 8, 1) and subset["images"].dtype == np.uint8
    assert list(subset["indices"]) == list(range(12))
    side_samples = np.load(tiny_run / "samples_side.npz")
    assert side_samples["images"].shape == (12, 8, 8, 1) and len(side_samples["seeds"]) == 12
    assert side_samples["targets"].min() >= 0
    report = json.loads((tiny_run / "report.json").read_text())
    for method in ("uncond", "cond", "side"):
        m = report["methods"][method]
        assert m["n_generated"] == 12 and 0 <= m["memorized_fraction"] <= 1
        assert m["unique_memorized"] <= m["memorized"] and m["median_nn_ratio"] > 0
    assert report["timings_s"]["total"] > 0 and "train" in report["timings_s"]
    assert "| side |" in (tiny_run / "report.md").read_text()
    assert set(report["classifier_accuracy_by_t"]["side"]) == {f"t{a}-{b - 1}" for a, b in side.T_RANGES}
    assert report["labels"]["features"].startswith("pixels") and "pixels" in report["similarity"]["space"]


def test_changed_guidance_reruns_only_guided_sampling(tiny_run, capsys):
    before = {name: (tiny_run / name).stat().st_mtime_ns for name in
              ("ddpm.pt", "classifier_side.pt", "classifier_cond.pt", "samples_uncond.npz", "samples_side.npz")}
    assert side.main([*TINY, "--out", str(tiny_run), "--guidance", "3"]) == 0
    out = capsys.readouterr().out
    assert "ddpm.pt: trained" in out and "classifier_side.pt: up to date" in out
    assert "samples_side.npz: made with --guidance 10.0 (saved) vs 3.0 (now); recomputing it" in out
    after = {name: (tiny_run / name).stat().st_mtime_ns for name in before}
    for name in ("ddpm.pt", "classifier_side.pt", "classifier_cond.pt", "samples_uncond.npz"):
        assert after[name] == before[name], f"{name} was redone"
    assert after["samples_side.npz"] != before["samples_side.npz"]


def test_sweep_reuses_the_trained_ddpm(tiny_run, capsys):
    stamp = (tiny_run / "ddpm.pt").stat().st_mtime_ns
    assert experiments.main([*TINY, "--out", str(tiny_run), "--sweep", "guidance=0,5"]) == 0
    assert "train DDPM" not in capsys.readouterr().err
    assert (tiny_run / "ddpm.pt").stat().st_mtime_ns == stamp
    sweep = json.loads((tiny_run / "sweep.json").read_text())
    assert [row["value"] for row in sweep["rows"]] == [0.0, 5.0]
    # lambda = 0: side and cond draw the same seeds through the same sampler as the baseline, so every
    # number agrees; at lambda = 5 guidance must move them
    for method in ("side", "cond"):
        assert sweep["rows"][0][method] == sweep["rows"][0]["uncond"], method
    assert sweep["rows"][1]["side"] != sweep["rows"][1]["uncond"]
    assert (tiny_run / "figures" / "sweep_guidance.png").is_file()


def test_sampler_sweep_resamples_only_the_extraction_and_draws_the_curve(tiny_run, capsys):
    """A sweep of the extraction sampler keeps Part 1 (the labels and classifiers were sampled with
    --sampler) and reruns only the rows' generations; the report names both samplers, and the curve
    gives each row's Gu % and cost per sampler."""
    stamps = {name: (tiny_run / name).stat().st_mtime_ns for name in ("ddpm.pt", "synthetic.npz", "labels.npz")}
    args = [*TINY, "--methods", "uncond,side", "--out", str(tiny_run), "--sweep", "extract_sampler=ddim5,ddpm10"]
    assert experiments.main(args) == 0
    assert {name: (tiny_run / name).stat().st_mtime_ns for name in stamps} == stamps
    samples = np.load(tiny_run / "samples_side.npz")
    assert str(samples["sampler"]) == "ddpm10" and float(samples["seconds"]) > 0
    report = json.loads((tiny_run / "report.json").read_text())
    assert report["part1_sampler"] == "ddim10" and report["samplers"] == {"uncond": "ddpm10", "side": "ddpm10"}
    assert "samplers: Part 1 ddim10; uncond ddpm10, side ddpm10" in (tiny_run / "report.md").read_text()
    curve = (tiny_run / "sampler_curve.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in curve[2:]] == ["| ddim5", "| ddpm10"]
    assert (tiny_run / "figures" / "sampler_curve.png").is_file()
    capsys.readouterr()


def test_changed_settings_names_every_setting_that_differs_in_either_direction():
    """The one validity check of stage files and checkpoints: a setting only the saved file has (a
    teacher's labels, say) counts as changed too, so such a file is never reused."""
    teacher = dict(clusters=4, surrogate="teacher")
    assert side.changed_settings(teacher, dict(clusters=4), "saved") == ["--surrogate teacher (saved) vs None (now)"]
    assert side.changed_settings(dict(clusters=4), dict(clusters=5), "saved") == ["--clusters 4 (saved) vs 5 (now)"]
    assert side.changed_settings(teacher, dict(teacher), "saved") == []


def test_checkpoint_of_another_run_is_not_loaded_silently(tiny_run, capsys):
    assert side.main([*TINY, "--out", str(tiny_run), "--channels", "16,16"]) == 2
    err = capsys.readouterr().err
    assert "--channels 16,32 (checkpoint) vs 16,16 (now)" in err and "--fresh" in err


def test_a_damaged_stage_file_is_recomputed_with_one_line_saying_why(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "run" / "labels.npz").write_bytes(b"junk, as after a hand edit")
    uncond = dict(np.load(tmp_path / "run" / "samples_uncond.npz"))
    uncond.pop("stage_settings")  # as an older side.py wrote it
    np.savez(tmp_path / "run" / "samples_uncond.npz", **uncond)
    assert side.main([*TINY, "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if "cannot be read" in line]
    assert len(lines) == 1 and "labels.npz" in lines[0] and "recomputing" in lines[0], lines
    assert "  samples_uncond.npz: saved without its settings; recomputing it" in out
    labels = np.load(tmp_path / "run" / "labels.npz")
    assert labels["soft"].shape[0] == 48 and len(labels["kept"]) > 0


def test_a_checkpoint_trained_with_other_dataset_options_is_refused_by_name(tmp_path):
    cfg = experiments.apply_profile(experiments.ExperimentConfig(device="cpu", dataset="cifar10", out=str(tmp_path)))
    torch.save(dict(config=dataclasses.asdict(cfg)), tmp_path / "ddpm.pt")
    experiments.ExperimentFolder(cfg, torch.device("cpu"))  # the same options: accepted
    cfg.split = "test"
    with pytest.raises(side.UserError, match=r"--split train \(checkpoint\) vs test \(now\)"):
        experiments.ExperimentFolder(cfg, torch.device("cpu"))


def test_an_unreadable_checkpoint_stops_with_the_fix_and_touches_nothing(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    checkpoint = (run / "ddpm.pt").read_bytes()
    (run / "ddpm.pt").write_bytes(checkpoint[:len(checkpoint) // 2])  # as a half-copied file
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert side.main([*TINY, "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ddpm.pt cannot be read" in err and "--fresh" in err and "delete" in err, err
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_a_classifier_saved_by_the_command_line_loads_where_side_is_imported(tmp_path):
    """python side.py runs as the module `side`, so its stage files name side.Classifier, not __main__'s:
    experiments.py and a Python shell reuse them."""
    code, _, err = run_cli(*TINY, "--methods", "side", "--train-steps", "10", "--n-gen", "4", "--out", str(tmp_path))
    assert code == 0, err
    saved = torch.load(tmp_path / "classifier_side.pt", weights_only=False)
    assert isinstance(saved["net"], side.Classifier) and saved["net"].time is not None


def test_interrupted_training_resumes_and_matches_an_uninterrupted_run(tmp_path, capsys):
    args = [*TINY, "--ckpt-every", "20", "--methods", "uncond"]  # the DDPM's samples show any drift
    code, _, err = run_cli(*args, "--out", str(tmp_path / "a"), env={"SIDE_STOP_AT_STEP": "30"})
    assert code == 2 and "stopped at step 30" in err and "Traceback" not in err
    capsys.readouterr()
    assert side.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert "resuming DDPM training from step 30" in capsys.readouterr().out
    assert side.main([*args, "--out", str(tmp_path / "b")]) == 0  # the same run, never stopped
    resumed, straight = (json.loads((tmp_path / r / "report.json").read_text())["methods"] for r in "ab")
    assert resumed == straight


def test_same_seed_reproduces_every_number_and_every_saved_array(tiny_run_record, tmp_path):
    """Every method's numbers, the classifier accuracies, every .npz array and every network's weights."""
    first = tiny_run_record[2]
    assert experiments.main([*TINY, "--out", str(tmp_path)]) == 0
    second = snapshot(tmp_path)
    assert sorted(first) == sorted(second)
    for key in ("methods", "classifier_accuracy_by_t", "labels", "similarity"):
        assert first["report.json"][key] == second["report.json"][key], key
    for name in first:
        if name == "report.json":
            continue
        assert sorted(first[name]) == sorted(second[name]), name
        for part, value in first[name].items():
            if isinstance(value, dict):  # network weights
                assert all(torch.equal(value[k], second[name][part][k]) for k in value), (name, part)
            else:
                np.testing.assert_array_equal(value, second[name][part], err_msg=f"{name}: {part}")


def test_teacher_labels_run_end_to_end(tmp_path):
    assert experiments.main([*TINY, "--out", str(tmp_path), "--labels", "teacher", "--methods", "uncond,side"]) == 0
    labels = np.load(tmp_path / "labels.npz")
    assert labels["soft"].shape == (48, 10)  # soft teacher predictions over the 10 digit classes
    np.testing.assert_allclose(labels["soft"].sum(1), 1, rtol=1e-5)


@needs_shared
def test_tiny_cifar10_run_completes(tmp_path):
    assert experiments.main([*TINY, "--dataset", "cifar10", "--data-root", str(SHARED), "--out", str(tmp_path),
                             "--methods", "uncond,side"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"]["side"]["n_generated"] == 12
    assert np.load(tmp_path / "train_subset.npz")["images"].shape == (12, 8, 8, 3)


def test_a_diverging_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_loss, calls = side.ddpm_loss, []

    def loss_that_diverges_at_step_25(*args):
        calls.append(1)
        return torch.tensor(float("nan")) if len(calls) > 25 else real_loss(*args)
    monkeypatch.setattr(side, "ddpm_loss", loss_that_diverges_at_step_25)
    assert side.main([*TINY, "--out", str(tmp_path), "--ckpt-every", "10"]) == 2
    err = capsys.readouterr().err
    assert "DDPM loss became nan at step 25" in err and "lower --lr" in err and "Traceback" not in err
    saved = torch.load(tmp_path / "ddpm.pt", weights_only=False)
    assert saved["step"] == 20 and all(torch.isfinite(v).all() for v in saved["model"].values())


def test_cond_x0_feeds_the_classifier_the_predicted_x0():
    cfg, unet, classifier = tiny_networks(time_dependent=False)
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    diffusion, x, t = side.Diffusion(), torch.randn(2, 1, 8, 8), torch.tensor([700, 700])
    a = diffusion.alpha_bar[700].float()
    with torch.no_grad():
        x0_hat = (x - (1 - a).sqrt() * unet(x, t)) / a.sqrt()
        wrapped = experiments.SeesPredictedX0(classifier, unet)
        assert torch.allclose(wrapped(x, t), classifier(x0_hat, t), atol=1e-5)
        assert not torch.allclose(wrapped(x, t), classifier(x, t), atol=1e-3)


def test_the_baseline_alone_needs_no_labels_or_classifier(tmp_path):
    assert side.main([*TINY, "--out", str(tmp_path), "--methods", "uncond"]) == 0
    assert not (tmp_path / "labels.npz").exists() and not (tmp_path / "classifier_side.pt").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert list(report["methods"]) == ["uncond"] and report["labels"] is None


# ------------------------------------------------------------------------------------------------
# the protocol: controls, lambda tuned on a seed never reported, several seeds, one aggregate
# ------------------------------------------------------------------------------------------------

def test_shuffled_control_keeps_cluster_sizes_and_changes_assignments():
    labels = np.repeat(np.arange(5), [40, 30, 20, 6, 4])
    surrogate = dict(labels=labels, soft=np.eye(5, dtype=np.float32)[labels], kept=np.arange(5),
                     sizes=np.bincount(labels))
    shuffled = experiments.shuffled_labels(tiny_config(seed=0), surrogate)
    np.testing.assert_array_equal(np.bincount(shuffled["labels"], minlength=5), np.bincount(labels))
    assert (shuffled["labels"] != labels).mean() > 0.5  # a random permutation moves ~70 % here
    np.testing.assert_array_equal(shuffled["soft"].argmax(1), shuffled["labels"])  # soft rows move along
    np.testing.assert_array_equal(experiments.shuffled_labels(tiny_config(seed=0), surrogate)["labels"],
                                  shuffled["labels"])
    assert not np.array_equal(experiments.shuffled_labels(tiny_config(seed=1), surrogate)["labels"],
                              shuffled["labels"])
    np.testing.assert_array_equal(surrogate["labels"], labels)  # the surrogate labels are untouched


def test_oracle_labels_name_each_sample_s_nearest_training_image():
    train = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1)).astype(np.uint8)
    synthetic = np.clip(train[[4, 4, 1, 5]].astype(int) + 3, 0, 255).astype(np.uint8)
    oracle = experiments.oracle_labels(tiny_config(), None, synthetic, dict(images=train))
    assert list(oracle["kept"][oracle["labels"]]) == [4, 4, 1, 5]
    assert oracle["soft"].shape == (4, 3) and list(oracle["sizes"]) == [1, 2, 1]


def test_cond_x0_alone_judges_the_predicted_x0_and_each_control_relabels_as_it_says():
    cfg = tiny_config(methods="cond,cond_x0,side,shuffled,oracle", guidance="cond=0.3,cond_x0=1,side=30,shuffled=3,oracle=10")
    rows = side.method_rows(cfg, experiments.METHODS)
    assert [row.guidance for row in rows] == [0.3, 1, 30, 3, 10]  # each row carries its own lambda
    assert [row.judge for row in rows] == [None, experiments.SeesPredictedX0, None, None, None]
    assert [row.classifier for row in rows] == ["cond", "cond", "side", "shuffled", "oracle"]
    assert [row.time_dependent for row in rows] == [False, False, True, True, True]
    assert [row.relabel for row in rows] == [None, None, None, experiments.shuffled_labels,
                                             experiments.oracle_labels]
    assert list(side.METHODS) == ["uncond", "cond", "side"]  # side.py's own rows: no controls


def test_run_refuses_guided_rows_without_a_lambda_before_any_work():
    with pytest.raises(ValueError, match="has no lambda; build the rows with method_rows"):
        side.run(tiny_config(), None, torch.device("cpu"), list(side.METHODS.values()))  # no folder touched
    rows = side.method_rows(tiny_config(guidance="cond=0.3,side=30"))
    assert [(row.name, row.guidance) for row in rows] == [("uncond", 0.0), ("cond", 0.3), ("side", 30.0)]


def test_lambda_is_chosen_on_the_tune_seed_never_on_a_reported_seed(tmp_path, monkeypatch):
    real, calls = experiments.run_pipeline, []

    def rigged(cfg):  # the tune seed (7) favours the largest lambda, every other seed the smallest
        report = real(cfg)
        calls.append((cfg.seed, side.row_lambdas(cfg)))
        for method, row in report["methods"].items():
            if method != "uncond":
                value = side.guidance_for(cfg, experiments.METHODS[method])
                row["memorized_fraction"] = value / 100 if cfg.seed == 7 else 1 / (1 + value)
        return report
    monkeypatch.setattr(experiments, "run_pipeline", rigged)
    args = [*TINY_TUNED, "--methods", "uncond,cond,side", "--lambda-grid", "0.3,30", "--tune-seed", "7",
            "--tune-n-gen", "6", "--out", str(tmp_path)]
    assert experiments.main(args) == 0
    assert [seed for seed, _ in calls] == [7, 7, 0]
    assert calls[-1] == (0, {"cond": 30.0, "side": 30.0})  # the reported seed ran once, at the tuned lambdas
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["guidance"] == {"cond": 30.0, "side": 30.0}
    assert report["protocol"]["settings"]["how"] == {"uncond": "fixed, not tuned", "cond": "tuned on seed 7",
                                                     "side": "tuned on seed 7"}
    assert "| side | ddim10 | 30 | tuned on seed 7 |" in (tmp_path / "report.md").read_text()
    calls.clear()
    assert experiments.main(args) == 0  # the tuning is cached in the run folder: only the reported seed reruns
    assert [seed for seed, _ in calls] == [0]


def test_one_rows_own_lambda_reruns_only_that_row(tiny_run, capsys):
    assert experiments.main([*TINY, "--out", str(tiny_run)]) == 0  # every row at lambda 10
    rows = ("uncond", "cond", "cond_x0", "side", "shuffled")
    before = {m: (tiny_run / f"samples_{m}.npz").stat().st_mtime_ns for m in rows}
    pairs = "cond=10,cond_x0=10,side=4,shuffled=10"
    assert experiments.main([*TINY, "--out", str(tiny_run), "--guidance", pairs]) == 0
    after = {m: (tiny_run / f"samples_{m}.npz").stat().st_mtime_ns for m in rows}
    assert [m for m in rows if after[m] != before[m]] == ["side"]
    assert json.loads((tiny_run / "report.json").read_text())["guidance"]["side"] == 4.0
    capsys.readouterr()


def test_ever_extracted_is_the_union_over_seeds_in_dataset_index_space(tmp_path):
    for name, indices, nn_index, ratio in (("a", [10, 11, 12], [0, 2, 2], [0.1, 0.5, 0.2]),
                                           ("b", [20, 21, 22], [0, 1], [0.2, 0.9])):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "train_subset.npz", indices=np.array(indices))
        np.savez(tmp_path / name / "nn_side.npz", nn_index=np.array(nn_index), nn_ratio=np.array(ratio))
    ever = experiments.ever_extracted({0: tmp_path / "a", 1: tmp_path / "b"}, "side")
    assert ever == dict(count=3, of=6, fraction=0.5)  # dataset images 10, 12 and 20 of 10-12, 20-22


def write_rows(folder, flags: dict, samplers: dict, seeds=None) -> dict:
    """A seed's run folder holding only what the aggregate reads: per row, which generations are
    Gu-memorized (nn_ratio < 1/3) and their (seed, stream, i); returns the seed's report."""
    folder.mkdir()
    np.savez(folder / "train_subset.npz", indices=np.arange(4))
    methods = {}
    for row, memorized in flags.items():
        memorized = np.asarray(memorized, bool)
        row_seeds = seeds[row] if seeds and row in seeds else np.arange(len(memorized))
        np.savez(folder / f"nn_{row}.npz", nn_index=np.zeros(len(memorized), int),
                 nn_ratio=np.where(memorized, 0.1, 0.9))
        np.savez(folder / f"samples_{row}.npz", seeds=np.asarray(row_seeds))
        methods[row] = dict(memorized_fraction=memorized.mean(), unique_memorized=1)
    return dict(methods=methods, samplers=samplers)


def test_aggregate_ratios_are_side_over_uncond_at_its_sampler_the_strongest_uncond_and_the_stronger_cond(tmp_path):
    """Per seed: side's Gu-memorized generations over uncond's at side's sampler, over the uncond row (any
    sampler) that copied most on that seed, and over the better Cond variant (by mean)."""
    ten = lambda k: [1] * k + [0] * (10 - k)  # k of 10 generations memorized
    flags = {0: dict(uncond=ten(1), uncond_ddpm1000=ten(2), cond=ten(1), cond_x0=ten(2), side=ten(8)),
             1: dict(uncond=ten(4), uncond_ddpm1000=ten(2), cond=ten(1), cond_x0=ten(3), side=ten(6))}
    samplers = dict(uncond="ddim50", uncond_ddpm1000="ddpm1000", cond="ddim50", cond_x0="ddim50", side="ddpm1000")
    folders = {seed: tmp_path / f"seed{seed}" for seed in flags}
    reports = {seed: write_rows(folders[seed], rows, samplers) for seed, rows in flags.items()}
    agg = experiments.aggregate(folders, reports)
    assert agg["best_cond"] == "cond_x0"  # mean 0.25 against cond's 0.1
    ratio = {seed: {name: (cell["ratio"], cell["row"]) for name, cell in by_name.items()}
             for seed, by_name in agg["ratios"].items()}
    assert ratio["0"] == {"side / uncond, same sampler": (4.0, "uncond_ddpm1000"),
                          "side / strongest uncond": (4.0, "uncond_ddpm1000"), "side / best cond": (4.0, "cond_x0")}
    assert ratio["1"] == {"side / uncond, same sampler": (3.0, "uncond_ddpm1000"),  # the weaker uncond here
                          "side / strongest uncond": (1.5, "uncond"), "side / best cond": (2.0, "cond_x0")}
    summary = agg["ratio_summary"]["side / strongest uncond"]
    assert (summary["mean"], summary["min"], summary["max"]) == (2.75, 1.5, 4.0)
    assert (summary["seeds"], summary["sign_holds"]) == (2, 2)


def test_paired_interval_resamples_the_same_generations_of_both_rows():
    """Rows that share their seeds are compared generation by generation: a row against itself has the
    ratio 1 in every bootstrap draw, and one that copies exactly where the other does and on 10 more of
    200 has a narrow interval. Rows drawn from other seeds are not paired: refused."""
    rng = np.random.default_rng(5)
    base = rng.random(200) < 0.2
    seeds = np.stack([np.zeros(200, int), np.zeros(200, int), np.arange(200)], 1)
    same = experiments.paired_ratio(base, seeds, base, seeds)
    assert same["ratio"] == same["low"] == same["high"] == 1.0
    more = base.copy()
    more[np.flatnonzero(~base)[:10]] = True
    cell = experiments.paired_ratio(more, seeds, base, seeds)
    assert cell["low"] >= 1.0 and cell["ratio"] == pytest.approx(more.sum() / base.sum())
    assert cell["high"] - cell["low"] < 0.6  # 0.40 paired; resampling each row on its own gives 1.08
    with pytest.raises(ValueError, match="same"):
        experiments.paired_ratio(base, seeds, base, seeds[::-1])


def test_the_sampler_is_tuned_like_lambda_on_the_tune_seed(tmp_path, monkeypatch):
    """With --sampler-grid, every row (uncond too) is chosen over (sampler, lambda) on the tune seed by one
    rule, the reported seed runs each row at its choice, and uncond also runs at side's sampler."""
    real, calls = experiments.run_pipeline, []

    def rigged(cfg):  # the tune seed: the finer sampler copies more, for every row; lambda 3 is best
        report = real(cfg)
        calls.append((cfg.seed, experiments.row_samplers(cfg)))
        for method, row in report["methods"].items():
            steps = side.parse_sampler(report["samplers"][method])[1]
            value = side.row_lambdas(cfg).get(method, 0.0)
            row["memorized_fraction"] = steps / 100 - abs(value - 3) / 1000 if cfg.seed == 7 else 0.5
        return report
    monkeypatch.setattr(experiments, "run_pipeline", rigged)
    args = [*TINY_TUNED, "--methods", "uncond,side", "--lambda-grid", "1,3", "--sampler-grid", "ddim5,ddpm10",
            "--tune-seed", "7", "--tune-n-gen", "4", "--out", str(tmp_path)]
    assert experiments.main(args) == 0
    tuned = [samplers for seed, samplers in calls if seed == 7]
    assert {(s["uncond"], s["side"]) for s in tuned} == {("ddim5", "ddim5"), ("ddpm10", "ddpm10")}
    assert len(tuned) == 4  # two samplers times two lambdas
    assert calls[-1] == (0, {"uncond": "ddpm10", "side": "ddpm10", "uncond_ddim5": "ddim5"})
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["samplers"] == {"uncond": "ddpm10", "side": "ddpm10", "uncond_ddim5": "ddim5"}
    assert report["guidance"] == {"side": 3.0} and report["part1_sampler"] == "ddim10"
    assert "| side | ddpm10 | 3 | tuned on seed 7 |" in (tmp_path / "report.md").read_text()


def test_an_uncond_row_named_for_a_sampler_samples_with_it(tmp_path):
    """--methods uncond_ddpm1000 adds the unguided row at the full chain, whatever the grid or Part 1
    use: a stronger baseline for the "strongest uncond" comparison."""
    cfg = experiments.apply_profile(experiments.ExperimentConfig(
        methods="uncond,side,uncond_ddpm1000", sampler_grid="ddim50,ddpm250", out=str(tmp_path)))
    assert experiments.candidates(cfg, "uncond_ddpm1000") == [("ddpm1000", 0.0)]
    assert experiments.candidates(cfg, "uncond") == [("ddim50", 0.0), ("ddpm250", 0.0)]
    assert "uncond_ddpm1000" not in experiments.methods_to_tune(cfg)


def test_sampler_names_choose_the_steps_and_the_ancestral_noise():
    """ddim<S> and ddpm<S> visit the same S timesteps; only ddpm adds fresh noise at each step (eta = 1);
    sample() without a sampler uses --sampler's."""
    cfg, unet, _ = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    model = Recorder(unet)
    model.head = unet.head
    ddim, ddpm = (side.sample(model, cfg, 2, torch.device("cpu"), sampler=name) for name in ("ddim20", "ddpm20"))
    visited = [int(t[0]) for _, t in model.calls]
    assert visited == side.sampling_timesteps(20) * 2 and not np.array_equal(ddim, ddpm)
    assert side.parse_sampler("ddpm1000") == ("ddpm", 1000) and side.parse_sampler("ddim3") is None
    assert side.parse_sampler("ddpm7") is None and side.parse_sampler("ddim0") is None
    np.testing.assert_array_equal(side.sample(unet, cfg, 2, torch.device("cpu")),
                                  side.sample(unet, cfg, 2, torch.device("cpu"), sampler=cfg.sampler))


def test_seeds_aggregate_equals_the_per_seed_reports_and_a_stopped_run_keeps_finished_seeds(
        tmp_path, monkeypatch):
    args = [*TINY, "--seeds", "0,1", "--methods", ",".join(experiments.METHODS), "--out", str(tmp_path)]
    real = experiments.run_pipeline

    def stop_at_seed_1(cfg):
        if cfg.seed == 1:
            raise side.UserError("stopped")
        return real(cfg)
    monkeypatch.setattr(experiments, "run_pipeline", stop_at_seed_1)
    assert experiments.main(args) == 2
    stamp = (tmp_path / "seed0" / "ddpm.pt").stat().st_mtime_ns
    monkeypatch.setattr(experiments, "run_pipeline", real)
    assert experiments.main(args) == 0
    assert (tmp_path / "seed0" / "ddpm.pt").stat().st_mtime_ns == stamp  # seed 0 was kept
    aggregate = json.loads((tmp_path / "report.json").read_text())
    per_seed = [json.loads((tmp_path / f"seed{s}" / "report.json").read_text())["methods"] for s in (0, 1)]
    assert list(aggregate["methods"]) == list(experiments.METHODS) and aggregate["seeds"] == [0, 1]
    for method, columns in aggregate["methods"].items():
        assert set(columns) == set(per_seed[0][method])
        for key, stats in columns.items():
            values = [seed[method][key] for seed in per_seed]
            assert stats["mean"] == pytest.approx(np.mean(values)), (method, key)
            assert (stats["min"], stats["max"]) == (min(values), max(values)), (method, key)
    assert per_seed[0]["side"]["median_nn_ratio"] != per_seed[1]["side"]["median_nn_ratio"]  # two DDPMs
    text = (tmp_path / "report.md").read_text()
    assert "seed0/report.md" in text and "| shuffled |" in text and "fixed, not tuned" in text


def test_protocol_bad_input_gets_one_line_naming_the_fix_before_any_slow_work(tmp_path, capsys,
                                                                               monkeypatch):
    def slow_work(cfg):  # a flag that is let through fails here at once, not after a full run
        raise AssertionError(f"slow work started for seed {cfg.seed}")
    monkeypatch.setattr(experiments, "run_pipeline", slow_work)
    cases = {
        "non-integer seed": (["--seeds", "0,x"], "--seeds takes non-negative integers"),
        "repeated seed": (["--seeds", "0,1,0"], "repeats seed 0"),
        "tune seed reported": (["--seeds", "0,100"], "--tune-seed 100 is also a reported seed"),
        "tune seed is --seed": (["--seed", "7", "--tune-seed", "7"], "--tune-seed 7 is also a reported seed"),
        "empty grid": (["--lambda-grid", ""], "--lambda-grid '': give lambda values"),
        "negative grid": (["--lambda-grid", "1,-3"], "--lambda-grid"),
        "seeds with sweep": (["--seeds", "0,1", "--sweep", "clusters=4,8"], "--sweep runs on one seed"),
        "bad row guidance": (["--guidance", "side=lots"], "--guidance"),
        "guidance for no row": (["--guidance", "sidee=3"], "names 'sidee', which is no guided row"),
        "guidance for uncond": (["--guidance", "uncond=3,side=3"], "names 'uncond', which is no guided row"),
        "count before processes": (["--n-gen", "0"], "--n-gen must be positive"),
        "sweep value": (["--sweep", "clusters=8,x"], "every value of clusters must be a number"),
        "unknown method": (["--methods", "uncond,magic"], "--methods takes"),
        "tune n_gen": (["--tune-n-gen", "0"], "--tune-n-gen must be positive"),
        "sampler grid": (["--sampler-grid", "ddim50,ddim3"], "--sampler-grid 'ddim50,ddim3': give distinct"),
        "sampler grid repeated": (["--sampler-grid", "ddim50,ddim50"], "give distinct"),
        "sampler sweep": (["--sweep", "extract_sampler=ddim50,fast"], "every sampler must be"),
    }
    for name, (args, message) in cases.items():
        code = experiments.main(["--out", str(tmp_path / "run"), *args])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (name, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (name, err)
    assert not (tmp_path / "run").exists()  # stopped before anything was written
    fixed = experiments.apply_profile(experiments.ExperimentConfig(seed=100, guidance="10", out=str(tmp_path / "f")))
    experiments.validate(fixed)  # lambda fixed: nothing is tuned, so seed 100 may be reported
    swept = experiments.apply_profile(experiments.ExperimentConfig(sweep="guidance=0,5", out=str(tmp_path / "s")))
    experiments.validate(swept)  # a guidance sweep gives every row its lambda: none is needed


def test_verdicts_say_whether_side_and_the_shuffled_control_beat_the_seed_spread():
    def seeds(low, high):
        return dict(mean=(low + high) / 2, min=low, max=high)
    said = experiments.verdicts(dict(uncond=seeds(.05, .10), side=seeds(.20, .30), shuffled=seeds(.22, .30)), 3)
    assert "difference is beyond the seed spread" in said[0] and "the clusters are not what helps" in said[1]
    said = experiments.verdicts(dict(uncond=seeds(.05, .25), side=seeds(.20, .30), shuffled=seeds(.05, .10)), 3)
    assert "difference is within the seed spread" in said[0] and "cluster structure is what helps" in said[1]
    said = experiments.verdicts(dict(uncond=seeds(.05, .10), side=seeds(.20, .30), shuffled=seeds(.15, .25)), 3)
    assert "does not show that the clusters help" in said[1]
    said = experiments.verdicts(dict(uncond=seeds(.1, .1), side=seeds(.3, .3), shuffled=seeds(.1, .1)), 1)
    assert "on one seed only" in said[0] and "does not show" in said[1]
    said = experiments.verdicts(dict(uncond=seeds(.2, .3), side=seeds(.1, .2), shuffled=seeds(.3, .4)), 3)
    assert "SIDE gained nothing over uncond" in said[1]


# ------------------------------------------------------------------------------------------------
# the GPU profiles' networks at their real sizes: one step of each kind at batch 2 on the CPU, with
# the bf16 autocast that side.autocast turns on for CUDA, so dtype and attention paths that only a
# GPU run would reach are exercised here
# ------------------------------------------------------------------------------------------------

# bf16 convolutions run emulated on most CPUs: the 64 px network takes ~10 minutes there, so it runs with
# SIDE_SLOW=1; the 32 px one (the same layers, attention at 16x16 too) runs in every suite
GPU_PROFILE_NETWORKS = [pytest.param("celeba", 64, [128, 256, 256, 256], marks=slow),
                        ("cifar10", 32, [128, 256, 256])]


def gpu_profile_config(dataset: str, out: Path) -> side.Config:
    """The (dataset, gpu) profile as a CUDA machine gets it; apply_profile would pick the CPU one here."""
    cfg = side.Config(dataset=dataset, device="cpu", out=str(out))
    for name, value in experiments.PROFILES[(dataset, "gpu")].items():
        setattr(cfg, name, value)
    side.validate(cfg)
    return cfg


def record_attention_calls(monkeypatch) -> list:
    """Wrap scaled_dot_product_attention to note the shape and dtype of every query it is given."""
    calls, original = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), q.dtype))
        return original(q, k, v, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


def test_gpu_profile_extracts_every_row_at_one_sampler_and_part1_with_ddim50(tmp_path):
    """README, "On a GPU": every row extracts with 250 ancestral steps, so the rows are compared at one
    sampler; Part 1 keeps 50 DDIM steps. validate() (inside gpu_profile_config) accepts the sampler."""
    for dataset in ("celeba", "cifar10", "folder"):
        cfg = gpu_profile_config(dataset, tmp_path)
        assert {row.name: row.sampler for row in side.method_rows(cfg)} == dict(
            uncond="ddpm250", cond="ddpm250", side="ddpm250") and cfg.sampler == "ddim50"


@pytest.mark.parametrize("dataset, size, widths", GPU_PROFILE_NETWORKS)
def test_gpu_profile_networks_train_classify_and_guide_at_real_size_in_bf16(dataset, size, widths, tmp_path,
                                                                              monkeypatch):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = gpu_profile_config(dataset, tmp_path)
    assert (cfg.image_size, side.channel_list(cfg.channels), cfg.blocks, cfg.attn_res) == (size, widths, 2, "16")
    torch.manual_seed(0)
    unet = side.build_unet(cfg, 3)
    clf = side.build_classifier(cfg, 3, cfg.clusters, time_dependent=True)
    assert sum(p.numel() for p in unet.parameters()) > 20_000_000  # the real size (31.3M, 22.9M), not a toy
    # side.autocast(cuda) is bf16 autocast; the same autocast on the CPU runs the same dtype paths
    monkeypatch.setattr(side, "autocast", lambda device: torch.autocast(device.type, dtype=torch.bfloat16))
    calls = record_attention_calls(monkeypatch)
    diffusion, gen = side.Diffusion(), torch.Generator().manual_seed(0)
    x0_all = torch.rand(4, 3, size, size, generator=gen) * 2 - 1
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # a fused kernel, never the math fallback
        # DDPM training step (Adam's update is the same on any device and left out)
        loss = side.ddpm_loss(unet, x0_all, gen, 1)  # batch 1: bf16 is emulated on the CPU, and slow
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in unet.parameters())
        # attention at 16x16 (256 tokens) with 256 channels, in bf16, as a 4-D batch the fused CUDA
        # kernels accept (3-D inputs make CUDA fall back to the math kernel)
        assert (1, 1, 256, 256) in {shape for shape, _ in calls}
        assert all(len(shape) == 4 and dtype == torch.bfloat16 for shape, dtype in calls)
        # time-dependent classifier step on noised samples (Eq. 2), as train_classifier takes it
        x_t, t = side.classifier_inputs(x0_all[:1], gen, True)
        with side.autocast(x_t.device):
            logits = clf(x_t, t)
        soft = torch.eye(cfg.clusters)[[3]]
        clf_loss = side.soft_cross_entropy(logits.float(), soft)
        clf_loss.backward()
        assert logits.dtype == torch.bfloat16 and logits.shape == (1, cfg.clusters) and torch.isfinite(clf_loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in clf.parameters())
        # one guided DDIM step: eps from the bf16 UNet, the gradient of log p_phi(c | x_t, t) (Eq. 1)
        torch.nn.init.normal_(unet.head[-1].weight, std=0.01)  # a zero head would hide a wrong eps
        x, t = torch.randn(1, 3, size, size, generator=gen), torch.full((1,), 500)
        unguided = side.guided_eps(unet, None, x, t, None, 0.0)
        same_eps = lambda *_: unguided  # the UNet's eps again: its bf16 forward takes 12 s on a CPU
        guided = side.guided_eps(same_eps, clf, x, t, torch.tensor([3]), 10.0)  # lambda 10
        x_prev = side.reverse_step(x, guided, 500, 480, 0.0, 0)
    for tensor in (unguided, guided, x_prev):
        assert tensor.shape == x.shape and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()
    assert (guided - unguided).abs().max() > 1e-4  # the classifier's gradient reached eps


@pytest.mark.parametrize("dataset, size, channels", [("celeba", 64, None), ("cifar10", 32, None),
                                                     ("celeba", 128, "128,256,256,256,512")])
def test_guided_sampling_batch_keeps_the_classifier_activations_within_a_gpus_memory(dataset, size, channels,
                                                                                    tmp_path):
    """A guided step keeps the classifier's activations (fp32) for its gradient; side.sample's batch on
    CUDA must keep them inside a 24 GB card (1,024 would need about 50 GiB at 64 px, 200 at 128 px)."""
    cfg = gpu_profile_config(dataset, tmp_path)
    cfg.image_size, cfg.channels = size, channels or cfg.channels
    clf = side.build_classifier(cfg, 3, cfg.clusters, time_dependent=True)
    weights, saved = {p.data_ptr() for p in clf.parameters()}, {}

    def keep(tensor):  # activations saved for the backward pass, each counted once, weights left out
        if tensor.data_ptr() not in weights:
            saved[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        clf(torch.randn(1, 3, size, size, requires_grad=True), torch.tensor([500]))
    batch = side.sampling_batch(torch.device("cuda"), size, guided=True)
    assert batch >= 32 and batch * sum(saved.values()) < 20 * 2**30
    assert side.sampling_batch(torch.device("cuda"), size, guided=False) == 1024


# ------------------------------------------------------------------------------------------------
# the paper's feature space (--embed), --compile, and many processes (torchrun)
# ------------------------------------------------------------------------------------------------

class Projection(torch.nn.Module):
    """A tiny image-embedding model: a fixed random projection of 3 x 8 x 8 images to 5 numbers."""
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 5)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(5, 192, generator=torch.Generator().manual_seed(0)))
            self.proj.bias.zero_()

    def forward(self, x):
        return self.proj(x.flatten(1))


def embedding_files(tmp_path):
    """The same tiny model as TorchScript (.pt, SSCD's format) and as a torch.export program (.pt2)."""
    torch.jit.save(torch.jit.script(Projection()), str(tmp_path / "proj.pt"))
    program = torch.export.export(Projection(), (torch.rand(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(tmp_path / "proj.pt2"))
    return tmp_path / "proj.pt", tmp_path / "proj.pt2"


def test_embed_clusters_and_scores_in_the_embedding_space(tmp_path):
    scripted, _ = embedding_files(tmp_path)
    assert experiments.main([*TINY, "--methods", "uncond,side", "--embed", str(scripted), "--out", str(tmp_path)]) == 0
    assert np.load(tmp_path / "labels.npz")["centroids"].shape[1] == 5  # k-means ran on the 5-D embedding
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["labels"]["features"] == "embedding of proj.pt"
    assert report["similarity"] == dict(space="cosine of proj.pt", bands=list(experiments.EMBEDDING_BANDS))
    assert "Clustering features (Algorithm 1 line 2): embedding of proj.pt" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "figures" / "histograms.png").stat().st_size > 0  # experiments.py draws them


def test_embed_reads_a_torch_export_program_for_the_clusters_and_the_similarity(tmp_path):
    _, exported = embedding_files(tmp_path)
    images = np.random.default_rng(1).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.nn.functional.normalize(Projection()(side.to_unit_range(images).expand(-1, 3, -1, -1) / 2 + 0.5), dim=1)
    cfg = experiments.ExperimentConfig(**{**dataclasses.asdict(tiny_config()), "embed": str(exported)})
    featurize = experiments.load_embedding(cfg.embed, "cpu")
    assert torch.allclose(featurize(images), expected, atol=1e-5)
    labels = experiments.embedded_labels(cfg, images, {}, "cpu")
    np.testing.assert_allclose(labels["centroids"], side.surrogate_labels(
        expected.numpy(), cfg.clusters, cfg.cohesion, cfg.seed)["centroids"], atol=1e-5)  # k-means on the embedding
    assert str(labels["features"]) == "embedding of proj.pt2"
    similarity, bands, space = experiments.embedding_space(cfg, "cpu")
    assert space == "cosine of proj.pt2" and bands == experiments.EMBEDDING_BANDS
    best, best_index, _ = similarity(images, images[:4], bands)  # one model for both (Algorithm 1 line 2)
    np.testing.assert_allclose(best[:4], 1, atol=1e-5)
    np.testing.assert_array_equal(best_index[:4], range(4))


def test_compile_wraps_the_unet_on_cuda_and_warns_once_on_the_cpu(capsys, monkeypatch):
    cfg, unet, _ = tiny_networks()
    forward, x, t = side.UNet.forward, torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long)
    experiments.warn_once.cache_clear()
    cfg.compile = True
    for _ in range(2):
        with experiments.compiled_unets(cfg, torch.device("cpu")):
            assert side.UNet.forward is forward
    assert capsys.readouterr().err.count("--compile applies on CUDA only") == 1
    monkeypatch.setattr(torch, "compile", lambda function: lambda *args: ("compiled", function))
    with experiments.compiled_unets(cfg, torch.device("cuda")):
        assert side.build_unet(cfg, 1)(x, t) == ("compiled", forward)  # every UNet built inside
    assert side.UNet.forward is forward  # and none after
    cfg.compile = False
    with experiments.compiled_unets(cfg, torch.device("cuda")):
        assert side.UNet.forward is forward


def test_bands_set_the_ams_ums_edges_and_a_bad_one_gets_one_line(tmp_path, capsys):
    cfg = experiments.apply_profile(experiments.ExperimentConfig(device="cpu", bands="0.2,0.3,0.9"))
    similarity, bands, space = experiments.similarity_space(cfg, "cpu")
    assert bands == (0.2, 0.3, 0.9) and space == side.PIXEL_SPACE[2] and similarity is None
    cfg.bands = ""
    assert experiments.similarity_space(cfg, "cpu") is None  # side.py's PIXEL_SPACE
    for bad in ("0.5,0.4,0.6", "0.1,0.2", "a,b,c", "0.5,0.6,1.5"):
        assert experiments.main([*TINY, "--bands", bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"--bands {bad!r}: give three increasing numbers" in err and err.count("\n") == 1


def test_compile_unavailable_and_too_many_processes_get_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delattr(torch, "compile")
    assert experiments.main([*TINY, "--compile", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--compile: this PyTorch has no torch.compile" in err and "drop --compile" in err and err.count("\n") == 1
    monkeypatch.undo()
    monkeypatch.setenv("WORLD_SIZE", "13")  # what torchrun --nproc_per_node 13 sets; --n-gen is 12
    assert experiments.main([*TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchrun started 13 processes but there are only 12 generations" in err and err.count("\n") == 1
    monkeypatch.setenv("WORLD_SIZE", "5")  # tuning lambda samples --tune-n-gen generations per row
    assert experiments.main([*TINY_TUNED, "--tune-n-gen", "4", "--out", str(tmp_path)]) == 2
    assert "only 4 generations to share (--n-gen 12, --n-syn 48, --tune-n-gen 4)" in capsys.readouterr().err


TINY_TORCHRUN = ["--n-train" if arg == "--n" else arg for arg in TINY]  # torchrun's parser reads --n itself


def run_torchrun(*args, timeout=300):
    """`torchrun --standalone --nproc_per_node 2 ...` on the CPU: (exit code, stdout + stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True) as run:
        try:
            output = run.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:  # a hang: end torchrun and its workers, then fail
            os.killpg(run.pid, signal.SIGKILL)
            raise
    return run.returncode, output


def test_torchrun_with_more_processes_than_generations_stops_every_rank_with_one_line(tmp_path):
    code, output = run_torchrun("experiments.py", *TINY_TORCHRUN, "--n-gen", "1", "--out", str(tmp_path), timeout=120)
    assert code != 0 and re.search(r"exitcode\s*:\s*2\b", output), output
    assert output.count("torchrun started 2 processes but there are only 1 generations") == 1, output
    assert "use --nproc_per_node 1 or fewer" in output


def test_a_check_that_fails_on_one_rank_alone_stops_every_rank_and_names_it(tmp_path, capsys, monkeypatch):
    """Before the process group, each rank checks the flags on its own; the ranks then share what they
    found, so a problem seen by rank 1 alone (a file system race, say) reaches the user in one line."""
    monkeypatch.setattr(experiments, "gather_all", lambda problem: [problem, "--out X is not writable"])
    assert experiments.main([*TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --out X is not writable (on rank 1)\n"


def test_torchrun_tuning_lambda_into_a_fresh_folder_writes_one_report(tmp_path):
    """Every rank checks the tune seed's folder while rank 0 may be creating it: no rank may trip."""
    out = tmp_path / "new" / "run"
    tiny_tuned = ["--n-train" if arg == "--n" else arg for arg in TINY_TUNED]
    code, output = run_torchrun("experiments.py", *tiny_tuned, "--methods", "uncond,side", "--lambda-grid", "0.3,3",
                                "--tune-n-gen", "6", "--out", str(out))
    assert code == 0, output
    report = json.loads((out / "report.json").read_text())
    assert report["protocol"]["settings"]["how"] == {"uncond": "fixed, not tuned", "side": "tuned on seed 100"}
    assert sum(line.startswith("report: ") for line in output.splitlines()) == 3, output  # 2 lambdas, seed 0


def sample_to_shard():
    """Guided sampling with fresh noise at every step (eta = 1), 7 generations in batches of 2."""
    cfg, unet, classifier = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    cfg.sampler = "ddpm10"  # the ancestral step (eta = 1) on every 100th timestep
    targets = side.draw_targets(cfg.seed, 7, 3)
    return torch.from_numpy(side.sample(unet, cfg, 7, torch.device("cpu"), classifier=classifier, targets=targets,
                                        guidance=5.0, batch=2))


def train_tiny_ddpm(out: Path) -> torch.nn.Module:
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(train_steps=12, ckpt_every=4, out=str(out))
    x0 = side.to_unit_range(side.load_digits(cfg)[0])
    train = experiments.train_ddpm_distributed if torch.distributed.is_initialized() else side.train_ddpm
    return train(cfg, x0, out / "ddpm.pt")


def test_an_unfinished_checkpoint_resumes_only_with_as_many_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("SIDE_STOP_AT_STEP", "6")
    with pytest.raises(side.UserError, match="stopped at step 6"):
        train_tiny_ddpm(tmp_path)
    monkeypatch.delenv("SIDE_STOP_AT_STEP")
    saved = torch.load(tmp_path / "ddpm.pt", weights_only=False)
    assert len(saved["rngs"]) == 1  # one process: its own generator
    saved["rngs"] = saved["rngs"] * 2  # as a two-process torchrun run leaves it
    torch.save(saved, tmp_path / "ddpm.pt")
    with pytest.raises(side.UserError, match=r"trained by 2 process\(es\); resume it with as many "
                                             r"\(torchrun --nproc_per_node 2 experiments.py\)"):
        train_tiny_ddpm(tmp_path)


def torchrun_worker(out: Path) -> None:
    """What each rank of test_torchrun_shards_sampling_and_trains_with_ddp runs (under experiments.distributed)."""
    rank = torch.distributed.get_rank()
    torch.save(sample_to_shard(), out / f"samples{rank}.pt")
    straight = train_tiny_ddpm(out / "straight")
    os.environ["SIDE_STOP_AT_STEP"] = "6"
    with pytest.raises(side.UserError, match="stopped at step 6"):
        train_tiny_ddpm(out / "resumed")
    del os.environ["SIDE_STOP_AT_STEP"]
    resumed = train_tiny_ddpm(out / "resumed")
    torch.save(dict(straight=straight.state_dict(), resumed=resumed.state_dict()), out / f"weights{rank}.pt")


WORKER = """import sys
from pathlib import Path
sys.path.insert(0, {root!r})
import experiments, test_side
with experiments.distributed(test_side.tiny_config()):
    test_side.torchrun_worker(Path(sys.argv[1]))
"""


def equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@slow
def test_torchrun_shards_sampling_and_trains_with_ddp(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER.format(root=str(ROOT)))
    code, output = run_torchrun(str(tmp_path / "worker.py"), str(tmp_path))
    assert code == 0, output
    one_process = sample_to_shard()
    for rank in (0, 1):  # every rank holds all 7 generations, bit for bit those of one process
        assert torch.equal(torch.load(tmp_path / f"samples{rank}.pt"), one_process)
    weights = [torch.load(tmp_path / f"weights{rank}.pt") for rank in (0, 1)]
    assert equal_weights(weights[0]["straight"], weights[1]["straight"])  # DDP kept the ranks in step
    assert equal_weights(weights[0]["resumed"], weights[0]["straight"])  # stopped at 6, resumed, same weights
    rngs = torch.load(tmp_path / "straight" / "ddpm.pt", weights_only=False)["rngs"]
    assert len(rngs) == 2 and not torch.equal(rngs[0], rngs[1])  # each rank draws its own batches...
    single = train_tiny_ddpm(tmp_path / "single").state_dict()
    assert not equal_weights(single, weights[0]["straight"])  # ...so two ranks learn from twice the data


@slow
def test_torchrun_run_of_a_tiny_config_writes_one_report(tmp_path):
    code, output = run_torchrun("experiments.py", *TINY_TORCHRUN, "--methods", "uncond,side", "--out", str(tmp_path))
    assert code == 0, output
    lines = output.splitlines()  # rank 0 alone prints
    assert sum(line.startswith("report: ") for line in lines) == 1, output
    assert sum(line.startswith("config: ") for line in lines) == 1, output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"]["side"]["n_generated"] == 12
    assert len(np.load(tmp_path / "samples_side.npz")["images"]) == 12
    assert not list(tmp_path.glob("*.tmp*"))


# slow (every one of the 1000 DDPM steps), so last: tools/mutate.py stops at the first failure
def test_per_sample_seeds_make_each_generation_independent_of_the_batch():
    cfg, unet, _ = tiny_networks()
    torch.nn.init.normal_(unet.head[-1].weight, std=0.1)
    for sampler in ("ddim10", "ddpm10"):  # ddpm10: ancestral steps, fresh noise at each
        in_batches_of_two = side.sample(unet, cfg, 3, torch.device("cpu"), batch=2, sampler=sampler)
        alone = side.sample(unet, cfg, 3, torch.device("cpu"), batch=3, sampler=sampler)
        np.testing.assert_array_equal(in_batches_of_two, alone)
        assert not np.array_equal(alone[1], alone[2])
