"""side.py: SIDE (Surrogate condItional Data Extraction) in one readable file.

Chen, Wang, Zou, Ma, "SIDE: Surrogate Conditional Data Extraction from Diffusion Models",
arXiv:2410.02467 (v7). `python side.py --help` lists every flag; the default run is offline.
The lesson comes first: what Algorithm 1 needs (0-4), then Algorithm 1 in its own order (5-9):

    0. configuration        every setting, and the defaults of each dataset and device
    1. networks             a small UNet eps_theta(x_t, t); its encoder half is the classifier's
    2. diffusion maths      linear beta schedule, the forward process q(x_t | x_0)
    3. DDPM training        L_simple, Adam, EMA and the checkpoint: the target model
    4. guided sampling      the guided score (Eq. 1), the DDIM / DDPM reverse step, per-sample seeds
    5. surrogate labels     Algorithm 1 lines 2-5: features, k-means, cohesion filter, relabel
    6. classifiers          Algorithm 1 line 6 / Eq. 2: p_phi(y | x_t, t) on noised samples
    7. extraction           Algorithm 1 Part 2: guided sampling toward one cluster at a time
    8. memorization check   Gu et al. d1/d2 < 1/3, Carlini normalized L2, AMS / UMS (Eq. 6-9)
    9. Algorithm 1          run(): the whole attack, top to bottom
    Plumbing                datasets, atomic writes, run folder, report, command line

One run is one seed with the rows uncond, cond and side. What turns runs into evidence (lambda
tuned on a seed never reported, seeds, controls, sweeps, torchrun, SSCD features, CIFAR-10 and
image folders) is experiments.py, which imports this file; this file never imports it.
Every lesson function runs from a Python shell, without a run folder (the digits profile):

    import side, torch
    cfg, cpu = side.apply_profile(side.Config(device="cpu")), torch.device("cpu")
    train = side.load_training_set(cfg)                                   # D
    model = side.train_ddpm(cfg, side.to_unit_range(train["images"]))    # the target DPM
    synthetic = side.sample(model, cfg, cfg.n_syn, cpu, side.STREAM_SYNTHETIC)   # line 1
    labels = side.label_synthetic(cfg, synthetic, train, cpu)            # lines 2-5
    classifier = side.train_classifier(cfg, synthetic, labels["soft"], True, cpu, "p(y|x_t,t)")
    found = side.extract(cfg, side.METHODS["side"], model, classifier, 30.0, cpu)  # lines 16-26
    side.memorization_metrics(found["images"], train["images"], side.PIXEL_BANDS, cpu)["summary"]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# =================================================================================================
# 0. Configuration. Every setting is a field and a flag (--help). Fields left as None are filled
#    from PROFILES for the dataset and the device (cpu or gpu).
# =================================================================================================


def option(default, help: str, choices: tuple | None = None, shown: str = "profile"):
    """A Config field. `shown`: what --help prints for a None default."""
    metadata = dict(help=help, choices=choices, shown=shown)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class Config:
    # --- data: the training set D of the target model ---
    dataset: str = option("digits", "training set D (experiments.py adds cifar10 and folder)",
                          ("digits", "celeba"))
    data_root: str = option("data", "where the CelebA images live")
    n: int = option(None, "training-set size N (the DPM memorizes small N)")
    image_size: int = option(None, "side length in pixels")
    subset: str = option("first", "which n images to take", ("first", "random"))
    # --- the denoiser eps_theta (a small DDPM UNet) ---
    channels: str = option(None, "UNet width per resolution, e.g. 32,64")
    blocks: int = option(None, "residual blocks per resolution")
    attn_res: str = option(None, "resolutions with self-attention, e.g. 16")
    # --- DDPM training (Ho et al. 2020: linear betas, T = 1000, epsilon prediction) ---
    train_steps: int = option(None, "DDPM optimizer steps")
    batch_size: int = option(None, "DDPM batch size")
    lr: float = option(None, "Adam learning rate")
    ema: float = option(0.999, "EMA decay of the weights used to sample")
    ckpt_every: int = option(500, "steps between checkpoints")
    # --- sampling (the paper uses diffusers' DDIM scheduler) ---
    sampler: str = option("ddim50", "Part 1's sampler: ddim<S> = S DDIM steps (eta 0), ddpm<S> = "
                                    "S ancestral steps (ddpm1000: DDPM's full chain)")
    extract_sampler: str = option(None, "Part 2's sampler, the same for every row ('': "
                                        "--sampler's)")
    # --- surrogate labels (Algorithm 1, Part 1) ---
    n_syn: int = option(None, "N_syn: generated images to cluster")
    clusters: int = option(None, "K: k-means clusters")
    cohesion: float = option(None, "tau: keep clusters with cohesion >= tau")
    # --- the classifiers p_phi(y | x_t, t) (SIDE) and p(y | x) (Carlini Cond) ---
    clf_steps: int = option(None, "classifier optimizer steps")
    clf_lr: float = option(1e-3, "AdamW learning rate (paper: 1e-4, ResNet34)")
    clf_batch: int = option(128, "classifier batch size")
    # --- extraction (Algorithm 1, Part 2) ---
    methods: str = option("uncond,cond,side", "rows of the report: uncond, cond, side")
    n_gen: int = option(None, "N_G: generations per row")
    guidance: str = option(None, "lambda of the guided rows: one value for all, or row=value "
                                 "pairs such as side=30,cond=0.3")
    # --- run ---
    seed: int = option(0, "seeds training, every generation (and --subset random)")
    device: str = option("auto", "where to compute", ("auto", "cpu", "cuda"))
    out: str = option("", "run folder (default runs/<dataset>-n<N>-<size>px)")
    fresh: bool = option(False, "ignore cached stages and redo everything")


# The defaults of each (dataset, device); every value can be overridden by its flag. Why each
# value, and which were tuned on a seed that is never reported: docs/usage.md, "Profiles".
SMALL = dict(channels="32,64", blocks=1, attn_res="", batch_size=64, lr=1e-3, n_syn=1024,
             clusters=32, cohesion=0.5, clf_steps=1500, n_gen=512, guidance="cond=1,side=10",
             extract_sampler="")
GPU = dict(channels="128,256,256,256", blocks=2, attn_res="16", batch_size=128, lr=2e-4,
           n_syn=10000, clusters=100, cohesion=0.5, clf_steps=20000, n_gen=5120,
           guidance="cond=1,side=10", extract_sampler="ddpm250")
DIGITS = dict(SMALL, n=128, image_size=8, train_steps=2000, clusters=64,
              guidance="cond=0.3,side=30")
PROFILES = {
    ("digits", "cpu"): DIGITS,
    ("digits", "gpu"): DIGITS,
    ("celeba", "cpu"): dict(SMALL, n=64, image_size=16, train_steps=2000,
                            guidance="cond=0.3,side=10"),
    ("celeba", "gpu"): dict(GPU, n=1000, image_size=64, train_steps=40000),
}


class UserError(Exception):
    """A problem the user can fix. main() prints it as one line on stderr and exits with code 2."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but CUDA is not available here; "
                        "use --device cpu or auto")
    return torch.device(name)


def device_kind(cfg: Config) -> str:
    """The profile's device: "gpu" on CUDA, else "cpu"."""
    return "gpu" if resolve_device(cfg.device).type == "cuda" else "cpu"


def apply_profile(cfg: Config, profiles: dict | None = None) -> Config:
    """Fill every None field from the (dataset, device) profile (experiments.py adds datasets)."""
    for name, value in (profiles or PROFILES)[(cfg.dataset, device_kind(cfg))].items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    if not cfg.out:
        cfg.out = f"runs/{cfg.dataset}-n{cfg.n}-{cfg.image_size}px"
    return cfg


# =================================================================================================
# 1. Networks. A small DDPM UNet with a sinusoidal time embedding. The classifier (section 6) is
#    the UNet's encoder half plus a pooled linear head, as in guided-diffusion's noisy classifier;
#    its time module scales/shifts the normalized features in each residual block (paper App. B).
# =================================================================================================


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer sinusoids of the integer timestep (Ho et al. 2020, Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice. The time embedding scales and shifts the features right after the
    normalization that follows the first convolution: in a post-activation ResNet block that is the
    "first BN" of the paper's refinement block (App. B, Fig. 9)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, 2 * c_out) if t_dim else None
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, t_emb):
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.time is not None:  # time-independent networks have no time module at all
            scale, shift = self.time(F.silu(t_emb))[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        return self.conv2(F.silu(h)) + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm, self.qkv = group_norm(channels), nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, t_emb=None):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        # one head as a contiguous 4-D (b, 1, h*w, c) batch: the fused CUDA kernels (flash,
        # memory-efficient) take only that; other layouts fall back silently to the slow one
        q, k, v = (part.transpose(1, 2).unsqueeze(1).contiguous() for part in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (b, h*w, c)
        return x + self.proj(attended.transpose(1, 2).reshape(b, c, h, w))


def resolution_level(c_in: int, c_out: int, blocks: int, t_dim: int, attention: bool,
                     skip_channels: int = 0) -> nn.ModuleList:
    """`blocks` residual blocks at one resolution; on the way up each also takes a skip."""
    level = nn.ModuleList()
    for _ in range(blocks):
        level.append(ResBlock(c_in + skip_channels, c_out, t_dim))
        if attention:
            level.append(SelfAttention(c_out))
        c_in = c_out
    return level


class Encoder(nn.Module):
    """Stem and down path, shared by the UNet and the classifier. Returns features and skips."""

    def __init__(self, in_ch: int, channels: list[int], blocks: int, attn_res: list[int],
                 size: int, t_dim: int):
        super().__init__()
        self.stem = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.levels, c_prev = nn.ModuleList(), channels[0]
        for i, ch in enumerate(channels):
            self.levels.append(resolution_level(c_prev, ch, blocks, t_dim, size >> i in attn_res))
            c_prev = ch
        self.downs = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in channels[:-1])

    def forward(self, x, t_emb):
        h, skips = self.stem(x), []
        for i, level in enumerate(self.levels):
            for layer in level:
                h = layer(h, t_emb)
                if isinstance(layer, SelfAttention):
                    skips[-1] = h  # a block's output, after its attention (as in DDPM)
                else:
                    skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return h, skips


class TimeEmbedding(nn.Module):
    def __init__(self, base: int):
        super().__init__()
        self.base = base
        self.mlp = nn.Sequential(nn.Linear(base, 4 * base), nn.SiLU(),
                                 nn.Linear(4 * base, 4 * base))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.base))


class UNet(nn.Module):
    """eps_theta(x_t, t): predicts the noise that was added to x_0 (epsilon prediction)."""

    def __init__(self, in_ch: int, channels: list[int], blocks: int, attn_res: list[int],
                 size: int):
        super().__init__()
        t_dim, deepest = 4 * channels[0], channels[-1]
        self.time = TimeEmbedding(channels[0])
        self.encoder = Encoder(in_ch, channels, blocks, attn_res, size, t_dim)
        self.middle = nn.ModuleList([ResBlock(deepest, deepest, t_dim), SelfAttention(deepest),
                                     ResBlock(deepest, deepest, t_dim)])
        self.up_levels, c_prev = nn.ModuleList(), deepest
        for i in reversed(range(len(channels))):
            attention = size >> i in attn_res
            self.up_levels.append(resolution_level(c_prev, channels[i], blocks, t_dim, attention,
                                                   skip_channels=channels[i]))
            c_prev = channels[i]
        self.ups = nn.ModuleList(nn.Conv2d(channels[i], channels[i], 3, padding=1)
                                 for i in reversed(range(1, len(channels))))
        self.head = nn.Sequential(group_norm(channels[0]), nn.SiLU(),
                                  nn.Conv2d(channels[0], in_ch, 3, padding=1))
        nn.init.zeros_(self.head[-1].weight)  # start as "predict zero noise": stable early training
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x, t):
        t_emb = self.time(t)
        h, skips = self.encoder(x, t_emb)
        for layer in self.middle:
            h = layer(h, t_emb)
        for i, level in enumerate(self.up_levels):
            for layer in level:
                if isinstance(layer, ResBlock):
                    h = layer(torch.cat([h, skips.pop()], 1), t_emb)
                else:
                    h = layer(h)
            if i < len(self.ups):
                h = self.ups[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.head(h)


def channel_list(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def build_unet(cfg: Config, in_ch: int) -> UNet:
    return UNet(in_ch, channel_list(cfg.channels), cfg.blocks, channel_list(cfg.attn_res),
                cfg.image_size)


# =================================================================================================
# 2. Diffusion maths. Linear betas 1e-4..0.02 over T = 1000 (Ho et al. 2020). Forward process
#    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I); this same process noises the classifier's
#    training inputs (Eq. 2). Images are uint8 as stored, and [-1, 1] floats (paper, Setup)
#    wherever the diffusion maths sees them.
# =================================================================================================

T_STEPS = 1000  # T: diffusion steps of the target model (paper leaves it open; DDPM's choice)


class Diffusion:
    def __init__(self, steps: int = T_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02):
        self.steps = steps
        self.betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        self.alpha_bar = torch.cumprod(1 - self.betas, dim=0)  # abar_t, t = 0 .. T-1

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """abar_t broadcast to the shape of `like`; t = -1 means 'before step 0', abar = 1."""
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar])
        return padded[(t + 1).cpu()].to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def noised(self, x0: torch.Tensor, gen: torch.Generator, low: int = 0, high: int | None = None):
        """(x_t, t, eps), t ~ U{low..high-1} (default: all T), eps ~ N(0, I) from `gen`: the one
        place that noises training images, for the DPM (L_simple) and the classifiers (Eq. 2)."""
        t = torch.randint(low, high or self.steps, (len(x0),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        return self.q_sample(x0, t, noise), t, noise

    def predicted_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t): q_sample solved for x_0."""
        a = self.abar(t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def to_unit_range(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x C -> float N x C x H x W in [-1, 1]."""
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float N x C x H x W in [-1, 1] -> uint8 N x H x W x C."""
    scaled = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def autocast(device: torch.device):
    """bf16 autocast on CUDA only; on the CPU full precision is both faster and exact."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


DIFFUSION = Diffusion()  # the target model's schedule, built once; every function below uses it


# =================================================================================================
# 3. DDPM training: L_simple = || eps - eps_theta(x_t, t) ||^2, t uniform (Ho et al. 2020), Adam,
#    EMA weights for sampling. This is the target model the attack starts from. As in nanoGPT,
#    its checkpoint is a plain dict, saved every --ckpt-every steps and on Ctrl-C.
# =================================================================================================


def ddpm_loss(model, x0_all, gen, batch_size: int) -> torch.Tensor:
    """L_simple on one batch: draw x_0, t ~ U{0..T-1} and eps, predict eps from x_t."""
    batch = torch.randint(len(x0_all), (batch_size,), generator=gen)
    x0 = x0_all[batch.to(x0_all.device)]
    x_t, t, noise = DIFFUSION.noised(x0, gen)
    with autocast(x0.device):
        return F.mse_loss(model(x_t, t.to(x0.device)).float(), noise)


def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # warm-up: early EMA weights would be noise
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


def train_ddpm(cfg: Config, x0_all: torch.Tensor, checkpoint: Path | None = None) -> nn.Module:
    """The target DPM: a UNet, its EMA copy and Adam on L_simple; returns the EMA network. With
    `checkpoint`, it resumes a matching one and saves a plain dict every --ckpt-every steps."""
    torch.manual_seed(cfg.seed)  # the initial weights
    model = build_unet(cfg, x0_all.shape[1]).to(x0_all.device)
    ema = copy.deepcopy(model)  # the weights we sample with: the last ~1/(1-decay) steps' average
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)  # every batch, t and noise of training
    first = resume_ddpm(checkpoint, cfg, model, ema, opt, gen) if checkpoint else 0
    def save(step: int, rng: torch.Tensor) -> None:  # the checkpoint: a plain dict
        save_torch(checkpoint, dict(model=model.state_dict(), ema=ema.state_dict(), step=step,
                                    opt=opt.state_dict(), rngs=[rng], config=vars(cfg).copy()))
    bar = progress(range(first, cfg.train_steps), desc="train DDPM", initial=first,
                   total=cfg.train_steps, disable=first == cfg.train_steps)  # no bar: trained
    with StopAtStepBoundary() as stop:  # Ctrl-C stops here, between two steps
        for step in bar:
            rng = gen.get_state()  # a run stopped during this step resumes from here
            loss = ddpm_loss(model, x0_all, gen, cfg.batch_size)
            # Ctrl-C saves and stops here; a non-finite loss stops; else it returns loss.item()
            value = stop.check(step, loss, checkpoint, lambda: save(step, rng))
            if checkpoint and step > first and step % cfg.ckpt_every == 0:
                save(step, rng)  # weights that have just given a finite loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(ema, model, cfg.ema, step)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    if checkpoint and first < cfg.train_steps:
        save(cfg.train_steps, gen.get_state())
    return ema.eval()


# --- The checkpoint: resumed only when its data and network match the run's; Ctrl-C stops at a
#     step boundary. ---------------------------------------------------------------------------


def changed_settings(then: dict, now: dict, then_name: str) -> list[str]:
    """Each setting whose value differs between `then` (what a file was made with) and `now`, as
    '--flag <then> (<then_name>) vs <now> (now)': the one validity check, of the checkpoint here
    and of every stage file (the run folder)."""
    return [f"--{name.replace('_', '-')} {then.get(name)} ({then_name}) vs {now.get(name)} (now)"
            for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]


def check_compatible(saved: dict, cfg: Config, path: Path, fields: list[str]) -> None:
    """A checkpoint trained with other data or another network is never loaded silently."""
    then = {f: saved.get(f) for f in fields}
    diffs = changed_settings(then, {f: getattr(cfg, f) for f in fields}, "checkpoint")
    if diffs:
        raise UserError(f"{path} was trained with other settings: {'; '.join(diffs)}. "
                        f"Use the old settings, another --out, or --fresh to retrain")


def why_unreadable(error: Exception) -> str:
    """One line about an exception raised while reading a file."""
    detail = (str(error).splitlines() or [""])[0][:80]
    return f"{error.__class__.__name__}: {detail}" if detail else error.__class__.__name__


# What a checkpoint must share with the run: its data and its network (the run folder's stages
# depend on both lists too). A longer --train-steps resumes training.
DATA_SETTINGS = ["dataset", "data_root", "n", "image_size", "subset", "seed"]
DDPM_SETTINGS = ["channels", "blocks", "attn_res", "batch_size", "lr", "ema"]


def read_checkpoint(path: Path, cfg: Config) -> dict | None:
    """ddpm.pt when there is one to resume from. One that cannot be read, or that was trained with
    other data or another network, stops the run: a checkpoint is never replaced silently."""
    if cfg.fresh or not path.is_file():
        return None
    # onto the CPU: load_state_dict moves weights and Adam's moments to the model's device but keeps
    # Adam's step counters on the CPU (on CUDA they would cost a device sync per parameter and
    # step); memory-mapped, as RunFolder checks ddpm.pt first and train_ddpm then loads it again
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        trained_with = saved["config"]
    except Exception as error:  # truncated, half-copied, or not a checkpoint at all
        raise UserError(f"{path} cannot be read ({why_unreadable(error)}); rerun with --fresh to "
                        f"train again from scratch, or delete {path}")
    check_compatible(trained_with, cfg, path, DATA_SETTINGS + DDPM_SETTINGS)
    return saved


def resume_ddpm(path: Path, cfg: Config, model, ema, opt, gen, rank: int = 0,
                processes: int = 1) -> int:
    """Load ddpm.pt, when there is one, into the training state; returns the step to go on from.
    `gen` takes the batch generator saved by process `rank` (experiments.py's torchrun saves one
    per process); an unfinished checkpoint resumes only with as many processes as it was left by."""
    saved = read_checkpoint(path, cfg)
    if saved is None:
        return 0
    if saved["step"] > cfg.train_steps:
        raise UserError(f"{path} is at step {saved['step']}, beyond --train-steps "
                        f"{cfg.train_steps}; raise --train-steps, use another --out, or --fresh")
    count = len(saved["rngs"])
    if saved["step"] < cfg.train_steps and count != processes:
        raise UserError(f"{path} was being trained by {count} process(es); resume it with as many "
                        f"(torchrun --nproc_per_node {count} experiments.py), or retrain with "
                        f"--fresh")
    for name, part in (("model", model), ("ema", ema), ("opt", opt)):
        part.load_state_dict(saved[name])
    if rank < count:  # a finished checkpoint may have fewer generators than there are processes
        gen.set_state(saved["rngs"][rank].cpu())
    trained = saved["step"] == cfg.train_steps
    print(f"  ddpm.pt: trained ({cfg.train_steps} steps), skipping" if trained
          else f"  resuming DDPM training from step {saved['step']}")
    return saved["step"]


class StopAtStepBoundary:
    """Inside this block Ctrl-C only raises a flag; check() stops training at the next step
    boundary, so the checkpoint never holds weights one update ahead of its step and generator
    state. SIDE_STOP_AT_STEP=N (the tests' Ctrl-C) stops at step N."""

    def __enter__(self):
        self.pressed, self.previous = False, None
        self.stop_at = int(os.environ.get("SIDE_STOP_AT_STEP", -1))
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self.press)
        return self

    def press(self, *_):
        self.pressed = True

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def check(self, step: int, loss, path: Path | None, save) -> float:
        """Stop on Ctrl-C (saving with save()) or on a non-finite loss; else the loss as a number
        (for a tensor, the step's one device sync)."""
        loss = loss.item() if torch.is_tensor(loss) else float(loss)
        if self.pressed or step == self.stop_at:
            if path is None:
                raise KeyboardInterrupt
            save()
            raise UserError(f"stopped at step {step}; checkpoint saved to {path}. Rerun the same "
                            f"command to resume")
        if not math.isfinite(loss):
            raise UserError(f"DDPM loss became {loss} at step {step}; lower --lr. The last good "
                            f"checkpoint ({path}) is kept")
        return loss


# =================================================================================================
# 4. Guided sampling, for Algorithm 1 line 1 (unguided) and lines 16-26. The guided score (Eq. 1,
#    line 24) is s_theta + lambda grad log p_phi(c | x_t); since s_theta = -eps / sqrt(1 - abar_t),
#    in eps-space it is eps - lambda sqrt(1 - abar_t) grad. One guidance function and one reverse
#    step (DDIM, Song et al. 2021) serve both samplers.
# =================================================================================================


def guided_eps(model, classifier, x, t, targets, guidance: float):
    """eps_theta(x_t, t) - lambda sqrt(1 - abar_t) grad_x log p_phi(c | x_t, t)  (paper Eq. 1)."""
    with torch.no_grad(), autocast(x.device):
        eps = model(x, t).float()
    if classifier is None or guidance == 0:
        return eps  # lambda = 0 is exactly the unconditional model
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        log_probs = F.log_softmax(classifier(x_in, t).float(), dim=1)
        selected = log_probs[torch.arange(len(x), device=x.device), targets].sum()
        grad = torch.autograd.grad(selected, x_in)[0]
    return eps - guidance * (1 - DIFFUSION.abar(t.cpu(), x)).sqrt() * grad


def parse_sampler(name: str) -> tuple[str, int] | None:
    """'ddim50' -> ('ddim', 50): 50 DDIM steps. 'ddpm1000' -> ('ddpm', 1000): DDPM's own ancestral
    chain; 'ddpm250' is the same ancestral step (eta = 1) on every 4th timestep. None: not a name.
    The sampler changes how much a memorizing model gives back (README, "The sampler")."""
    kind, steps = name[:4], name[4:]
    if kind not in ("ddim", "ddpm") or not steps.isdigit() or not 0 < int(steps) <= T_STEPS:
        return None
    return (kind, int(steps)) if T_STEPS % int(steps) == 0 else None


def sampling_timesteps(sample_steps: int) -> list[int]:
    """Original timestep indices visited, descending to 0: every (T / steps)-th, T - T/steps ... 0
    (diffusers' "leading" spacing: 980, ..., 0 for 50; 999, ..., 0 for all T = 1000)."""
    return list(range(0, T_STEPS, T_STEPS // sample_steps))[::-1]


def reverse_step(x, eps, t: int, t_prev: int, eta: float, noise) -> torch.Tensor:
    """One DDIM step t -> t_prev (Song et al. 2021, Eq. 12) with x_0 clamped to [-1, 1].

    eta = 1 with t_prev = t - 1 is exactly ancestral DDPM with variance beta_tilde_t, so one
    step function serves both samplers. No noise is added on the last step (t_prev = -1)."""
    t_now = torch.full((x.shape[0],), t, dtype=torch.long)
    a_t = DIFFUSION.abar(t_now, x)
    a_prev = DIFFUSION.abar(torch.full_like(t_now, t_prev), x)  # t_prev = -1: abar = 1
    # eps arrives already guided, so x_0 is clamped after guidance (diffusers' DDIM step does the
    # same; guided-diffusion clamps first): the clamp bounds what guidance can push x_0 to
    x0 = DIFFUSION.predicted_x0(x, eps, t_now).clamp(-1, 1)
    eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # the noise consistent with the clamped x_0
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
    return x_prev + sigma * noise if t_prev >= 0 else x_prev


STREAM_EVAL, STREAM_SYNTHETIC, STREAM_TARGET = 0, 1, 2  # a random stream each (3: experiments.py)


def sample_rng(seed: int, stream: int, index: int) -> torch.Generator:
    """Generation i draws all its randomness from its own (seed, stream, i) generator: any one
    sample can be regenerated alone, and any range of generations can be drawn on its own."""
    entropy = np.random.SeedSequence([seed, stream, index]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def per_sample_noise(rngs: list, shape: tuple, device) -> torch.Tensor:
    """One N(0, I) draw for each generation, each from its own generator."""
    return torch.stack([torch.randn(shape, generator=g) for g in rngs]).to(device)


def sampling_batch(device: torch.device, image_size: int, guided: bool) -> int:
    """256 on the CPU; 1,024 on CUDA. A guided step keeps the classifier's activations in fp32 for
    its gradient (about 50 MB an image at 64 px), so the guided batch shrinks with the image area:
    1,024 at 32 px, 256 at 64 px, 64 at 128 px (13-15 GB each)."""
    if device.type == "cpu":
        return 256
    return max(1, min(1024, 1024 * 32 ** 2 // image_size ** 2)) if guided else 1024


def sample(model, cfg: Config, count: int, device: torch.device, stream: int = STREAM_EVAL,
           classifier=None, targets=None, guidance: float = 0.0, desc: str = "sample",
           batch: int = 0, start: int = 0, sampler: str = "") -> np.ndarray:
    """Generations start .. start+count-1 (uint8) with `sampler` (default: --sampler), guided
    toward `targets` (one per generation) when guidance > 0. Generation i draws its noise from
    (seed, stream, i) alone, so any range of them can be drawn on its own."""
    shape = (model.head[-1].out_channels, cfg.image_size, cfg.image_size)
    sampler = sampler or cfg.sampler
    parsed = parse_sampler(sampler)
    if parsed is None:
        raise ValueError(f"sampler {sampler!r}: ddim<S> or ddpm<S>, S dividing T = {T_STEPS}")
    kind, sample_steps = parsed
    timesteps, eta = sampling_timesteps(sample_steps), float(kind == "ddpm")  # DDIM: eta = 0
    guided = classifier is not None and guidance > 0
    batch = batch or max(1, min(count, sampling_batch(device, cfg.image_size, guided)))
    images = []
    for first in progress(range(0, count, batch), desc=desc, unit="batch"):
        indices = range(start + first, start + min(count, first + batch))
        rngs = [sample_rng(cfg.seed, stream, i) for i in indices]
        x = per_sample_noise(rngs, shape, device)  # x_T
        target = None if targets is None else torch.as_tensor(
            targets[first:first + len(rngs)], device=device)
        for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
            t_batch = torch.full((len(x),), t, device=device, dtype=torch.long)  # original index
            eps = guided_eps(model, classifier, x, t_batch, target, guidance)
            noise = per_sample_noise(rngs, shape, device) if eta > 0 else 0  # DDPM: fresh
            x = reverse_step(x, eps, t, t_prev, eta, noise)
        images.append(to_uint8(x))
    return np.concatenate(images)


# =================================================================================================
# 5. Surrogate labels: Algorithm 1, Part 1, lines 2-5 (line 1 samples N_syn images, in part1()).
#    Features F(x): the paper uses SSCD, a download; we use the pixels, centred on the synthetic-set
#    mean and L2-normalized: at 8-32 px they are meaningful, and section 8 measures in the same
#    pixels. experiments.py --embed uses a local SSCD model.
# =================================================================================================


def flat_pixels(images_u8: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x C -> float32 N x D channel values (0..255): the one pixel flattener."""
    return images_u8.reshape(len(images_u8), -1).astype(np.float32)


def pixel_features(images_u8: np.ndarray) -> np.ndarray:
    """F(x) of Algorithm 1 line 2: the pixels in [0, 1], centred on the set's mean, unit length."""
    pixels = flat_pixels(images_u8)
    flat = pixels / 255.0 - pixels.mean(0) / 255.0
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-8)


def surrogate_labels(features: np.ndarray, clusters: int, cohesion: float, seed: int) -> dict:
    """k-means (line 3), then cohesion of cluster k = mean cosine(z, mu_k) over its k-means members;
    keep those >= tau (line 4); then every sample, not only those of dropped clusters, takes the
    label of its nearest kept centroid (line 5). The cohesion returned is that of the k-means
    membership, before this relabelling."""
    from sklearn.cluster import KMeans
    kmeans = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(features)
    centers = kmeans.cluster_centers_
    centroids = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    cosines = (features * centroids[kmeans.labels_]).sum(1)
    cohesions = np.array([cosines[kmeans.labels_ == k].mean() for k in range(clusters)])
    kept = np.flatnonzero(cohesions >= cohesion)
    if len(kept) == 0:
        raise UserError(f"--cohesion {cohesion} keeps none of the {clusters} clusters (best "
                        f"cohesion {cohesions.max():.3f}); lower --cohesion or raise --clusters")
    similarity = features @ centroids[kept].T  # cosine to every kept centroid
    # a kept centroid may lose all its members to another one: it is dropped too
    nonempty = np.bincount(similarity.argmax(1), minlength=len(kept)) > 0
    kept, labels = kept[nonempty], similarity[:, nonempty].argmax(1)  # nearest kept centroid
    return dict(labels=labels, kept=kept, cohesion=cohesions[kept], all_cohesion=cohesions,
                sizes=np.bincount(labels, minlength=len(kept)), centroids=centroids[kept])


def label_synthetic(cfg: Config, synthetic: np.ndarray, train: dict, device,
                    features: np.ndarray | None = None) -> dict:
    """Algorithm 1 lines 2-5 on `features` (default: the pixels); "soft" holds the classifiers'
    one-hot targets. `train` and `device` are unused: the attacker labels the model's samples
    without the training set (experiments.py's TDKD teacher, the same hook, uses both)."""
    features = pixel_features(synthetic) if features is None else features
    labels = surrogate_labels(features, cfg.clusters, cfg.cohesion, cfg.seed)
    labels["soft"] = np.eye(len(labels["kept"]), dtype=np.float32)[labels["labels"]]
    return labels


# =================================================================================================
# 6. Classifiers (Algorithm 1 line 6). SIDE trains p_phi(y | x_t, t) with cross-entropy on
#    x_t = q_sample(x_0, t), t uniform (Eq. 2): x_t comes from the target model's own forward
#    process. Carlini Cond trains the same network without a time module on clean x_0 only. With
#    soft targets the same loss is distillation, KL(teacher || student) + const (paper v1-v6).
# =================================================================================================


class Classifier(nn.Module):
    """p_phi(y | x_t, t) (time_dependent=True, SIDE) or p(y | x) (False, Carlini Cond: without a
    time module t cannot influence it). The target is never an input: it scores every label."""

    def __init__(self, in_ch: int, channels: list[int], blocks: int, attn_res: list[int], size: int,
                 num_classes: int, time_dependent: bool):
        super().__init__()
        t_dim = 4 * channels[0] if time_dependent else 0
        self.time = TimeEmbedding(channels[0]) if time_dependent else None
        self.encoder = Encoder(in_ch, channels, blocks, attn_res, size, t_dim)
        self.head = nn.Sequential(group_norm(channels[-1]), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(channels[-1], num_classes))

    def forward(self, x, t):
        h, _ = self.encoder(x, self.time(t) if self.time is not None else None)
        return self.head(h)


def build_classifier(cfg: Config, in_ch: int, num_classes: int, time_dependent: bool) -> Classifier:
    return Classifier(in_ch, channel_list(cfg.channels), cfg.blocks, channel_list(cfg.attn_res),
                      cfg.image_size, num_classes, time_dependent)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_y q(y) log p(y | x): cross-entropy for one-hot q, KL-distillation for soft q."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


def classifier_inputs(x0, gen, time_dependent: bool):
    """(x_t, t): noised by q(x_t | x_0) for the time-dependent classifier, clean for the other."""
    if not time_dependent:
        return x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device)
    x_t, t, _ = DIFFUSION.noised(x0, gen)
    return x_t, t.to(x0.device)


def train_classifier(cfg: Config, images_u8: np.ndarray, targets: np.ndarray, time_dependent: bool,
                     device: torch.device, desc: str):
    """Fit a classifier on (images, soft targets); AdamW as in the paper (Setup)."""
    torch.manual_seed(cfg.seed + 1)
    x0_all = to_unit_range(images_u8).to(device)
    soft = torch.as_tensor(targets, dtype=torch.float32, device=device)
    net = build_classifier(cfg, x0_all.shape[1], soft.shape[1], time_dependent).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.clf_lr)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    bar = progress(range(cfg.clf_steps), desc=desc)
    for _ in bar:
        batch = torch.randint(len(x0_all), (cfg.clf_batch,), generator=gen).to(device)
        x, t = classifier_inputs(x0_all[batch], gen, time_dependent)
        with autocast(device):
            loss = soft_cross_entropy(net(x, t).float(), soft[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def fit_classifier(cfg: Config, synthetic: np.ndarray, labels: dict, time_dependent: bool,
                   device: torch.device) -> dict:
    """Algorithm 1 line 6: train on 90 % of the synthetic set; measure the accuracy by t on the
    other 10 % (every 10th image), which it never saw. Returns the network and that accuracy."""
    held_out = np.arange(len(synthetic)) % 10 == 0
    desc = f"train {'p(y|x_t,t)' if time_dependent else 'p(y|x)'}"
    net = train_classifier(cfg, synthetic[~held_out], labels["soft"][~held_out], time_dependent,
                           device, desc)
    accuracy = accuracy_by_t(net, synthetic[held_out], labels["labels"][held_out], device, cfg.seed)
    return dict(net=net, accuracy=accuracy)


T_RANGES = [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]


@torch.no_grad()
def accuracy_by_t(net: nn.Module, images_u8: np.ndarray, labels: np.ndarray, device: torch.device,
                  seed: int) -> dict:
    """Accuracy on x_t for each range of t. Low accuracy at large t is expected by design."""
    x0, gen = to_unit_range(images_u8).to(device), torch.Generator().manual_seed(seed)
    truth, result = torch.as_tensor(labels, device=device), {}
    for low, high in T_RANGES:
        x_t, t, _ = DIFFUSION.noised(x0, gen, low, high)
        predicted = torch.cat([net(x_block, t_block.to(device)).argmax(1)
                               for x_block, t_block in zip(x_t.split(512), t.split(512))])
        result[f"t{low}-{high - 1}"] = round((predicted == truth).float().mean().item(), 4)
    return result


# =================================================================================================
# 7. Extraction: Algorithm 1, Part 2. For each generation draw a target cluster c ~ U{1..K'} and
#    sample with the guided score. `uncond` (Carlini UnCond) is the same call with lambda = 0.
#    `cond` (Carlini Cond) guides with the time-independent classifier on x_t, so it differs from
#    `side` only in noise-awareness. Each guided row has its own lambda (--guidance).
# =================================================================================================


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of Table 1, as data: experiments.py adds its controls as rows, through the hooks."""
    name: str                    # the row's name; its generations go to samples_<name>.npz
    classifier: str | None       # the classifier that guides it (classifier_<classifier>.pt)
    time_dependent: bool = True  # that classifier is p_phi(y | x_t, t) (SIDE) or p(y | x)
    relabel: Callable | None = None  # (cfg, labels, synthetic, train) -> what the classifier learns
    judge: Callable | None = None    # (classifier, model) -> what guides: the classifier, wrapped
    guidance: float | None = None  # its lambda in this run: None until method_rows() sets it
    sampler: str = ""              # its Part 2 sampler in this run ("": Part 1's)


METHODS = {"uncond": Method("uncond", classifier=None),  # no classifier: lambda = 0
           "cond": Method("cond", classifier="cond", time_dependent=False),
           "side": Method("side", classifier="side", time_dependent=True)}


def draw_targets(seed: int, count: int, num_classes: int) -> np.ndarray:
    """One uniform target per generation, each from its own (seed, STREAM_TARGET, i) generator."""
    rngs = (sample_rng(seed, STREAM_TARGET, i) for i in range(count))
    return np.array([int(torch.randint(num_classes, (1,), generator=g)) for g in rngs])


def extract(cfg: Config, method: Method, model, classifier, guidance: float, device,
            sampler: str = "") -> dict:
    """Algorithm 1 lines 16-26: N_G generations of one method with `sampler` (default: Part 1's).
    Every method uses the same seeds, and guided methods whose classifiers have as many labels share
    the targets c (line 17), so rows at the same sampler differ only in their guidance."""
    started, sampler = time.perf_counter(), sampler or cfg.sampler
    targets = np.full(cfg.n_gen, -1)  # no target: the unguided row
    if method.classifier is not None:  # Carlini UnCond (no classifier) is lambda = 0
        targets = draw_targets(cfg.seed, cfg.n_gen, classifier.head[-1].out_features)
        if method.judge is not None:
            classifier = method.judge(classifier, model)
    images = sample(model, cfg, cfg.n_gen, device, STREAM_EVAL, classifier, targets, guidance,
                    desc=f"generate {method.name}", sampler=sampler)
    seeds = np.array([[cfg.seed, STREAM_EVAL, i] for i in range(cfg.n_gen)])
    return dict(images=images, seeds=seeds, targets=targets, sampler=np.array(sampler),
                seconds=np.array(time.perf_counter() - started))  # the sampler's cost


# =================================================================================================
# 8. Memorization check, in pixel L2, block by block (the N_G x n x pixels tensor is never built).
#    Gu et al. 2023: memorized iff d1 / d2 < 1/3. Carlini et al. 2023: normalized L2 = d1 / (alpha
#    * mean distance to the 50 nearest), alpha = 0.5. AMS / UMS (Eq. 6-9) use a similarity gamma:
#    1 - normalized L2 (the paper's measure at low resolution; experiments.py --embed: SSCD's
#    cosine, the paper's measure at full resolution).
# =================================================================================================

GU_THRESHOLD = 1 / 3
CARLINI_NEIGHBOURS, CARLINI_ALPHA = 50, 0.5
PIXEL_BANDS = (0.50, 0.65, 0.75)  # docs/usage.md, "Metrics"


def block_slices(total: int, size: int):
    return [slice(s, min(total, s + size)) for s in range(0, total, size)]


def pairwise_blocks(queries, keys, featurize, block: int):
    """Yield (query slice, key slice, query features, key features) covering all pairs in blocks."""
    for qs in block_slices(len(queries), block):
        q = featurize(queries[qs])
        for ks in block_slices(len(keys), block):
            yield qs, ks, q, featurize(keys[ks])


def nearest_neighbours(generated: np.ndarray, train: np.ndarray, k: int, device="cpu",
                       block: int = 1024):
    """The k smallest pixel-L2 distances (and indices) from each generation to the training set."""
    k = min(k, len(train))
    dist = torch.full((len(generated), k), float("inf"))
    index = torch.zeros((len(generated), k), dtype=torch.long)

    def unit_pixels(images_u8):  # in [0, 1]
        return torch.as_tensor(flat_pixels(images_u8), device=device) / 255.0
    for qs, ks, q, x in pairwise_blocks(generated, train, unit_pixels, block):
        d2 = (q * q).sum(1, keepdim=True) + (x * x).sum(1)[None] - 2 * q @ x.T  # ||q - x||^2
        cand_d = torch.cat([dist[qs], d2.clamp(min=0).sqrt().cpu()], 1)
        cand_i = torch.cat([index[qs], torch.arange(ks.start, ks.stop).expand(len(q), -1)], 1)
        dist[qs], order = cand_d.topk(k, dim=1, largest=False)
        index[qs] = cand_i.gather(1, order)
    return dist.numpy(), index.numpy()


def pixel_similarity(dist: np.ndarray, index: np.ndarray, n_train: int, bands):
    """gamma = 1 - normalized L2 for the k nearest: per generation the best gamma and its index, per
    band the training images hit (Eq. 9: every image in the band, not only the nearest). gamma >= 0
    means d <= alpha * (mean of the k nearest) < (largest of the k nearest), so every training
    image in a band (all have gamma >= bands[0] >= 0) is among the k nearest: no second pass."""
    gamma = 1 - dist / (CARLINI_ALPHA * np.maximum(dist.mean(1, keepdims=True), 1e-12))
    hit = {name: np.zeros(n_train, dtype=bool) for name in ("low", "mid", "high")}
    for name, in_band in band_masks(gamma, bands).items():
        hit[name][index[in_band]] = True
    return gamma[:, 0], index[:, 0], hit


def band_masks(similarity, bands) -> dict:
    low, mid, high = bands
    return {"low": (similarity >= low) & (similarity < mid),
            "mid": (similarity >= mid) & (similarity <= high),
            "high": similarity > high}


def memorization_metrics(generated: np.ndarray, train: np.ndarray, bands, device,
                         similarity: Callable | None = None):
    """Every per-sample statistic and the summary numbers of one method. `similarity`: another
    gamma for AMS/UMS (experiments.py --embed); by default 1 - normalized L2 in pixels."""
    dist, index = nearest_neighbours(generated, train, CARLINI_NEIGHBOURS, device)
    second = min(1, dist.shape[1] - 1)  # with a one-image training set, the nearest again
    d1, d2 = dist[:, 0], dist[:, second]
    ratio = d1 / np.maximum(d2, 1e-12)
    normalized_l2 = d1 / (CARLINI_ALPHA * np.maximum(dist.mean(1), 1e-12))
    if similarity is None:  # pixel space: gamma = 1 - normalized L2, from the k nearest
        best_sim, best_sim_index, band_hits = pixel_similarity(dist, index, len(train), bands)
    else:
        best_sim, best_sim_index, band_hits = similarity(generated, train, bands)
    memorized = ratio < GU_THRESHOLD
    per_sample = dict(nn_index=index[:, 0], nn_index2=index[:, second], d1=d1, d2=d2,
                      nn_ratio=ratio, normalized_l2=normalized_l2, best_sim=best_sim,
                      best_sim_index=best_sim_index)
    summary = summarize(memorized, index[:, 0], ratio, normalized_l2, best_sim, band_hits, bands)
    return dict(per_sample=per_sample, summary=summary)


def summarize(memorized, nn_index, ratio, normalized_l2, best_sim, band_hits, bands) -> dict:
    """Gu's count and fraction, distinct training images memorized, and AMS / UMS in % per band
    (Eq. 6-9: AMS counts generations in the band; UMS the training images phi hit, over N_G)."""
    n_gen = len(memorized)
    summary = dict(n_generated=n_gen, memorized=int(memorized.sum()),
                   memorized_fraction=float(memorized.mean()),
                   unique_memorized=int(len(np.unique(nn_index[memorized]))),
                   median_nn_ratio=float(np.median(ratio)),
                   normalized_l2_p5=float(np.percentile(normalized_l2, 5)),
                   sim_p95=float(np.percentile(best_sim, 95)))
    for name, in_band in band_masks(best_sim, bands).items():  # AMS counts each generation once
        summary[f"ams_{name}"] = float(100 * in_band.mean())
        summary[f"ums_{name}"] = float(100 * band_hits[name].sum() / n_gen)  # UMS / N_G, in %
    summary["ams_ge_low"] = float(100 * (best_sim >= bands[0]).mean())  # cumulative counts
    summary["ams_ge_mid"] = float(100 * (best_sim >= bands[1]).mean())
    summary["ams_gt_high"] = summary["ams_high"]
    return summary


# =================================================================================================
# 9. Algorithm 1, top to bottom. `cached(name, compute)` returns compute()'s result, or the one a
#    run with the same settings saved under that name (the run folder, plumbing); train_ddpm
#    writes its own checkpoint. `phase` names and times each step.
# =================================================================================================


def run(cfg: Config, cached, device: torch.device, rows: list[Method],
        surrogate: Callable = label_synthetic, load: Callable | None = None) -> dict:
    """Train the target DPM on D (the model the attack starts from), then Algorithm 1. Output:
    D_ext, N_G generations for every row of `rows`, each at its own lambda and sampler (in side.py
    every row shares --extract-sampler; experiments.py gives each row its own).
    experiments.py passes its controls among the rows, another `surrogate` (the TDKD teacher,
    --embed) and another `load` (its datasets)."""
    if any(row.classifier and row.guidance is None for row in rows):
        raise ValueError("a guided row has no lambda; build the rows with method_rows(cfg)")
    cached.phase("data", f"[1/6] data: {cfg.dataset}, n = {cfg.n}, {cfg.image_size} px")
    train = cached("data", lambda: (load or load_training_set)(cfg))
    cached.phase("train", f"[2/6] DDPM: {cfg.train_steps} steps on {device}")
    x0_train = to_unit_range(train["images"]).to(device)
    model = train_ddpm(cfg, x0_train, cached.out / "ddpm.pt")  # the target DPM
    labels, classifiers = None, {}
    if any(row.classifier for row in rows):  # the baseline alone needs no labels or classifier
        labels, classifiers = part1(cfg, cached, model, train, rows, surrogate, device)
    settings = ", ".join(f"{row.name} (lambda {row.guidance:g}, {row.sampler})" for row in rows)
    cached.phase("sample", f"[5/6] extraction: N_G = {cfg.n_gen} per row: {settings}")
    generations = {}
    for row in rows:  # Part 2, lines 16-26, for every row at its own lambda and sampler
        # (cached() calls the lambda at once, so it sees this row's classifier)
        classifier = classifiers.get(row.classifier, {}).get("net")
        generations[row.name] = cached(f"samples_{row.name}", lambda: extract(
            cfg, row, model, classifier, row.guidance, device, row.sampler),
            guidance=row.guidance, extract_sampler=row.sampler)
    accuracies = {name: fitted["accuracy"] for name, fitted in classifiers.items()}
    return dict(train=train, labels=labels, accuracies=accuracies, generations=generations)


def part1(cfg: Config, cached, model, train: dict, rows: list, surrogate, device: torch.device):
    """Algorithm 1, Part 1: surrogate labels from the model's own samples, then the classifiers."""
    cached.phase("labels", f"[3/6] surrogate labels: N_syn = {cfg.n_syn}, K = {cfg.clusters}, "
                           f"tau = {cfg.cohesion}")
    synthetic = cached("synthetic", lambda: dict(images=sample(  # line 1: D_syn, its own stream
        model, cfg, cfg.n_syn, device, STREAM_SYNTHETIC, desc="sample N_syn")))["images"]
    labels = cached("labels", lambda: surrogate(cfg, synthetic, train, device))  # lines 2-5
    cached.phase("classifier", f"[4/6] classifiers on {len(labels['kept'])} labels")
    classifiers = {}
    for row in rows:  # line 6, once for every classifier the rows ask for
        if row.classifier is None or row.classifier in classifiers:
            continue
        row_labels = row.relabel(cfg, labels, synthetic, train) if row.relabel else labels
        classifiers[row.classifier] = cached(f"classifier_{row.classifier}", lambda: fit_classifier(
            cfg, synthetic, row_labels, row.time_dependent, device))
    return labels, classifiers


# =================================================================================================
# Plumbing. Nothing below is a step of Algorithm 1: progress bars, the datasets, atomic writes, the
# run folder, the report, and the command line.
# =================================================================================================


def progress(iterable, **options) -> tqdm:
    """tqdm bars with loss and ETA."""
    return tqdm(iterable, mininterval=1.0, dynamic_ncols=True, **options)


# --- Datasets: the training set D, uint8 N x H x W x C exactly as trained on. No flips or other
#     augmentation: memorization of the exact images is studied. -------------------------------

CELEBA_FACE_CENTER = (89, 121)  # (x, y) of the face in a 178x218 aligned image (the DDIM code's)
CELEBA_CROP = 140               # the usual square face crop of DDPM/DDIM CelebA models


def pick_indices(total: int, cfg: Config, what: str) -> np.ndarray:
    if cfg.n > total:
        raise UserError(f"--n {cfg.n} is more than the {total} images found in {what}; "
                        f"lower --n or add images")
    if cfg.subset == "random":
        return np.sort(np.random.default_rng(cfg.seed).choice(total, cfg.n, replace=False))
    return np.arange(cfg.n)


def resize_all(images_u8: np.ndarray, size: int) -> np.ndarray:
    """Resize square uint8 images with PIL's bicubic filter (identity when already at size)."""
    from PIL import Image
    if images_u8.shape[1] == size:
        return images_u8
    mode = "L" if images_u8.shape[-1] == 1 else "RGB"
    resized = [np.asarray(Image.fromarray(im.squeeze(-1) if mode == "L" else im, mode).resize(
        (size, size), Image.BICUBIC)) for im in images_u8]
    return np.stack(resized).reshape(len(images_u8), size, size, -1)


def load_digits(cfg: Config):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 17 grey levels)."""
    from sklearn.datasets import load_digits as sklearn_digits
    bunch = sklearn_digits()
    images = np.round(bunch.images * (255 / 16)).astype(np.uint8)[..., None]
    indices = pick_indices(len(images), cfg, "scikit-learn's digits")
    return resize_all(images[indices], cfg.image_size), indices, bunch.target[indices]


def load_image_files(paths: list[Path], crop_box, size: int) -> np.ndarray:
    """Decode, crop to `crop_box(image)` and resize each image (bicubic)."""
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in progress(paths, desc="decode images", leave=False, disable=len(paths) < 200):
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                images.append(np.asarray(image.crop(crop_box(image)).resize((size, size),
                                                                            Image.BICUBIC)))
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"cannot read image {path} ({error.__class__.__name__}); "
                            f"remove or replace that file")
    return np.stack(images)


def celeba_folder(root: Path) -> Path:
    for folder in (root / "celeba" / "img_align_celeba", root / "img_align_celeba", root):
        if folder.is_dir() and any(folder.glob("*.jpg")):
            return folder
    raise UserError(f"no CelebA images under {root}: expected "
                    f"{root}/celeba/img_align_celeba/000001.jpg (torchvision layout), "
                    f"{root}/img_align_celeba/ or a flat folder of those jpgs; set --data-root, or "
                    f"fetch it: python experiments.py download --dataset celeba")


def load_celeba(cfg: Config):
    """Aligned CelebA (178x218 jpgs), the usual face crop. Only the image folder is needed."""
    folder = celeba_folder(Path(cfg.data_root))
    paths = sorted(folder.glob("*.jpg"))
    indices = pick_indices(len(paths), cfg, str(folder))
    (cx, cy), half = CELEBA_FACE_CENTER, CELEBA_CROP // 2
    box = (cx - half, cy - half, cx + half, cy + half)
    images = load_image_files([paths[i] for i in indices], lambda _: box, cfg.image_size)
    return images, indices, None  # no labels: experiments.py's teacher reads the identities


LOADERS = {"digits": load_digits, "celeba": load_celeba}


def load_training_set(cfg: Config, loaders: dict = LOADERS) -> dict:
    """Decode the subset once; its stage file is what every later stage and rerun reads.
    `loaders`: experiments.py passes its own (CIFAR-10, image folders)."""
    images, indices, labels = loaders[cfg.dataset](cfg)
    return dict(images=images, indices=indices,
                labels=labels if labels is not None else np.full(len(images), -1))


# --- Files are written atomically: a run killed at any moment never leaves a half-written file
#     that a rerun trusts. ---------------------------------------------------------------------


def write_atomically(path: Path, write) -> None:
    """write(tmp) to a temporary file of its own beside `path`, then rename it over `path` in one
    step; processes writing one file at once (torchrun) never write into each other's."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")  # np.savez: .npz suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_npz(path: Path, **arrays) -> None:
    write_atomically(path, lambda tmp: np.savez(tmp, **arrays))


def save_torch(path: Path, obj) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def save_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


# --- The run folder: run()'s `cached`. A stage's file holds the settings the stage depends on; a
#     changed setting, or a file that cannot be read, recomputes the stage and says why. ---------

STAGE_FIELDS = {  # the settings groups; a stage depends on the groups stage_groups() names
    "data": DATA_SETTINGS,
    "ddpm": DDPM_SETTINGS + ["train_steps"],
    "sampler": ["sampler"],
    "synthetic": ["n_syn"],
    "labels": ["clusters", "cohesion"],
    "classifier": ["clf_steps", "clf_lr", "clf_batch"],
    "generations": ["n_gen"],
}


def stage_groups(name: str) -> list[str]:
    """The settings groups stage `name` depends on: `--guidance 3` redoes only guided sampling."""
    sampled = ["data", "ddpm", "sampler"]  # every stage after training samples the target model
    if name == "data":
        return ["data"]
    if name == "synthetic":
        return sampled + ["synthetic"]
    if name == "samples_uncond":  # no label, classifier, lambda or Part 1 sampler: its own
        return ["data", "ddpm", "generations"]  # sampler is a value (run())
    labelled = sampled + ["synthetic", "labels"]
    if name == "labels":
        return labelled
    return labelled + ["classifier"] + ([] if name.startswith("classifier_") else ["generations"])


class RunFolder:
    """run()'s `cached`: folder(name, compute, **values) returns the stage's saved result when it
    was made with the same settings (and `values`, such as a row's lambda), else compute()'s,
    saved. ddpm.pt is checked here, before anything is written. experiments.py extends `groups`
    and `settings`, and shares stages among torchrun's processes."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.out, self.device = cfg, Path(cfg.out), device
        self.checkpoint = read_checkpoint(self.out / "ddpm.pt", cfg)  # a bad one stops here
        self.timings, self.current, self.clock = {}, None, time.perf_counter()

    def __call__(self, name: str, compute, **values) -> dict:
        return self.load_or_compute(self.path(name), self.settings(name, **values), compute)

    def path(self, name: str) -> Path:
        stored = "train_subset" if name == "data" else name
        return self.out / (f"{stored}.pt" if name.startswith("classifier_") else f"{stored}.npz")

    def groups(self, name: str) -> list[str]:
        return stage_groups(name)

    def settings(self, name: str, **values) -> dict:
        """The settings the stage depends on, and `values` (a value named like a setting replaces
        it), as JSON gives them back."""
        fields = [f for group in self.groups(name) for f in STAGE_FIELDS[group]]
        return json.loads(json.dumps({**{f: getattr(self.cfg, f) for f in fields}, **values}))

    def load_or_compute(self, path: Path, settings: dict, compute) -> dict:
        cached = None if self.cfg.fresh or not path.is_file() else self.load(path, settings)
        if cached is None:
            cached = compute()
            made_with = json.dumps(settings)
            if path.suffix == ".pt":  # a classifier: the network itself
                save_torch(path, dict(cached, stage_settings=made_with))
            else:
                save_npz(path, **cached, stage_settings=made_with)
        return cached

    def load(self, path: Path, settings: dict) -> dict | None:
        try:
            if path.suffix == ".pt":
                data = dict(torch.load(path, map_location=self.device, weights_only=False))
            else:
                data = dict(np.load(path, allow_pickle=False))
            saved = data.pop("stage_settings", None)
            made_with = None if saved is None else json.loads(str(saved))
        except Exception as error:  # numpy, zipfile, pickle and json each raise their own kinds
            print(f"  {path.name}: cannot be read ({why_unreadable(error)}); recomputing it")
            return None
        if made_with is None:  # written by an older side.py, which kept only a hash
            print(f"  {path.name}: saved without its settings; recomputing it")
            return None
        diffs = changed_settings(made_with, settings, "saved")
        print(f"  {path.name}: " + (f"made with {'; '.join(diffs)}; recomputing it" if diffs
                                    else "up to date, skipping"))
        return None if diffs else data

    def phase(self, name: str, message: str) -> None:
        """Print `message` and time the phase `name` until the next phase() or finish()."""
        now = time.perf_counter()
        if self.current is not None:
            self.timings[self.current] = round(now - self.clock, 2)
        self.current, self.clock = name, now
        if message:
            print(message)

    def finish(self) -> dict:
        """The wall time of every phase and their total, in seconds, for the report."""
        self.phase(None, "")
        return dict(self.timings, total=round(sum(self.timings.values()), 2))


# --- The report: section 8's check for every row, report.json, report.md and the match grid -----

# (similarity, bands, name) of AMS/UMS: 1 - Carlini's normalized L2 in pixels (experiments.py's
# --embed and --bands give others)
PIXEL_SPACE = (None, PIXEL_BANDS, "1 - normalized L2 (pixels)")
TABLE_COLUMNS = [("memorized_fraction", "Gu mem. %", 100), ("unique_memorized", "Gu unique", 1),
                 ("ams_low", "Low AMS", 1), ("ums_low", "Low UMS", 1), ("ams_mid", "Mid AMS", 1),
                 ("ums_mid", "Mid UMS", 1), ("ams_high", "High AMS", 1),
                 ("ums_high", "High UMS", 1),
                 ("sim_p95", "95th sim", 1), ("normalized_l2_p5", "5th nL2", 1)]


def evaluate(generations: dict, train_images, out: Path, device, space=None) -> dict:
    """The memorization check for every row; per-sample statistics go to nn_<row>.npz."""
    similarity, bands, space = space or PIXEL_SPACE
    results = {}
    for method, data in generations.items():
        metrics = memorization_metrics(data["images"], train_images, bands, device, similarity)
        save_npz(out / f"nn_{method}.npz", **metrics["per_sample"])
        results[method] = metrics
    return dict(results=results, bands=bands, space=space)


def table_lines(header: list, rows: list) -> list[str]:
    """A Markdown table, one string per line."""
    return ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(map(str, row)) + " |" for row in rows)]


def markdown_table(methods: dict) -> str:
    rows = [[method] + [f"{s[key] * scale:.3f}" if isinstance(s[key], float) else str(s[key])
                        for key, _, scale in TABLE_COLUMNS] for method, s in methods.items()]
    return "\n".join(table_lines(["method"] + [title for _, title, _ in TABLE_COLUMNS], rows))


def write_report(cfg, evaluation, result: dict, timings: dict, out: Path) -> dict:
    """report.json and report.md."""
    methods = {m: r["summary"] for m, r in evaluation["results"].items()}
    labels, generations = result["labels"], result["generations"]
    report = dict(config=dataclasses.asdict(cfg), timings_s=timings, methods=methods,
                  sampling_s={m: round(float(g["seconds"]), 2) for m, g in generations.items()},
                  similarity=dict(space=evaluation["space"], bands=list(evaluation["bands"])),
                  labels=labels and labels_summary(labels),
                  classifier_accuracy_by_t=result["accuracies"],
                  guidance={m: v for m, v in row_lambdas(cfg).items() if m in methods},
                  part1_sampler=cfg.sampler,
                  samplers={m: str(g["sampler"]) for m, g in generations.items()})
    if "uncond" in methods and methods["uncond"]["memorized_fraction"] > 0:
        baseline = methods["uncond"]["memorized_fraction"]
        report["gain_over_uncond"] = {m: s["memorized_fraction"] / baseline
                                      for m, s in methods.items()}
    save_report(out, report, report_markdown(cfg, report))
    return report


def labels_summary(labels: dict) -> dict:
    return dict(source="teacher" if "teacher" in labels else "kmeans",  # experiments.py's TDKD
                clusters_kept=int(len(labels["kept"])), sizes=labels["sizes"].tolist(),
                features=str(labels.get("features", "pixels (centred, unit norm)")),
                cohesion=np.round(labels["cohesion"], 4).tolist())


def save_report(out: Path, report: dict, markdown: str) -> None:
    """The one report writer: report.json and report.md (experiments.py's aggregate uses it too)."""
    save_text(out / "report.json", json.dumps(report, indent=2))
    save_text(out / "report.md", markdown)


def report_markdown(cfg, report) -> str:
    sim, labels = report["similarity"], report["labels"]
    kept = f"{labels['clusters_kept']} surrogate labels ({labels['source']})" if labels else (
        "no labels")
    lambdas = ", ".join(f"{m} {v:g}" for m, v in report["guidance"].items()) or "0 (uncond)"
    samplers = ", ".join(f"{m} {s}" for m, s in report["samplers"].items())
    low, mid, high = sim["bands"]
    return "\n".join([
        f"# SIDE report: {cfg.dataset}, n = {cfg.n}, {cfg.image_size} px, seed {cfg.seed}", "",
        f"N_G = {cfg.n_gen} per method, lambda {lambdas}, {kept}; samplers: Part 1 "
        f"{cfg.sampler}; {samplers}.", "", markdown_table(report["methods"]), "",
        f"Gu mem. %: generations with d1/d2 < 1/3 (pixel L2). AMS/UMS in % on {sim['space']} with "
        f"bands low [{low}, {mid}), mid [{mid}, {high}], high > {high}. 5th nL2: 5th percentile "
        "of Carlini's normalized L2 (lower = closer copies).", "",
        f"Clustering features (Algorithm 1 line 2): "
        f"{labels['features'] if labels else 'none (no labels)'}. Cohesion (report.json): of each "
        "kept cluster's k-means members, before every sample took the label of its nearest kept "
        "centroid (line 5).", "",
        "Classifier accuracy on held-out synthetic samples, by range of t:", "",
        "```", json.dumps(report["classifier_accuracy_by_t"], indent=1), "```", "",
        "Timings (s): " + json.dumps(report["timings_s"]), "",
        "![matches](figures/matches.png)", ""])


def pyplot():
    """matplotlib's pyplot, drawing into files only (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    pyplot().close(fig)


def save_figures(evaluation, generations, train_images, out, show: int = 24) -> None:
    """A match grid per row: generation above its nearest training image, sorted by d1/d2."""
    from torchvision.utils import make_grid
    methods = list(evaluation["results"])
    fig, axes = pyplot().subplots(1, len(methods), figsize=(3.5 * len(methods), 3.8), squeeze=False)
    for ax, method in zip(axes[0], methods):
        per = evaluation["results"][method]["per_sample"]
        order = np.argsort(per["nn_ratio"])[:show]
        rows = [block for s in block_slices(len(order), 8) for block in
                (generations[method]["images"][order[s]], train_images[per["nn_index"][order[s]]])]
        pictures = torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2)
        grid = make_grid(pictures, nrow=8, padding=1, pad_value=255)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", interpolation="nearest")
        mem = evaluation["results"][method]["summary"]["memorized"]
        ax.set_title(f"{method}: {mem} of {len(per['nn_ratio'])} memorized\n"
                     f"rows: generation / its nearest training image", fontsize=9)
        ax.axis("off")
    save_figure(fig, out / "figures" / "matches.png", dpi=150)


def run_pipeline(cfg: Config, folder: RunFolder | None = None, space=None,
                 rows: list[Method] | None = None, **attack) -> dict:
    """run() in its run folder, then the memorization check, report and figures. experiments.py
    passes its own folder, similarity `space` (--embed), `rows`, and run()'s other hooks."""
    device = resolve_device(cfg.device)
    folder = folder or RunFolder(cfg, device)  # reads ddpm.pt before anything in `out` is written
    out = Path(cfg.out)
    save_text(out / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    result = run(cfg, folder, device, rows or method_rows(cfg), **attack)
    folder.phase("evaluate", "[6/6] memorization check")
    train_images, generations = result["train"]["images"], result["generations"]
    evaluation = evaluate(generations, train_images, out, device, space)
    save_figures(evaluation, generations, train_images, out)
    report = write_report(cfg, evaluation, result, folder.finish(), out)
    print("\n" + markdown_table(report["methods"]))
    for method, gain in report.get("gain_over_uncond", {}).items():
        if method != "uncond":
            print(f"{method}: {gain:.2f}x the unconditional memorized fraction")
    print(f"\nreport: {out / 'report.md'}   figures: {out / 'figures'}   "
          f"total {report['timings_s']['total']:.0f} s")
    return report


# --- The command line: one line and exit code 2 for every problem, before any slow work ---------


def method_names(cfg: Config) -> list[str]:
    return [m.strip() for m in cfg.methods.split(",") if m.strip()]


def method_rows(cfg: Config, table: dict = METHODS) -> list[Method]:
    """The rows --methods asks for, in its order, each with its lambda (--guidance) and the Part 2
    sampler (--extract-sampler, else Part 1's). experiments.py passes its larger table."""
    sampler = cfg.extract_sampler or cfg.sampler
    return [dataclasses.replace(table[name], guidance=guidance_for(cfg, table[name]),
                                sampler=sampler) for name in method_names(cfg)]


def is_lambda(text: str) -> bool:
    try:
        return float(text) >= 0
    except ValueError:
        return False


def row_values(text: str, rows: list[str], valid, problem: str) -> dict:
    """{row: value} from a flag that takes one value for every row in `rows`, or row=value pairs.
    `valid(value)` says whether a value is one; `problem` is the line raised when it is not."""
    text = (text or "").strip()
    if valid(text):
        return {name: text for name in rows}
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = (part.strip() for part in item.partition("="))
        if not name or not valid(value):
            raise UserError(problem)
        values[name] = value
    return values


def row_lambdas(cfg: Config) -> dict:
    """{row: lambda} from --guidance: one value for every guided row, or row=value pairs."""
    guided = [name for name in method_names(cfg) if name != "uncond"]
    problem = (f"--guidance {cfg.guidance!r}: give one lambda >= 0, or row=lambda pairs such as "
               f"side=30,cond=0.3")
    return {m: float(v) for m, v in row_values(cfg.guidance, guided, is_lambda, problem).items()}


def guidance_for(cfg: Config, row: Method) -> float:
    """The lambda this row samples with (0 for the unguided row)."""
    if row.classifier is None:
        return 0.0
    lambdas = row_lambdas(cfg)
    if row.name not in lambdas:
        raise UserError(f"--guidance {cfg.guidance!r} gives no lambda for the {row.name} row; "
                        f"add {row.name}=<lambda>")
    return lambdas[row.name]


def validate(cfg: Config, table: dict = METHODS, unset: tuple = ()) -> None:
    """Check every flag before any slow work starts (one clear line per problem); nothing is read
    or written. `unset`: guided rows that need no lambda from --guidance (experiments.py tunes or
    sweeps them). Fixed sets of values (--dataset, ...) are argparse choices, checked before."""
    for ok, message in checks(cfg, table):
        if not ok:
            raise UserError(message)
    guided = [name for name, row in table.items() if row.classifier]
    unknown = sorted(set(row_lambdas(cfg)) - set(guided))
    if unknown:
        raise UserError(f"--guidance {cfg.guidance!r} names {unknown[0]!r}, which is no guided "
                        f"row; give lambdas for {', '.join(guided)}")
    for name in method_names(cfg):
        if name not in unset:
            guidance_for(cfg, table[name])


def checks(cfg: Config, table: dict) -> list[tuple[bool, str]]:
    """(holds, what to do if it does not) for every setting with a range."""
    levels, names = len(channel_list(cfg.channels)), method_names(cfg)
    factor = 2 ** (levels - 1)
    return [
        (cfg.n > 0, f"--n must be positive (got {cfg.n})"),
        (cfg.image_size >= 4 and cfg.image_size % factor == 0,
         f"--image-size {cfg.image_size} does not fit a UNet with {levels} resolutions: it must be "
         f"a multiple of {factor} (each level halves it), e.g. {factor * 4}, {factor * 8} or "
         f"{factor * 16}"),
        (cfg.n_gen > 0, f"--n-gen must be positive (got {cfg.n_gen})"),
        (cfg.train_steps > 0 and cfg.ckpt_every > 0,
         "--train-steps and --ckpt-every must be positive"),
        (2 <= cfg.clusters <= cfg.n_syn,
         f"--clusters must be between 2 and --n-syn={cfg.n_syn} (got {cfg.clusters})"),
        (0 <= cfg.cohesion <= 1, f"--cohesion (tau) must lie in [0, 1] (got {cfg.cohesion})"),
        (parse_sampler(cfg.sampler) is not None, sampler_problem("--sampler", cfg.sampler)),
        (not cfg.extract_sampler or parse_sampler(cfg.extract_sampler) is not None,
         sampler_problem("--extract-sampler", cfg.extract_sampler)
         + " (one sampler per row: experiments.py)"),
        (bool(names) and set(names) <= set(table),
         f"--methods takes {','.join(table)} (got {cfg.methods!r})"
         + ("; the rows cond_x0, shuffled and oracle are experiments.py's" if table is METHODS
            else "")),
    ]


def sampler_problem(flag: str, name: str) -> str:
    return (f"{flag} {name!r}: give ddim<S> or ddpm<S> with S dividing T={T_STEPS}, such as "
            f"ddim50, ddim100 or ddpm1000")


def check_writable(out: Path) -> None:
    """--out can hold the run. The probe file has a name of its own in every process, so processes
    checking one folder at once (torchrun) never remove each other's."""
    try:
        (out / "figures").mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as error:
        raise UserError(f"--out {out} is not writable ({error.strerror}); choose another folder "
                        f"with --out")


def profile_note(cfg: Config) -> str:
    """One line before slow work when a GPU-sized job runs on the CPU profile ('' otherwise)."""
    profile = PROFILES[(cfg.dataset, "cpu")]
    if device_kind(cfg) == "gpu" or cfg.dataset == "digits" or cfg.n <= profile["n"]:
        return ""
    gpu = PROFILES[(cfg.dataset, "gpu")]
    return (f"no GPU here, so the CPU profile runs: {cfg.n} images at {cfg.image_size} px, a "
            f"{cfg.channels}-channel UNet for {cfg.train_steps} steps: about half an hour on 2 "
            f"cores, for a DDPM that at this size memorizes next to nothing (theory.md, Exercise "
            f"8). The GPU profile trains {gpu['image_size']} px, {gpu['channels']} channels, "
            f"{gpu['train_steps']} steps (--device cuda)")


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a bad flag or value reported as one line (exit code 2, see main())."""

    def error(self, message: str):
        raise UserError(f"{message}; see python {self.prog} --help")


def add_config_flags(parser: argparse.ArgumentParser, config: type = Config) -> None:
    """One flag per field of `config` (experiments.py passes its larger Config)."""
    kinds = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        shown = f.metadata["shown"] if f.default is None else f.default
        parser.add_argument(flag, type=kinds[f.type], default=f.default,
                            choices=f.metadata["choices"] or None,
                            help=f"{f.metadata['help']} [{shown}]")


def config_from(args: argparse.Namespace, config: type = Config):
    return config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config)})


def main(argv=None) -> int:
    parser = OneLineParser(
        prog="side.py", description="SIDE: extract training images from an unconditional "
        "diffusion model (arXiv:2410.02467). One seed, the rows uncond, cond and side; "
        "experiments.py tunes lambda and adds seeds and controls. Defaults marked 'profile' "
        "depend on --dataset and the device.")
    add_config_flags(parser)
    try:
        cfg = apply_profile(config_from(parser.parse_args(argv)))
        validate(cfg)
        check_writable(Path(cfg.out))
        note = profile_note(cfg)
        if note:
            print(f"note: {note}")
        print("config: " + json.dumps(dataclasses.asdict(cfg)))
        run_pipeline(cfg)
        return 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages are saved; rerun the same command to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    import side  # as the module `side`: a saved classifier then loads in experiments.py too
    sys.exit(side.main())
