"""experiments.py: what turns one SIDE run into evidence. It imports side.py, never the reverse.

    python experiments.py                     lambda tuned per row on seed 100 (never reported),
                                              then seed 0: uncond, cond, cond_x0, side, shuffled
    python experiments.py --seeds 0,1,2       the same on three reported seeds, one aggregate report
    python experiments.py --sweep guidance=0,1,3,10,30     one setting swept (or clusters, cohesion)
    python experiments.py theorem1            Theorem 1 checked numerically on a toy
    python experiments.py mechanism           why guidance copies: a 1-D toy with exact densities
    python experiments.py download --dataset celeba    torchvision fetches CelebA (or cifar10)
    torchrun --nproc_per_node G experiments.py ...          the same on G processes (DDP, sharding)

Every flag of side.py works here too (`python experiments.py --help`). Sections:

    A. configuration        side.Config plus the protocol's flags
    B. variants, controls   cond_x0 (Cond judging the predicted x_0), shuffled and oracle labels,
                            the TDKD teacher's labels (paper v1-v6)
    C. the protocol         lambda tuned per row on a seed never reported; seeds; the aggregate
    D. sweeps
    E. Theorem 1 on a toy
    E2. the mechanism on a toy  guided copy rate against lambda, the label's mass, shuffled labels
    F. torchrun             DistributedDataParallel training, sharded sampling, rank 0 for the rest
    F2. --compile           torch.compile for the UNet on CUDA
    G. the command line
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import pickle
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import side
from side import UserError, option

# --- A. Configuration: side.py's Config and the protocol's flags ---------------------------------


@dataclasses.dataclass
class ExperimentConfig(side.Config):
    dataset: str = option("digits", "training set D", ("digits", "celeba", "cifar10", "folder"))
    data_root: str = option("data", "where celeba / cifar10 / folder images live")
    download: bool = option(False, "fetch cifar10/celeba via torchvision into --data-root")
    methods: str = option("uncond,cond,cond_x0,side,shuffled",
                          "rows: uncond, cond, cond_x0, side, shuffled, oracle")
    guidance: str = option(None, "lambda of the guided rows: one value for all, or row=value "
                                 "pairs such as side=30 (rows not given are tuned)",
                           shown="tuned on --tune-seed")
    extract_sampler: str = option(None, "Part 2's sampler: one for every row, or row=sampler "
                                        "pairs such as side=ddpm1000 (rows not given: tuned with "
                                        "--sampler-grid, else --sampler's)",
                                  shown="--sampler's, or tuned")
    labels: str = option("kmeans", "kmeans (v7) | teacher (TDKD, v1-v6)", ("kmeans", "teacher"))
    seeds: str = option("", "reported seeds, e.g. 0,1,2: the pipeline per seed, one aggregate "
                        "report", shown="--seed")
    tune_seed: int = option(100, "the seed lambda is tuned on, never reported")
    lambda_grid: str = option("0.3,1,3,10,30", "the lambdas tried on --tune-seed")
    sampler_grid: str = option("", "extraction samplers tried on --tune-seed, each with every "
                               "lambda, e.g. ddim50,ddpm250,ddpm1000 (rows not fixed by "
                               "--extract-sampler are tuned; Part 1 keeps --sampler)",
                               shown="not tuned: --sampler")
    tune_n_gen: int = option(None, "N_G per row and lambda when tuning (profile: 256 on the CPU, "
                             "1,024 on a GPU)")
    sweep: str = option("", "e.g. guidance=0,1,3,10,30 (also clusters, cohesion)")
    embed: str = option("", "feature model F for k-means and AMS/UMS (e.g. SSCD): TorchScript "
                            "or a torch.export .pt2 (default: pixels)")
    split: str = option("train", "cifar10: data_batch_* or test_batch", ("train", "test"))
    classes: str = option("", "cifar10: keep only these class ids, e.g. 3,5")
    balanced: bool = option(False, "cifar10: take n/classes images per class")
    bands: str = option("", "AMS/UMS band edges low,mid,high", shown="0.5,0.65,0.75 in pixels, "
                        "0.4,0.5,0.6 with --embed")
    compile: bool = option(False, "torch.compile the UNet (CUDA only; the CPU runs eagerly)")


TUNE_N_GEN = {"cpu": 256, "gpu": 1024}


# side.py's profiles, and those of the datasets only this file reads (docs/usage.md, "Profiles")
PROFILES = {**side.PROFILES,
            ("cifar10", "cpu"): dict(side.SMALL, n=64, image_size=16, train_steps=3000),
            ("folder", "cpu"): dict(side.SMALL, n=64, image_size=16, train_steps=3000),
            ("cifar10", "gpu"): dict(side.GPU, n=1000, image_size=32, train_steps=40000,
                                     channels="128,256,256"),
            ("folder", "gpu"): dict(side.GPU, n=1000, image_size=64, train_steps=40000)}


def apply_profile(cfg: ExperimentConfig) -> ExperimentConfig:
    """side.py's profile, except what is tuned: rows the user gives no lambda are tuned, not
    profiled. The extraction sampler is the user's, else tuned (--sampler-grid), else Part 1's
    for every row: the protocol chooses each row's sampler as it chooses its lambda, so the
    profile's one sampler for every row (side.py's, ddpm250 on a GPU) is not taken."""
    given, sampler = cfg.guidance, cfg.extract_sampler
    side.apply_profile(cfg, PROFILES)
    cfg.guidance, cfg.extract_sampler = given, "" if sampler is None else sampler
    if cfg.tune_n_gen is None:
        cfg.tune_n_gen = TUNE_N_GEN[side.device_kind(cfg)]
    return cfg


# --- A2. Datasets beyond side.py's digits and CelebA: CIFAR-10 (with its test batch and class
#     subsets), any folder of images, --download, and CelebA's identities (the TDKD teacher's) ---

DATA_FIELDS = ["split", "classes", "balanced"]  # beside side.STAGE_FIELDS["data"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_training_set(cfg: ExperimentConfig) -> dict:
    """side.load_training_set with this file's readers (after --download), and the identities
    (identity_CelebA.txt, when present) as CelebA's labels."""
    if cfg.download:
        download(cfg)
    loaders = {**side.LOADERS, "cifar10": load_cifar10, "folder": load_folder}
    train = side.load_training_set(cfg, loaders)
    if cfg.dataset == "celeba":
        train["labels"] = celeba_identities(cfg, train["indices"])
    return train


def cifar_folder(root: Path) -> Path:
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            return folder
    raise UserError(f"no CIFAR-10 under {root}: expected "
                    f"{root}/cifar-10-batches-py/data_batch_1 ... "
                    f"(the official python version); set --data-root, or add --download")


def read_cifar10(folder: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every image (N x 32 x 32 x 3 uint8) and label of the named official pickles, in order
    (written by Python 2, hence encoding='latin1')."""
    batches = []
    for name in names:
        if (folder / name).is_file():
            with open(folder / name, "rb") as handle:
                batches.append(pickle.load(handle, encoding="latin1"))
    if not batches:
        raise UserError(f"no {names[0]} in {folder}; the official "
                        f"cifar-10-batches-py layout is expected")
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    return images.transpose(0, 2, 3, 1), np.concatenate([b["labels"] for b in batches])


def load_cifar10(cfg: ExperimentConfig):
    """The official pickles with --split, then --classes and --balanced, then --n and --subset."""
    folder = cifar_folder(Path(cfg.data_root))
    names = ["test_batch"] if cfg.split == "test" else [f"data_batch_{i}" for i in range(1, 6)]
    images, labels = read_cifar10(folder, names)
    pool = np.arange(len(images))
    if cfg.classes:
        pool = pool[np.isin(labels, [int(c) for c in cfg.classes.split(",")])]
    if cfg.balanced:
        pool = balanced_pool(pool, labels, cfg.n)
    chosen = pool[side.pick_indices(len(pool), cfg, f"{folder} (after --classes/--balanced)")]
    return side.resize_all(images[chosen], cfg.image_size), chosen, labels[chosen]


def load_folder(cfg: ExperimentConfig):
    """Any folder of images (recursive, sorted by path), centre-cropped to a square."""
    root = Path(cfg.data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root} does not exist; point it at a folder of "
                        f"png/jpg/webp images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"no images (png/jpg/jpeg/webp) under {root}; point --data-root at a "
                        f"folder of images")
    indices = side.pick_indices(len(paths), cfg, str(root))
    images = side.load_image_files([paths[i] for i in indices], centred_square, cfg.image_size)
    return images, indices, None


def centred_square(image) -> tuple:
    """The crop box of the largest centred square of a PIL image."""
    size = min(image.size)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return left, top, left + size, top + size


def download(cfg: ExperimentConfig) -> None:
    """--download: torchvision fetches the dataset into --data-root (needs the network)."""
    import torchvision
    root = Path(cfg.data_root)
    fetch = {"cifar10": lambda: torchvision.datasets.CIFAR10(root, download=True),
             "celeba": lambda: torchvision.datasets.CelebA(root, download=True)}.get(cfg.dataset)
    if fetch is None:
        raise UserError(f"downloading works for cifar10 and celeba, not {cfg.dataset}")
    try:
        fetch()
    except Exception as error:  # torchvision raises URLError, RuntimeError, ... when offline
        where = "cifar-10-batches-py/" if cfg.dataset == "cifar10" else "celeba/img_align_celeba/"
        raise UserError(f"--download of {cfg.dataset} failed ({error.__class__.__name__}: the "
                        f"machine seems offline); put a manual copy at {root / where} and run "
                        f"without --download")


def balanced_pool(pool: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first images of every class, interleaved class by class: ceil(n / classes) of each, or
    as many as the smallest class has."""
    classes = np.unique(labels[pool])
    per_class = -(-n // len(classes))
    columns = [pool[labels[pool] == c][:per_class] for c in classes]
    depth = min(len(c) for c in columns)
    return np.stack([c[:depth] for c in columns], axis=1).reshape(-1)


def celeba_identities(cfg: ExperimentConfig, indices: np.ndarray) -> np.ndarray:
    """Identity labels from identity_CelebA.txt when present (only the TDKD teacher needs them);
    -1 for every image otherwise."""
    folder = side.celeba_folder(Path(cfg.data_root))
    names = [p.name for p in sorted(folder.glob("*.jpg"))]
    names = [names[i] for i in indices]
    for candidate in (folder.parent / "identity_CelebA.txt", folder / "identity_CelebA.txt"):
        if candidate.is_file():
            lines = candidate.read_text().splitlines()
            table = dict(line.split() for line in lines if line.strip())
            if all(name in table for name in names):
                _, dense = np.unique([int(table[name]) for name in names], return_inverse=True)
                return dense
    return np.full(len(indices), -1)


# --- A3. --embed: the paper's SSCD feature space, for the clusters (Algorithm 1 line 2) and for
#     AMS/UMS (Eq. 6-9). A local TorchScript or torch.export file: nothing is downloaded ---------

EMBEDDING_BANDS = (0.40, 0.50, 0.60)  # docs/usage.md, "Metrics"


def load_embedding(path: str, device, flag: str = "--embed"):
    """--embed: an image-embedding model (e.g. SSCD) taking N x 3 x H x W in [0, 1] and returning
    one vector per image. Returns embed(images_u8) -> L2-normalized N x D features."""
    model = read_embedding_model(path, device, flag)

    @torch.no_grad()
    def embed(images_u8):
        x = torch.as_tensor(images_u8, device=device).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        try:
            out = model(x)
        except Exception as error:
            raise UserError(f"{flag} {path} fails on a batch of {tuple(x.shape)} images in [0, 1] "
                            f"({side.why_unreadable(error)}); it must take N x 3 x H x W")
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(x):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(f"{flag} {path} returns {shape} for {len(x)} images; it must return "
                            f"one embedding vector per image (N x D), as SSCD's descriptors")
        return F.normalize(out.float(), dim=1)
    return embed


def read_embedding_model(path: str, device, flag: str):
    """A .pt2 file is a torch.export program; anything else is read as TorchScript (torch.jit is
    deprecated in recent PyTorch but still loads; SSCD is published as .torchscript.pt files)."""
    if not Path(path).is_file():
        raise UserError(f"{flag} {path} is not a file; give a TorchScript model (.pt, e.g. SSCD's "
                        f".torchscript.pt) or a torch.export program (.pt2)")
    exported = Path(path).suffix == ".pt2"
    try:
        with warnings.catch_warnings(), quiet_logging():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            if exported:
                return torch.export.load(path).module().to(device)
            return torch.jit.load(path, map_location=device).eval()
    except Exception as error:
        how = "torch.export.save" if exported else "torch.jit.save (or .pt2: torch.export.save)"
        kind = "torch.export program" if exported else "TorchScript model"
        raise UserError(f"{flag} {path} is not a loadable {kind} ({type(error).__name__}); "
                        f"save it with {how}")


@contextlib.contextmanager
def quiet_logging():
    """torch.export logs a whole traceback as a warning when a file is not its format; the
    UserError raised afterwards says it in one line."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def probe_images(size: int) -> np.ndarray:
    """Two images to try an embedding model on before any slow work."""
    return np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)


def embed_all(embed, images_u8: np.ndarray) -> torch.Tensor:
    """Embed every image once, in blocks; the result on the CPU."""
    return torch.cat([embed(images_u8[s]).cpu() for s in side.block_slices(len(images_u8), 256)])


def embedded_labels(cfg: ExperimentConfig, synthetic: np.ndarray, train: dict, device) -> dict:
    """side.label_synthetic on the --embed model's L2-normalized features instead of the pixels."""
    features = embed_all(load_embedding(cfg.embed, device), synthetic).numpy()
    labels = side.label_synthetic(cfg, synthetic, train, device, features)
    return dict(labels, features=np.array(f"embedding of {Path(cfg.embed).name}"))


def embedding_space(cfg: ExperimentConfig, device) -> tuple:
    """(similarity, bands, name) of AMS/UMS for side.evaluate: the --embed model's cosine."""
    embed = load_embedding(cfg.embed, device)

    def similarity(generated, train, bands):  # embed every image once, compare block by block
        embedded = [embed_all(embed, images) for images in (generated, train)]
        return similarity_scan(*embedded, torch.as_tensor, bands)
    return similarity, band_edges(cfg, EMBEDDING_BANDS), f"cosine of {Path(cfg.embed).name}"


def similarity_space(cfg: ExperimentConfig, device) -> tuple | None:
    """side.evaluate's `space`: --embed's, else side.py's pixel space with --bands' edges."""
    if cfg.embed:
        return embedding_space(cfg, device)
    similarity, default, name = side.PIXEL_SPACE
    return (similarity, band_edges(cfg, default), name) if cfg.bands else None


def band_edges(cfg: ExperimentConfig, default: tuple) -> tuple:
    """--bands as (low, mid, high), else the space's `default`."""
    return tuple(float(b) for b in cfg.bands.split(",")) if cfg.bands else default


def valid_bands(text: str) -> bool:
    try:
        low, mid, high = (float(b) for b in text.split(","))
    except ValueError:
        return False
    return 0 <= low < mid <= high <= 1


def similarity_scan(generated, train, featurize, bands, block: int = 1024):
    """Per generation the best similarity and its index; per band the training images hit (Eq. 9).

    Bands are disjoint: low [b0, b1), mid [b1, b2], high (b2, 1]. phi (Eq. 9) collects every
    training image whose similarity to a generation falls in the band, not only the nearest."""
    best = torch.full((len(generated),), -float("inf"))
    best_index = torch.zeros(len(generated), dtype=torch.long)
    hit = {name: torch.zeros(len(train), dtype=torch.bool) for name in ("low", "mid", "high")}
    for qs, ks, q, x in side.pairwise_blocks(generated, train, featurize, block):
        sim = (q @ x.T).cpu()
        value, arg = sim.max(1)
        better = value > best[qs]
        best[qs] = torch.where(better, value, best[qs])
        best_index[qs] = torch.where(better, arg + ks.start, best_index[qs])
        for name, in_band in side.band_masks(sim, bands).items():
            hit[name][ks] |= in_band.any(0)
    return best.numpy(), best_index.numpy(), {k: v.numpy() for k, v in hit.items()}


# --- B. Variants and controls. Each replaces one step of side.run(): through a row's `relabel`
#     (what its classifier learns) or `judge` (what guides), or run()'s `surrogate` (the labels) ---

STREAM_SHUFFLE = 3  # the permutation of the `shuffled` control has its own random stream


def shuffled_labels(cfg, labels: dict, synthetic=None, train=None) -> dict:
    """The `shuffled` control: the surrogate labels permuted at random among the synthetic samples.

    Every cluster keeps its size, but a label no longer says anything about the image it sits on,
    so a classifier cannot learn it from x: its gradient carries no direction toward any cluster.
    If this control gains as much as SIDE, the clusters are not what helps."""
    order = np.random.default_rng([cfg.seed, STREAM_SHUFFLE]).permutation(len(labels["labels"]))
    return dict(labels, labels=labels["labels"][order], soft=labels["soft"][order])


def oracle_labels(cfg, labels: dict, synthetic: np.ndarray, train: dict) -> dict:
    """The `oracle` control: each synthetic sample labelled with its nearest training image (pixel
    L2). Only the model's owner could make these labels, so this is no attack: it bounds what
    better surrogate labels could do. Classes are the training images nearest to some sample."""
    _, index = side.nearest_neighbours(synthetic, train["images"], 1)
    kept, labels = np.unique(index[:, 0], return_inverse=True)
    return dict(labels=labels, soft=np.eye(len(kept), dtype=np.float32)[labels], kept=kept,
                sizes=np.bincount(labels, minlength=len(kept)))


def teacher_labels(cfg, synthetic: np.ndarray, train: dict, device) -> dict:
    """TDKD (paper v1-v6), in place of side.label_synthetic: a time-independent teacher trained on
    the real labels labels the generations with its soft predictions."""
    train_labels = train["labels"]
    if (train_labels < 0).any():
        raise UserError(f"--labels teacher needs real labels; {cfg.dataset} has none here "
                        f"(celeba needs identity_CelebA.txt beside img_align_celeba)")
    classes = int(train_labels.max()) + 1
    teacher = side.train_classifier(cfg, train["images"], np.eye(classes, dtype=np.float32)[
        train_labels], False, device, "train teacher")
    with torch.no_grad():
        soft = torch.cat([F.softmax(teacher(x, None), 1).cpu() for x in
                          side.to_unit_range(synthetic).to(device).split(512)]).numpy()
    labels = soft.argmax(1)
    return dict(labels=labels, soft=soft, kept=np.arange(classes), teacher=np.array("TDKD"),
                sizes=np.bincount(labels, minlength=classes),
                cohesion=np.zeros(0))  # cohesion is a k-means notion


class SeesPredictedX0(nn.Module):
    """The cond_x0 row: the time-independent classifier judges the model's estimate of x_0,
    x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t), instead of the noisy x_t.
    The gradient then flows back through eps_theta too (about 3x the cost of a step). x0_hat is
    not clamped: clamping would zero the gradient wherever the estimate saturates (often at
    large t)."""

    def __init__(self, classifier: nn.Module, model: nn.Module):
        super().__init__()
        self.classifier, self.model = classifier, model

    def forward(self, x, t):
        x0_hat = side.DIFFUSION.predicted_x0(x, self.model(x, t).float(), t.cpu())
        return self.classifier(x0_hat, t)


Method = side.Method
METHODS = {"uncond": side.METHODS["uncond"], "cond": side.METHODS["cond"],
           "cond_x0": Method("cond_x0", classifier="cond", time_dependent=False,
                             judge=SeesPredictedX0),
           "side": side.METHODS["side"],
           "shuffled": Method("shuffled", classifier="shuffled", relabel=shuffled_labels),
           "oracle": Method("oracle", classifier="oracle", relabel=oracle_labels)}


UNCOND_AT = "uncond_"  # uncond_ddpm1000: the unguided row at that sampler (--methods may name it)


def method_table(cfg) -> dict:
    """METHODS, plus an unguided row for every uncond_<sampler> in --methods: the protocol samples
    uncond at every sampler a row uses, so each ratio can be taken at the same sampler."""
    extra = [m for m in side.method_names(cfg)
             if m.startswith(UNCOND_AT) and side.parse_sampler(m[len(UNCOND_AT):])]
    return {**METHODS, **{m: Method(m, classifier=None) for m in extra}}


class ExperimentFolder(side.RunFolder):
    """side.py's run folder. With --labels teacher every stage from the labels on depends on that
    flag too (and the labels on the classifier settings, which train the teacher); with k-means
    labels the stages are side.py's own, so both entry points share one run folder."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device):
        super().__init__(cfg, device)
        if self.checkpoint:  # the data options side.py's own check does not know
            side.check_compatible(self.checkpoint["config"], cfg, self.out / "ddpm.pt", DATA_FIELDS)

    def groups(self, name: str) -> list[str]:
        teacher = name == "labels" and self.cfg.labels == "teacher"
        return super().groups(name) + (["classifier"] if teacher else [])

    def settings(self, name: str, **values) -> dict:
        if self.cfg.labels == "teacher" and "labels" in self.groups(name):
            values = dict(values, labels="teacher")
        if self.cfg.embed and "labels" in self.groups(name):
            values = dict(values, embed=self.cfg.embed)
        options = {f: getattr(self.cfg, f) for f in DATA_FIELDS}
        if options != {f: ExperimentConfig.__dataclass_fields__[f].default for f in DATA_FIELDS}:
            values = dict(values, **options)  # at their defaults: side.py's own settings
        return super().settings(name, **values)


def run_pipeline(cfg: ExperimentConfig) -> dict:
    """side.run_pipeline with this module's rows, labels, dataset options, --embed and (under
    torchrun) run folder; then the histograms of d1/d2 and of the similarity."""
    device = side.resolve_device(cfg.device)
    folder = (DistributedFolder if dist.is_initialized() else ExperimentFolder)(cfg, device)
    surrogate = side.label_synthetic
    if cfg.labels == "teacher":
        surrogate = teacher_labels
    elif cfg.embed:
        surrogate = embedded_labels
    space = similarity_space(cfg, device)
    if dist.is_initialized():  # DDP training first: side.run() then finds ddpm.pt trained
        train = folder("data", lambda: load_training_set(cfg))
        train_ddpm_distributed(cfg, side.to_unit_range(train["images"]).to(device),
                               folder.out / "ddpm.pt")
    report = side.run_pipeline(cfg, folder, space, rows=method_rows(cfg),
                               surrogate=surrogate, load=load_training_set)
    if is_main():
        save_histograms(Path(cfg.out), report)
    return report


def save_histograms(out: Path, report: dict) -> None:
    """figures/histograms.png: per row the d1/d2 (Gu's 1/3 marked) and the similarity gamma of every
    generation, from its nn_<row>.npz."""
    fig, (ax1, ax2) = side.pyplot().subplots(1, 2, figsize=(10, 3.5))
    for method in report["methods"]:
        per = np.load(out / f"nn_{method}.npz")
        ax1.hist(per["nn_ratio"], bins=40, range=(0, 1), alpha=0.5, label=method)
        ax2.hist(per["best_sim"], bins=40, alpha=0.5, label=method)
    ax1.axvline(side.GU_THRESHOLD, color="k", ls="--", label="1/3")
    ax1.set(xlabel="d1 / d2 (nearest / second nearest)", ylabel="generations")
    ax2.set(xlabel=f"best similarity ({report['similarity']['space']})")
    ax1.legend(), ax2.legend()
    side.save_figure(fig, out / "figures" / "histograms.png", dpi=120)


# --- C. The protocol: each row's lambda and extraction sampler chosen on a seed never reported,
#     then several reported seeds and one aggregate report (docs/usage.md, "The protocol"). Part 1
#     keeps --sampler: its samples only have to be clustered, and one Part 1 for every candidate
#     keeps the rows paired (same labels, classifiers and seeds). Selection and report never share
#     a seed.

TIE_RULE = ("highest Gu memorized fraction; ties: more distinct images copied, then the sampler "
            "with fewer steps, then smaller lambda")


def parse_seeds(text: str, flag: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise UserError(f"{flag} takes non-negative integers such as 0,1,2 (got {text!r})")
    seeds = [int(p) for p in parts]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"{flag} repeats seed {repeated[0]} ({text!r}); give each seed once")
    return seeds


def reported_seeds(cfg: ExperimentConfig) -> list[int]:
    return parse_seeds(cfg.seeds, "--seeds") if cfg.seeds.strip() else [cfg.seed]


def lambda_grid(cfg: ExperimentConfig) -> list[float]:
    values = [v.strip() for v in cfg.lambda_grid.split(",") if v.strip()]
    if not values or not all(side.is_lambda(v) for v in values):
        raise UserError(f"--lambda-grid {cfg.lambda_grid!r}: give lambda values >= 0 to tune over, "
                        f"e.g. --lambda-grid 0.3,1,3,10,30 (or fix lambda with --guidance)")
    return [float(v) for v in values]


def sampler_grid(cfg: ExperimentConfig) -> list[str]:
    """--sampler-grid's names; without one, Part 1's sampler alone (the sampler is not tuned)."""
    names = [v.strip() for v in cfg.sampler_grid.split(",") if v.strip()]
    if not all(side.parse_sampler(n) for n in names) or len(set(names)) < len(names):
        raise UserError(f"--sampler-grid {cfg.sampler_grid!r}: give distinct ddim<S> or ddpm<S> "
                        f"with S dividing {side.T_STEPS}, e.g. ddim50,ddpm250,ddpm1000")
    return names or [cfg.sampler]


def fixed_guidance(cfg: ExperimentConfig) -> dict:
    """{row: lambda} given on the command line (--guidance) for the guided rows of --methods."""
    guided = [m for m in side.method_names(cfg) if m != "uncond"]
    return {m: v for m, v in side.row_lambdas(cfg).items() if m in guided}


def lambda_is_free(cfg: ExperimentConfig, row: str) -> bool:
    """A guided row whose lambda neither --guidance nor a guidance sweep gives."""
    guided = row in method_table(cfg) and method_table(cfg)[row].classifier is not None
    return (guided and row not in fixed_guidance(cfg)
            and not cfg.sweep.startswith("guidance="))


def row_samplers(cfg: ExperimentConfig) -> dict:
    """{row: sampler name} from --extract-sampler: one for every row, or row=sampler pairs."""
    problem = (side.sampler_problem("--extract-sampler", cfg.extract_sampler) +
               ", or row=sampler pairs such as side=ddpm1000,uncond=ddpm1000")
    return side.row_values(cfg.extract_sampler, side.method_names(cfg), side.parse_sampler,
                           problem)


def method_rows(cfg: ExperimentConfig) -> list:
    """side.method_rows over this file's rows, each at its own extraction sampler."""
    return [dataclasses.replace(row, sampler=fixed_sampler(cfg, row.name))
            for row in side.method_rows(cfg, method_table(cfg))]


def sampler_is_free(cfg: ExperimentConfig, row: str) -> bool:
    """A row whose sampler is tuned: --sampler-grid given, --extract-sampler silent on it."""
    return (bool(cfg.sampler_grid.strip()) and row not in row_samplers(cfg)
            and not cfg.sweep.startswith("extract_sampler=") and not row.startswith(UNCOND_AT))


def fixed_sampler(cfg: ExperimentConfig, row: str) -> str:
    """A row's sampler when it is not tuned: --extract-sampler's, the one an uncond_<sampler>
    row names, else Part 1's."""
    named = row[len(UNCOND_AT):] if row.startswith(UNCOND_AT) else cfg.sampler
    return row_samplers(cfg).get(row, named)


def methods_to_tune(cfg: ExperimentConfig) -> list[str]:
    """Rows with a setting left to the tune seed: a lambda, a sampler, or both."""
    return [m for m in side.method_names(cfg) if lambda_is_free(cfg, m) or sampler_is_free(cfg, m)]


def candidates(cfg: ExperimentConfig, row: str) -> list[tuple[str, float]]:
    """The (sampler, lambda) pairs a row is chosen from: what the command line fixes, else the
    grids. uncond has lambda 0."""
    samplers = sampler_grid(cfg) if sampler_is_free(cfg, row) else [fixed_sampler(cfg, row)]
    lambdas = ([0.0] if method_table(cfg)[row].classifier is None else lambda_grid(cfg)
               if lambda_is_free(cfg, row) else [fixed_guidance(cfg)[row]])
    return [(sampler, value) for sampler in samplers for value in lambdas]


def validate(cfg: ExperimentConfig) -> None:
    """side.py's checks of the values, the protocol's, then side.py's of the files (which creates
    --out), all before any slow work."""
    guided = [m for m in side.method_names(cfg) if m != "uncond"]
    swept = cfg.sweep.startswith("guidance=")  # the sweep gives every guided row its lambda
    table = method_table(cfg)
    one_sampler = dataclasses.replace(cfg, extract_sampler="")  # row pairs: checked below
    side.validate(one_sampler, table, unset=tuple(guided if swept else methods_to_tune(cfg)))
    unknown = sorted(set(row_samplers(cfg)) - set(table))
    if unknown:
        raise UserError(f"--extract-sampler {cfg.extract_sampler!r} names {unknown[0]!r}, which is "
                        f"no row; give samplers for {', '.join(table)}")
    if cfg.sweep:
        parse_sweep(cfg.sweep)
    if cfg.classes and not all(c.strip().isdigit() for c in cfg.classes.split(",")):
        raise UserError(f"--classes takes class ids such as 3,5 (got {cfg.classes!r})")
    if cfg.dataset == "digits" and cfg.labels == "teacher" and cfg.n < 10:
        raise UserError("--labels teacher needs every digit class in the training set; "
                        "use --n 10 or more")
    seeds = reported_seeds(cfg)
    lambda_grid(cfg)
    sampler_grid(cfg)
    parse_seeds(str(cfg.tune_seed), "--tune-seed")
    if cfg.tune_n_gen <= 0:
        raise UserError(f"--tune-n-gen must be positive (got {cfg.tune_n_gen})")
    if len(seeds) > 1 and cfg.sweep:
        raise UserError(f"--sweep runs on one seed but --seeds {cfg.seeds} gives {len(seeds)}: "
                        f"drop --sweep, or give one seed (--seeds {seeds[0]})")
    if methods_to_tune(cfg) and cfg.tune_seed in seeds:
        raise UserError(f"--tune-seed {cfg.tune_seed} is also a reported seed; choose one outside "
                        f"them (e.g. --tune-seed {max(seeds) + 100}) or fix lambda with --guidance")
    check_process_count(cfg)
    if cfg.bands and not valid_bands(cfg.bands):
        raise UserError(f"--bands {cfg.bands!r}: give three increasing numbers in [0, 1], e.g. "
                        f"0.5,0.65,0.75")
    problem = compile_problem(side.resolve_device(cfg.device)) if cfg.compile else ""
    if problem:
        raise UserError(f"--compile: {problem}; drop --compile to run eagerly")
    if cfg.embed:  # the embedding model runs on two images now, not after an hour of training
        load_embedding(cfg.embed, "cpu")(probe_images(cfg.image_size))
    side.check_writable(Path(cfg.out))


def tuning_runs(cfg: ExperimentConfig, rows: list[str]) -> list[tuple[str, str]]:
    """(--guidance, --extract-sampler) of every tuning run: each sampler of the grid with each
    lambda, for the rows that leave them free; what the command line fixes stays fixed."""
    samplers = sampler_grid(cfg) if any(sampler_is_free(cfg, m) for m in rows) else [""]
    values = lambda_grid(cfg) if any(lambda_is_free(cfg, m) for m in rows) else [0.0]
    runs = []
    for sampler in samplers:
        for value in values:
            lambdas = {m: value if lambda_is_free(cfg, m) else candidates(cfg, m)[0][1]
                       for m in rows if method_table(cfg)[m].classifier is not None}
            chosen = {m: sampler if sampler_is_free(cfg, m) else fixed_sampler(cfg, m)
                      for m in rows}
            runs.append((",".join(f"{m}={v!r}" for m, v in lambdas.items()),
                         ",".join(f"{m}={s}" for m, s in chosen.items())))
    return runs


def settings_hash(settings: dict) -> str:
    """A short, order-independent hash of a dict of settings: the tuning file's name."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def tune_settings(cfg: ExperimentConfig, methods: list[str]) -> dict:
    """Each method's (sampler, lambda) from its candidates() by its own Gu memorized fraction on
    --tune-seed (TIE_RULE), with N_G = --tune-n-gen. Every tuning run is cached, keyed by the
    settings. Also returns the cost of each sampler per row."""
    rows = list(dict.fromkeys(["uncond", *methods]))
    tune_cfg = dataclasses.replace(cfg, seed=cfg.tune_seed, seeds="", sweep="", guidance=None,
                                   extract_sampler="", n_gen=cfg.tune_n_gen,
                                   methods=",".join(rows),
                                   out=str(Path(cfg.out) / f"tune-seed{cfg.tune_seed}"))
    settings = {k: v for k, v in dataclasses.asdict(tune_cfg).items() if k not in (
        "out", "fresh", "guidance", "lambda_grid", "extract_sampler", "sampler_grid")}
    path = Path(tune_cfg.out) / f"tuning-{settings_hash(settings)}.json"
    side.check_writable(path.parent)
    points = json.loads(path.read_text())["points"] if path.is_file() and not cfg.fresh else {}
    grid = tuning_runs(cfg, rows)
    for guidance, samplers in grid:
        name = f"{samplers} {guidance}"
        if name in points:
            print(f"  {name} on seed {cfg.tune_seed}: in {path.name}, skipping")
            continue
        print(f"\n=== tuning on seed {cfg.tune_seed}: {name} ===")
        first = cfg.fresh and not points  # --fresh retrains the tune seed's stages once
        report = run_pipeline(dataclasses.replace(tune_cfg, guidance=guidance or None,
                                                  extract_sampler=samplers, fresh=first))
        points[name] = dict(methods=report["methods"], timings_s=report["timings_s"],
                            sampling_s=report["sampling_s"], samplers=report["samplers"],
                            guidance=report["guidance"])
        side.save_text(path, json.dumps(dict(settings=settings, points=points), indent=2))
    curve = {m: {} for m in rows}
    for point in points.values():
        for m in rows:
            key = f"{point['samplers'][m]} {point['guidance'].get(m, 0.0):g}"
            curve[m][key] = dict(point["methods"][m], seconds=point["sampling_s"][m])
    for m in rows:  # only this run's candidates (the file may hold others, from other grids)
        curve[m] = {f"{s} {v:g}": curve[m][f"{s} {v:g}"] for s, v in candidates(cfg, m)}
    return dict(seed=cfg.tune_seed, n_gen=cfg.tune_n_gen, samplers=sampler_grid(cfg),
                lambdas=lambda_grid(cfg), rule=TIE_RULE, folder=tune_cfg.out, curve=curve,
                best={m: best_setting(curve[m]) for m in methods},
                seconds=round(sum(points[f"{s} {g}"]["timings_s"]["total"]
                                  for g, s in grid), 1))


def best_setting(curve: dict) -> dict:
    """TIE_RULE over {"sampler lambda": summary}: most Gu copies, then most distinct images, then
    the sampler with fewer steps, then the smaller lambda."""
    def score(key):
        sampler, value = key.split()
        row = curve[key]
        return (row["memorized_fraction"], row["unique_memorized"],
                -side.parse_sampler(sampler)[1], -float(value))
    sampler, value = max(curve, key=score).split()
    return dict(sampler=sampler, guidance=float(value))


def choose_settings(cfg: ExperimentConfig) -> dict:
    """Every row's lambda (guided rows) and sampler, and how each was chosen."""
    to_tune = methods_to_tune(cfg)
    tuning = tune_settings(cfg, to_tune) if to_tune else None
    best = tuning["best"] if tuning else {}
    names = side.method_names(cfg)
    guided = [m for m in names if method_table(cfg)[m].classifier is not None]
    lambdas = {m: best[m]["guidance"] if m in best else candidates(cfg, m)[0][1] for m in guided}
    samplers = {m: best[m]["sampler"] if m in best else candidates(cfg, m)[0][0] for m in names}
    how = {m: f"tuned on seed {cfg.tune_seed}" if m in to_tune else "fixed, not tuned"
           for m in names}
    return dict(lambdas=lambdas, samplers=samplers, how=how, tuning=tuning)


def reported_rows(cfg: ExperimentConfig, choice: dict) -> list[str]:
    """--methods, plus uncond at every other sampler of the grid and of the rows, so that every
    seed has uncond at side's sampler and at its own strongest."""
    names = side.method_names(cfg)
    if "uncond" not in names:
        return names
    grid = sampler_grid(cfg) if cfg.sampler_grid.strip() else []
    others = dict.fromkeys([*grid, *choice["samplers"].values()])
    extra = [UNCOND_AT + s for s in others if s != choice["samplers"]["uncond"]]
    return names + [m for m in extra if m not in names]


def run_protocol(cfg: ExperimentConfig) -> dict:
    """Choose every row's lambda and sampler, run the whole pipeline (a fresh DDPM) per reported
    seed, then write the aggregate. One seed runs in --out itself, several in --out/seed<S>."""
    seeds, out = reported_seeds(cfg), Path(cfg.out)
    folders = {s: out if len(seeds) == 1 else out / f"seed{s}" for s in seeds}
    for seed, folder in folders.items():  # a folder of another run stops us before any slow work
        side.check_writable(folder)
        side.read_checkpoint(folder / "ddpm.pt", dataclasses.replace(cfg, seed=seed))
    choice = choose_settings(cfg)
    rows = reported_rows(cfg, choice)
    pinned = ",".join(f"{m}={v!r}" for m, v in choice["lambdas"].items())
    samplers = ",".join(f"{m}={choice['samplers'].get(m) or fixed_sampler(cfg, m)}" for m in rows)
    reports = {}
    for seed, folder in folders.items():
        if len(seeds) > 1:
            print(f"\n=== seed {seed} ({len(reports) + 1} of {len(seeds)}) ===")
        reports[seed] = run_pipeline(dataclasses.replace(
            cfg, seed=seed, seeds="", out=str(folder), guidance=pinned or None,
            methods=",".join(rows), extract_sampler=samplers))
    return write_aggregate(cfg, folders, reports, choice)


def spread(values) -> dict:
    return dict(mean=float(np.mean(values)), min=float(np.min(values)), max=float(np.max(values)))


def ever_extracted(folders: dict, method: str) -> dict:
    """Training images (dataset indices) that `method` copied (Gu) on any seed, out of all the
    training images of those seeds (the same n images unless --subset random)."""
    copied, pool = set(), set()
    for folder in folders.values():
        indices = np.load(Path(folder) / "train_subset.npz")["indices"]
        nn = np.load(Path(folder) / f"nn_{method}.npz")
        copied |= set(indices[nn["nn_index"][nn["nn_ratio"] < side.GU_THRESHOLD]].tolist())
        pool |= set(indices.tolist())
    return dict(count=len(copied), of=len(pool), fraction=len(copied) / len(pool))


BOOTSTRAP_DRAWS = 2000


def memorized_flags(folder, row: str) -> tuple[np.ndarray, np.ndarray]:
    """Per generation of `row` in a run folder: Gu-memorized or not, and its (seed, stream, i)."""
    flags = np.load(Path(folder) / f"nn_{row}.npz")["nn_ratio"] < side.GU_THRESHOLD
    return flags, np.load(Path(folder) / f"samples_{row}.npz")["seeds"]


def paired_ratio(flags: np.ndarray, seeds: np.ndarray, base_flags: np.ndarray,
                 base_seeds: np.ndarray, draws: int = BOOTSTRAP_DRAWS) -> dict:
    """Memorized generations of one row over another's, with a 95 % bootstrap interval. Rows are
    paired: generation i of every row starts from the same noise (seed, stream, i), so the
    bootstrap resamples generations with the same indices for both rows. None: 0 in the divisor."""
    if not np.array_equal(seeds, base_seeds):
        raise ValueError("a paired ratio needs two rows drawn from the same (seed, stream, i)")
    pick = np.random.default_rng(0).integers(len(flags), size=(draws, len(flags)))
    top, bottom = flags[pick].sum(1), base_flags[pick].sum(1)
    ratios = np.sort(np.where(bottom > 0, top / np.maximum(bottom, 1), np.inf))
    low, high = ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]
    finite = [None if not np.isfinite(v) else float(v) for v in (low, high)]
    ratio = float(flags.sum() / base_flags.sum()) if base_flags.sum() else None
    return dict(ratio=ratio, low=finite[0], high=finite[1], copies=[int(flags.sum()),
                                                                    int(base_flags.sum())])


def uncond_rows(report: dict) -> list[str]:
    return [m for m in report["methods"] if m == "uncond" or m.startswith(UNCOND_AT)]


def comparisons(report: dict, best_cond) -> dict:
    """{what side is compared with: that row} on one seed: uncond at side's own sampler, the
    uncond row (any sampler) that copied most on this seed, and the better cond."""
    samplers, memorized = report["samplers"], report["methods"]
    unconds = uncond_rows(report)
    same = [m for m in unconds if samplers[m] == samplers["side"]]
    strongest = max(unconds, key=lambda m: memorized[m]["memorized_fraction"], default=None)
    pairs = {"uncond, same sampler": same[0] if same else None, "strongest uncond": strongest,
             "best cond": best_cond if best_cond in memorized else None}
    return {what: row for what, row in pairs.items() if row}


def side_ratios(folders: dict, reports: dict, best_cond) -> dict:
    """Per seed and comparison: side's memorized generations over the other row's, paired."""
    ratios = {}
    for seed, report in reports.items():
        if "side" not in report["methods"]:
            continue
        side_flags = memorized_flags(folders[seed], "side")
        ratios[str(seed)] = {
            f"side / {what}": dict(paired_ratio(*side_flags, *memorized_flags(folders[seed], row)),
                                   row=row)
            for what, row in comparisons(report, best_cond).items()}
    return ratios


def ratio_summary(ratios: dict) -> dict:
    """Over seeds, per comparison: mean [min, max] of the ratios, the seeds on which side copied
    more (the sign holds), and those whose paired interval lies above 1."""
    names = dict.fromkeys(name for per_seed in ratios.values() for name in per_seed)
    summary = {}
    for name in names:
        cells = [per_seed[name] for per_seed in ratios.values() if name in per_seed]
        finite = [c["ratio"] for c in cells if c["ratio"] is not None]
        summary[name] = dict(spread(finite) if finite else {}, seeds=len(cells),
                             sign_holds=sum(c["copies"][0] > c["copies"][1] for c in cells),
                             above_one=sum((c["low"] or 0) > 1 or c["low"] is None and
                                           c["copies"][0] > 0 for c in cells))
    return summary


def aggregate(folders: dict, reports: dict) -> dict:
    """Per method: mean, min and max over seeds of every summary number, and the training images
    ever extracted; per seed: side over uncond (at side's sampler, and the strongest) and over the
    better cond (by mean), each paired, with its interval."""
    first = next(iter(reports.values()))["methods"]
    summary = {m: {k: spread([r["methods"][m][k] for r in reports.values()]) for k in first[m]}
               for m in first}
    conds = [m for m in ("cond", "cond_x0") if m in summary]
    best_cond = max(conds, key=lambda m: summary[m]["memorized_fraction"]["mean"], default=None)
    ratios = side_ratios(folders, reports, best_cond)
    return dict(seeds=list(reports), methods=summary, best_cond=best_cond, ratios=ratios,
                ratio_summary=ratio_summary(ratios),
                ever_extracted={m: ever_extracted(folders, m) for m in summary},
                verdicts=verdicts({m: s["memorized_fraction"] for m, s in summary.items()},
                                  len(reports)) + paired_verdicts(ratio_summary(ratios)))


def paired_verdicts(summary: dict) -> list[str]:
    """The paired view in words: per comparison, the ratio's spread and on how many seeds the
    sign holds (side copied more) and the paired interval lies above 1."""
    return [f"{name}: {spread_cell(s) + 'x' if 'mean' in s else 'n/a'} over seeds (mean [min, "
            f"max]); side copied more on {s['sign_holds']} of {s['seeds']} seeds, and the paired "
            f"95 % interval lies above 1 on {s['above_one']} of {s['seeds']}."
            for name, s in summary.items()]


def verdicts(fraction: dict, seeds: int) -> list[str]:
    """side vs uncond and the shuffled control, in words. `fraction`: {method: spread over seeds};
    a difference exceeds the seed spread when the two min-max ranges do not overlap."""
    def pct(m):
        return f"{100 * fraction[m]['mean']:.2f} %"

    def apart(a, b):
        return fraction[a]["min"] > fraction[b]["max"] or fraction[b]["min"] > fraction[a]["max"]
    lines, mean = [], {m: s["mean"] for m, s in fraction.items()}
    one_seed = "on one seed only, no spread to compare with (try --seeds 0,1,2)"
    beyond = "beyond the seed spread (the min-max ranges do not overlap)"
    within = one_seed if seeds == 1 else "within the seed spread (the min-max ranges overlap)"
    if {"side", "uncond"} <= set(fraction):
        exceeds = seeds > 1 and apart("side", "uncond")
        lines.append(f"side vs uncond: {pct('side')} vs {pct('uncond')} Gu memorized (mean); the "
                     f"difference is {beyond if exceeds else within}.")
    if {"side", "shuffled", "uncond"} <= set(fraction):
        versus = f"({pct('shuffled')} vs side's {pct('side')}, uncond {pct('uncond')})"
        if mean["side"] <= mean["uncond"]:
            lines.append(f"SIDE gained nothing over uncond, so the shuffled control {versus} "
                         "has no gain to explain.")
        elif mean["shuffled"] >= mean["side"]:
            lines.append(f"The shuffled control gained as much as SIDE {versus}: the clusters are "
                         "not what helps.")
        elif seeds > 1 and apart("side", "shuffled"):
            lines.append(f"The shuffled control gained less than SIDE {versus}, {beyond}: "
                         "the cluster structure is what helps.")
        else:
            lines.append(f"The shuffled control gained less than SIDE {versus}, but {within}: "
                         "this does not show that the clusters help.")
    return lines


def spread_cell(stats: dict, scale: float = 1) -> str:
    mean, low, high = (stats[k] * scale for k in ("mean", "min", "max"))
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def settings_markdown(choice: dict) -> list[str]:
    """Which sampler and lambda each row used and how they were chosen; the tune seed's results
    behind the choice, with what each sampler cost."""
    rows = [[m, choice["samplers"][m], f"{choice['lambdas'].get(m, 0):g}", choice["how"][m]]
            for m in choice["samplers"]]
    lines = side.table_lines(["method", "sampler", "lambda", "chosen"], rows)
    tuning = choice["tuning"]
    if not tuning:
        return lines
    values = tuning["lambdas"]
    table = []
    for m, by_setting in tuning["curve"].items():
        for sampler in dict.fromkeys(key.split()[0] for key in by_setting):
            cells = {key.split()[1]: row for key, row in by_setting.items()
                     if key.split()[0] == sampler}
            cost = np.median([row["seconds"] for row in cells.values()]) * 512 / tuning["n_gen"]
            table.append([m, sampler, f"{cost:.0f}", *(
                f"{100 * cells[f'{v:g}']['memorized_fraction']:.2f}" if f"{v:g}" in cells else ""
                for v in [0.0, *values])])
    return lines + [
        "", f"Chosen on seed {tuning['seed']}, which is never reported, with N_G = "
        f"{tuning['n_gen']} per row and setting (--tune-n-gen; reported seeds use --n-gen). "
        f"Rule: {tuning['rule']}. Gu memorized % on the tune seed by sampler and lambda, and "
        f"the sampler's cost in seconds per 512 generations ({tuning['seconds']:.0f} s of "
        f"pipeline runs, {tuning['folder']}):", "",
        *side.table_lines(["method", "sampler", "s / 512", *(f"lambda {v:g}" for v in
                                                              [0.0, *values])], table)]


def ratio_cell(cell: dict) -> str:
    if cell["ratio"] is None:
        return "n/a (divisor has 0 copies)"
    high = "inf" if cell["high"] is None else f"{cell['high']:.2f}"
    return f"{cell['ratio']:.2f}x [{cell['low']:.2f}, {high}] ({cell['row']})"


def protocol_markdown(agg: dict, choice: dict) -> str:
    distinct = [[m, spread_cell(agg["methods"][m]["unique_memorized"]),
                 f"{ever['count']} of {ever['of']}", f"{100 * ever['fraction']:.2f} %"]
                for m, ever in agg["ever_extracted"].items()]
    lines = ["## Protocol", "", *settings_markdown(choice), "",
             f"Distinct training images copied (Gu), per seed and ever over seeds {agg['seeds']}:",
             "", *side.table_lines(["method", "Gu unique, mean [min, max]", "ever extracted",
                                    "of the training set"], distinct)]
    names = list(agg["ratio_summary"])
    if names:
        ratios = [[seed, *(ratio_cell(r[name]) if name in r else "" for name in names)]
                  for seed, r in agg["ratios"].items()]
        lines += ["", "Paired ratios of Gu-memorized generations per seed, with a 95 % bootstrap "
                  "interval over generations (the same resampled indices for both rows, which "
                  "start from the same noise). The compared row is in brackets; strongest "
                  "uncond: the uncond row, at any sampler, with the most copies on that seed"
                  + (f"; best cond: {agg['best_cond']}, the higher mean of cond and cond_x0"
                     if agg["best_cond"] else "") + ".", "",
                  *side.table_lines(["seed", *names], ratios)]
    return "\n".join(lines + ["", *[f"- {v}" for v in agg["verdicts"]]]) + "\n"


def write_aggregate(cfg: ExperimentConfig, folders: dict, reports: dict, choice: dict) -> dict:
    """One seed: its report gains the protocol section. Several: report.md / report.json at the
    top of --out hold mean [min, max] over seeds, the ratios and the verdicts."""
    agg, out = aggregate(folders, reports), Path(cfg.out)
    if len(reports) == 1:
        report = dict(next(iter(reports.values())), protocol=dict(agg, settings=choice))
        text = (out / "report.md").read_text() + "\n" + protocol_markdown(agg, choice)
    else:
        report = dict(config=dataclasses.asdict(cfg), **agg, settings=choice)
        links = ", ".join(f"[seed {s}]({Path(f).name}/report.md)" for s, f in folders.items())
        text = "\n".join([
            f"# SIDE over seeds {', '.join(map(str, reports))}: {cfg.dataset}, n = {cfg.n}, "
            f"{cfg.image_size} px", "", f"N_G = {cfg.n_gen} per method and seed; every seed trains "
            "its own DDPM. Mean [min, max] over seeds:", "", *side.table_lines(
                ["method", *(title for _, title, _ in side.TABLE_COLUMNS)],
                [[m, *(spread_cell(c[key], scale) for key, _, scale in side.TABLE_COLUMNS)]
                 for m, c in agg["methods"].items()]), "",
            protocol_markdown(agg, choice), f"Per seed: {links}."])
    side.save_report(out, report, text + "\n")
    print("\n".join(["", *agg["verdicts"], f"protocol report: {out / 'report.md'}"]))
    return report

# --- D. Sweeps: one setting at several values in one run folder (only what depends on it reruns)


def parse_sweep(text: str):
    name, _, values = text.partition("=")
    kinds = {"guidance": float, "clusters": int, "cohesion": float, "extract_sampler": str}
    if name not in kinds or not values:
        raise UserError(f"--sweep {text!r}: use guidance=0,1,3 or clusters=8,16 or "
                        f"cohesion=0.3,0.5 or extract_sampler=ddim50,ddpm250,ddpm1000")
    if name == "extract_sampler" and not all(side.parse_sampler(v) for v in values.split(",")):
        raise UserError(f"--sweep {text!r}: every sampler must be ddim<S> or ddpm<S> with S "
                        f"dividing {side.T_STEPS}")
    try:
        return name, [kinds[name](v) for v in values.split(",")]
    except ValueError:
        raise UserError(f"--sweep {text!r}: every value of {name} must be a number") from None


def run_sweep(cfg: ExperimentConfig) -> dict:
    """Rerun only the stages that depend on the swept setting, and plot the side row against it."""
    name, values = parse_sweep(cfg.sweep)
    rows = []
    for i, value in enumerate(values):
        print(f"\n=== sweep {name} = {value} ===")
        value_of = f"{value:g}" if name == "guidance" else value  # --guidance is text
        setting = dataclasses.replace(cfg, **{name: value_of}, sweep="", fresh=cfg.fresh and i == 0)
        validate(setting)
        report = run_protocol(setting)
        rows.append(dict(value=value, sampling_s=report["sampling_s"],
                         **{m: s for m, s in report["methods"].items()}))
    sweep = json.dumps(dict(setting=name, rows=rows), indent=2)
    side.save_text(Path(cfg.out) / "sweep.json", sweep)
    if is_main():
        (plot_sampler_curve if name == "extract_sampler" else plot_sweep)(name, rows,
                                                                          Path(cfg.out))
    return dict(setting=name, rows=rows)


def plot_sweep(name: str, rows: list, out: Path) -> None:
    fig, ax1 = side.pyplot().subplots(figsize=(5, 3.5))
    values, method = [r["value"] for r in rows], "side" if "side" in rows[0] else list(rows[0])[-1]
    ax1.plot(values, [100 * r[method]["memorized_fraction"] for r in rows], "o-",
             label=f"{method}: Gu memorized %")
    ax1.plot(values, [r[method]["ums_high"] + r[method]["ums_mid"] for r in rows], "s--",
             label=f"{method}: mid+high UMS")
    if "uncond" in rows[0]:
        ax1.axhline(100 * rows[0]["uncond"]["memorized_fraction"], color="gray", ls=":",
                    label="uncond memorized %")
    ax1.set(xlabel=name, ylabel="%")
    ax1.legend(fontsize=8)
    side.save_figure(fig, out / "figures" / f"sweep_{name}.png", dpi=120)


def plot_sampler_curve(name: str, rows: list, out: Path) -> None:
    """Gu memorized % of every row against the sampler's number of steps (one line per sampler
    kind and row), and each sampler's cost per 512 generations; also as sampler_curve.md."""
    fig, (ax1, ax2) = side.pyplot().subplots(1, 2, figsize=(9, 3.5))
    methods = [m for m in rows[0] if m not in ("value", "sampling_s")]
    table = []
    for kind, style in (("ddim", "o--"), ("ddpm", "s-")):
        chosen = [r for r in rows if r["value"].startswith(kind)]
        steps = [side.parse_sampler(r["value"])[1] for r in chosen]
        for color, m in enumerate(methods if chosen else []):  # a colour per row, a line per kind
            n_gen, look = chosen[0][m]["n_generated"], dict(color=f"C{color}", label=f"{m}, {kind}")
            ax1.plot(steps, [100 * r[m]["memorized_fraction"] for r in chosen], style, **look)
            ax2.plot(steps, [r["sampling_s"][m] * 512 / n_gen for r in chosen], style, **look)
    for r in rows:
        table.append([r["value"], *(f"{100 * r[m]['memorized_fraction']:.2f} ({r[m]['memorized']})"
                                    for m in methods),
                      *(f"{r['sampling_s'][m] * 512 / r[m]['n_generated']:.0f}" for m in methods)])
    ax1.set(xscale="log", xlabel="sampling steps", ylabel="Gu memorized %")
    ax2.set(xscale="log", yscale="log", xlabel="sampling steps", ylabel="s per 512 generations")
    ax1.legend(fontsize=7), ax2.legend(fontsize=7)
    side.save_figure(fig, out / "figures" / "sampler_curve.png", dpi=120)
    header = ["sampler", *(f"{m}: Gu % (copies)" for m in methods),
              *(f"{m}: s / 512" for m in methods)]
    side.save_text(out / "sampler_curve.md", "\n".join(side.table_lines(header, table)) + "\n")


# --- E. Theorem 1, checked numerically on a toy where every density is known (theory.md) ----------
# p is a 2-D mixture of Gaussians; its components are the labels, so p_i is component i. Under the
# theorem's assumption of perfect models (p_theta = p, p_theta_i = p_i), the q_eps terms cancel:
#   M(D_i; p_i, eps) - M(D_i; p, eps) = E_{x ~ q_eps}[log p(x) - log p_i(x)]  ->  -KL(p_i || p).

TOY_MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
TOY_SCALES = np.array([0.6, 1.0, 0.3])
TOY_WEIGHTS = np.array([0.4, 0.4, 0.2])


def toy_log_component(x: np.ndarray, k: int) -> np.ndarray:
    """log N(x | mu_k, s_k^2 I) in 2-D."""
    sq = ((x - TOY_MEANS[k]) ** 2).sum(-1)
    return -sq / (2 * TOY_SCALES[k] ** 2) - np.log(2 * np.pi * TOY_SCALES[k] ** 2)


def toy_log_mixture(x: np.ndarray) -> np.ndarray:
    parts = np.stack([np.log(w) + toy_log_component(x, k) for k, w in enumerate(TOY_WEIGHTS)])
    top = parts.max(0)
    return top + np.log(np.exp(parts - top).sum(0))


def toy_sample(k: int, count: int, rng) -> np.ndarray:
    return TOY_MEANS[k] + TOY_SCALES[k] * rng.standard_normal((count, 2))


def memorization_gap(k: int, eps: float, subset_size: int, rng, draws: int = 4) -> float:
    """M(D_k; p_k, eps) - M(D_k; p, eps) by Monte Carlo over q_eps built on D_k ~ p_k."""
    subset = toy_sample(k, subset_size, rng)
    x = subset[:, None, :] + eps * rng.standard_normal((subset_size, draws, 2))
    return float((toy_log_mixture(x) - toy_log_component(x, k)).mean())


def theorem1_table(epsilons=(2.0, 1.0, 0.5, 0.1, 0.01), subset_size: int = 20000,
                   seed: int = 0) -> list:
    """For every label k: the gap for shrinking eps, and -KL(p_k || p) from an independent
    sample."""
    rng, rows = np.random.default_rng(seed), []
    for k in range(len(TOY_WEIGHTS)):
        reference = toy_sample(k, 400000, rng)
        kl = float((toy_log_component(reference, k) - toy_log_mixture(reference)).mean())
        gaps = [memorization_gap(k, eps, subset_size, rng) for eps in epsilons]
        rows.append(dict(label=k, weight=float(TOY_WEIGHTS[k]), scale=float(TOY_SCALES[k]),
                         neg_kl=-kl, gaps=dict(zip(epsilons, gaps))))
    return rows


def theorem1_markdown(rows: list) -> str:
    epsilons = list(rows[0]["gaps"])
    header = " | ".join(f"eps={e:g}" for e in epsilons)
    lines = [f"| label i (weight, scale) | {header} | -KL(p_i\\|p) |",
             "|---|" + "---|" * (len(epsilons) + 1)]
    for r in rows:
        cells = " | ".join(f"{r['gaps'][e]:+.4f}" for e in epsilons)
        lines.append(f"| {r['label']} ({r['weight']}, {r['scale']}) | {cells} | "
                     f"{r['neg_kl']:+.4f} |")
    title = "M(D_i; p_i, eps) - M(D_i; p, eps) on a 2-D Gaussian mixture (Theorem 1: <= 0, -> -KL):"
    return title + "\n\n" + "\n".join(lines)


# --- E2. Why guidance toward a cluster copies: a toy with densities one can write down ----------
# A memorizing model in 1-D: p(x) = (1 - g)/n sum_i N(x | x_i, s^2) + g N(x | 0, b^2), a spike of
# width s at each of n training points x_i and a broad part of weight g (novel samples). Noised
# by the forward process each component stays Gaussian, N(sqrt(abar) mu, abar sigma^2 + 1 - abar),
# so the perfect model's eps and the exact noisy posterior p_t(c | x_t) of a k-means cell (the
# optimum of Eq. 2 over all classifiers) are in closed form; copy rates under p are quadratures.
# Sampling is side.py's: DDIM (eta 0) or ancestral steps, side.reverse_step, with
# eps - lambda sqrt(1 - abar_t) grad log p_t(c | x_t) (Eq. 1), which asks at every t for
# p_t(x) p_t(c | x)^lambda (the power prior).
# `python experiments.py mechanism` prints the copy rate (a) against lambda, (b) against the
# label's mass, (c) for shuffled labels, (d) for six samplers (the sampler's own effect).

MECH_POINTS = np.linspace(-0.7, 0.7, 8)  # the n training points x_i, 0.2 apart
MECH_SPIKE, MECH_NOVEL, MECH_BROAD = 0.02, 0.5, 0.35  # s, g, b
MECH_FAR = 1e3  # the outer edges of the outermost cells (finite, so gradients stay finite)
MECH_LAMBDAS = (0, 1, 2, 3, 5, 10)


def mech_components():
    """Means, widths and weights of the toy model p: n spikes (memorized), one broad (novel)."""
    n = len(MECH_POINTS)
    mean = np.append(MECH_POINTS, 0.0)
    width = np.append(np.full(n, MECH_SPIKE), MECH_BROAD)
    weight = np.append(np.full(n, (1 - MECH_NOVEL) / n), MECH_NOVEL)
    return [torch.tensor(v, dtype=torch.float64) for v in (mean, width, weight)]


def mech_diffused(x: torch.Tensor, abar: torch.Tensor):
    """Each component of p_t at x_t: log(weight x density), mean sqrt(abar) mu, variance."""
    mean, width, weight = mech_components()
    var = abar * width ** 2 + 1 - abar
    centre = abar.sqrt() * mean
    log_part = weight.log() - (x[:, None] - centre) ** 2 / (2 * var) - (2 * np.pi * var).log() / 2
    return log_part, centre, var


def mech_eps(x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """The perfect model: eps_theta(x_t, t) = -sqrt(1 - abar_t) grad log p_t(x_t), exactly."""
    log_part, centre, var = mech_diffused(x, abar)
    score = (torch.softmax(log_part, 1) * (centre - x[:, None]) / var).sum(1)
    return -(1 - abar).sqrt() * score


def log_normal_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails."""
    flip = lo > 0  # both in the right tail: use the mirror image, where Phi is not ~1
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    top, bottom = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return top + torch.log(-torch.expm1((bottom - top).clamp(max=-1e-300)))


def cell_log_posterior(x, abar, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Exact log p_t(c | x_t) for the cell [lo, hi) of each generation's target c: the
    responsibilities of the components at x_t times the mass that each component's posterior
    p(x_0 | x_t), a Gaussian, puts in the cell. The idealized time-dependent classifier."""
    mean, width, _ = mech_components()
    log_part, centre, var = mech_diffused(x, abar)
    post_mean = mean + abar.sqrt() * width ** 2 / var * (x[:, None] - centre)
    post_sd = width * ((1 - abar) / var).sqrt()
    inside = log_normal_mass((lo[:, None] - post_mean) / post_sd,
                             (hi[:, None] - post_mean) / post_sd)
    return torch.logsumexp(log_part + inside, 1) - torch.logsumexp(log_part, 1)


def kernel_log_posterior_grad(x, abar, anchors: torch.Tensor, same: torch.Tensor,
                              bandwidth: float) -> torch.Tensor:
    """grad_x log p_t(c | x_t) of a classifier fitted to labelled samples: the optimum of Eq. 2
    when each sample anchors[j] is blurred by `bandwidth` (the finest detail a classifier
    resolves); same[i, j]: sample j carries generation i's target. In closed form, sqrt(abar) /
    var times (the kernel-weighted mean of the target's samples - that of all samples)."""
    var = abar * bandwidth ** 2 + 1 - abar
    log_k = -(x[:, None] - abar.sqrt() * anchors) ** 2 / (2 * var)
    mine = torch.softmax(log_k.masked_fill(~same, -torch.inf), 1) @ anchors
    return abar.sqrt() / var * (mine - torch.softmax(log_k, 1) @ anchors)


def autograd_of(log_posterior):
    """The guide grad_x log p_t(c | x_t) of a log-posterior function, by autograd."""
    def guide(x, abar):
        x_in = x.detach().requires_grad_(True)
        return torch.autograd.grad(log_posterior(x_in, abar).sum(), x_in)[0]
    return guide


def mech_sample(count: int, seed: int, guide=None, lam: float = 0.0, sampler: str = "ddim50",
                stream: int = side.STREAM_EVAL):
    """side.py's samplers on the toy (ddim<S>: eta 0; ddpm<S>: ancestral, eta 1), guided by
    eps - lambda sqrt(1 - abar_t) grad log p_t(c | x_t) (Eq. 1); guide(x_t, abar_t) gives the
    gradient. Returns the generations and the mean |guidance term| over the steps."""
    x = torch.randn(count, generator=side.sample_rng(seed, stream, 0), dtype=torch.float64)
    noise = side.sample_rng(seed, stream, 1)  # the ancestral steps' fresh noise
    kind, steps = side.parse_sampler(sampler)
    timesteps, pushes, eta = side.sampling_timesteps(steps), [], float(kind == "ddpm")
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        abar = side.DIFFUSION.alpha_bar[t]
        eps = mech_eps(x, abar)
        if guide is not None and lam:
            push = lam * (1 - abar).sqrt() * guide(x, abar)
            eps, pushes = eps - push, pushes + [float(push.abs().mean())]
        z = torch.randn(count, generator=noise, dtype=torch.float64) if eta else torch.zeros(1)
        x = side.reverse_step(x[:, None], eps[:, None], t, t_prev, eta, z[:, None])[:, 0]
    return x.numpy(), float(np.mean(pushes)) if pushes else 0.0


def mech_copies(x) -> np.ndarray:
    """Gu et al.'s test: x copies a training point when d1 / d2 < side.GU_THRESHOLD (1/3)."""
    d = np.sort(np.abs(np.asarray(x)[:, None] - MECH_POINTS[None]), 1)
    return d[:, 0] / np.maximum(d[:, 1], 1e-12) < side.GU_THRESHOLD


def cell_of(edges: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The index k of the cell [edges[k], edges[k+1]) that holds each x."""
    return np.searchsorted(edges, x, side="right") - 1


def mech_exact(edges) -> tuple:
    """Under p itself, per cell [edges[k], edges[k+1]): P(copy | x in cell) and P(x in cell), by
    quadrature on a grid of step 1e-5 (s / 2000). Edges (-inf, inf): p as a whole."""
    grid = np.linspace(-2.5, 2.5, 500001)
    mean, width, weight = (v.numpy() for v in mech_components())
    density = np.zeros_like(grid)
    for m, w, a in zip(mean, width, weight):
        density += a * np.exp(-((grid - m) / w) ** 2 / 2) / (w * np.sqrt(2 * np.pi))
    cell, cells = cell_of(edges, grid), len(edges) - 1
    mass = np.bincount(cell, density, cells)
    return np.bincount(cell, density * mech_copies(grid), cells) / mass, mass * 1e-5


def mech_cells(samples: np.ndarray, clusters: int, seed: int):
    """Algorithm 1 lines 2-5 in 1-D: k-means on the model's own samples, no cohesion filter. A
    cluster's cell (the points nearest its centroid) is an interval. Returns the sorted edges
    and each sample's label."""
    from sklearn.cluster import KMeans
    fit = KMeans(n_clusters=clusters, n_init=10, random_state=seed).fit(samples[:, None])
    centres = np.sort(fit.cluster_centers_[:, 0])
    edges = np.concatenate([[-MECH_FAR], (centres[1:] + centres[:-1]) / 2, [MECH_FAR]])
    return edges, cell_of(edges, samples)


def mech_targets(seed: int, count: int, clusters: int) -> np.ndarray:
    """c ~ U{1..K} per generation (Algorithm 1 line 17), from the target stream."""
    return np.random.default_rng([seed, side.STREAM_TARGET, clusters]).integers(clusters,
                                                                                size=count)


def cell_guidance(synthetic: np.ndarray, clusters: int, lams, seed: int, count: int,
                  steps: int = 50) -> dict:
    """Generations guided toward k-means cells by the exact p_t(c | x_t), one run per lambda
    (lambda 0: unguided); per cell its mass, its exact copy rate under p(x | c) and how many
    training points it holds."""
    edges, _ = mech_cells(synthetic, clusters, seed)
    targets = mech_targets(seed, count, clusters)
    lo, hi = torch.tensor(edges[targets]), torch.tensor(edges[targets + 1])
    guide = autograd_of(lambda x, abar: cell_log_posterior(x, abar, lo, hi))
    copies = {lam: mech_copies(mech_sample(count, seed, guide, lam, f"ddim{steps}")[0])
              for lam in lams}
    exact, mass = mech_exact(edges)
    held = np.bincount(cell_of(edges, MECH_POINTS), minlength=clusters)
    return dict(targets=targets, copies=copies, exact=exact, mass=mass, held=held)


def shuffled_rows(synthetic: np.ndarray, clusters: int, lam: float, seed: int, count: int,
                  bandwidth: float) -> list:
    """Table (c): the k-means labels and the same labels permuted among the synthetic samples
    (sizes kept, so the mass gain log(N_syn / |D_c|) of Section 3.1 is kept too), each learned
    by a fitted classifier; and the exact posterior of each (for shuffled labels the constant
    w_c, whose gradient is 0)."""
    edges, labels = mech_cells(synthetic, clusters, seed)
    shuffled = np.random.default_rng([seed, STREAM_SHUFFLE]).permutation(labels)
    targets, anchors = mech_targets(seed, count, clusters), torch.tensor(synthetic)
    lo, hi = torch.tensor(edges[targets]), torch.tensor(edges[targets + 1])
    fitted = {}
    for name, lab in (("k-means", labels), ("shuffled", shuffled)):
        same = torch.tensor(lab[None] == targets[:, None])
        fitted[name] = lambda x, abar, same=same: kernel_log_posterior_grad(x, abar, anchors,
                                                                              same, bandwidth)
    guides = {"none (unguided)": None,
              "k-means, exact posterior": autograd_of(
                  lambda x, abar: cell_log_posterior(x, abar, lo, hi)),
              f"k-means, fitted (h = {bandwidth})": fitted["k-means"],
              f"shuffled, fitted (h = {bandwidth})": fitted["shuffled"],
              "shuffled, exact posterior = w_c": lambda x, abar: torch.zeros_like(x)}
    gain = float(np.mean(np.log(len(labels) / np.bincount(labels, minlength=clusters))))
    rows = []
    for name, guide in guides.items():
        x, push = mech_sample(count, seed, guide, lam)  # DDIM, 50 steps
        rows.append(dict(name=name, gain=gain if guide else None, push=push,
                         copy=float(mech_copies(x).mean())))
    return rows


def mass_rows(runs: dict) -> list:
    """Table (b): for each K, the cells grouped by how many training points they hold and by
    whether they are the two outermost (unbounded) ones, with their masses w_c, the exact copy
    rate of p(x | c) and the measured one per lambda."""
    rows = []
    for clusters, run in runs.items():
        outer = np.isin(np.arange(clusters), [0, clusters - 1])
        for held, out in sorted(set(zip(run["held"].tolist(), outer.tolist()))):
            cells = np.flatnonzero((run["held"] == held) & (outer == out))
            chosen, mass = np.isin(run["targets"], cells), run["mass"][cells]
            rows.append(dict(clusters=clusters, held=held, outer=out, cells=len(cells),
                             mass=(float(mass.min()), float(mass.max())),
                             exact=float(run["exact"][cells].mean()),
                             copies={lam: float(copied[chosen].mean())
                                     for lam, copied in run["copies"].items()}))
    return rows


def mechanism_tables(seed: int = 0, count: int = 2000, fine_count: int = 1000,
                     fine_steps: int = 1000, bandwidth: float = 0.02) -> dict:
    """Copy rates on the toy (a) against lambda, (b) against the label's mass, (c) with shuffled
    labels, (d) per sampler. `count` is both N_syn (the samples k-means labels) and N_G per run;
    the check with `fine_steps` DDIM steps, and tables (c) and (d), use `fine_count`."""
    synthetic, _ = mech_sample(count, seed, stream=side.STREAM_SYNTHETIC)
    runs = {clusters: cell_guidance(synthetic, clusters, lams, seed, count)
            for clusters, lams in ((2, (1, 3)), (4, MECH_LAMBDAS), (8, MECH_LAMBDAS),
                                   (16, (1, 3)))}
    fine = cell_guidance(synthetic, 8, (0, 1, 3), seed, fine_count, fine_steps)
    whole = float(mech_exact(np.array([-np.inf, np.inf]))[0][0])
    rows = []
    for lam in MECH_LAMBDAS:
        rows.append({"lam": lam, "fine": fine["copies"].get(lam, np.array([np.nan])).mean(),
                     **{f"k{k}": runs[k]["copies"][lam].mean() for k in (4, 8)},
                     **{f"exact{k}": whole if lam == 0 else runs[k]["exact"].mean()
                        for k in (4, 8)}})
    return dict(lam=rows, held={k: runs[k]["held"].tolist() for k in (4, 8)}, steps=fine_steps,
                mass=mass_rows(runs), base=float(runs[8]["copies"][0].mean()), exact=whole,
                shuffled=shuffled_rows(synthetic, 8, 3, seed, fine_count, bandwidth),
                samplers=sampler_rows(synthetic, 8, seed, fine_count))


MECH_SAMPLERS = ("ddim50", "ddim250", "ddim1000", "ddpm50", "ddpm250", "ddpm1000")


def sampler_rows(synthetic: np.ndarray, clusters: int, seed: int, count: int) -> list:
    """Table (d): the copy rate of each sampler, unguided and guided toward the k-means cells by
    the exact posterior at lambda 1 (which asks for p(x | c) itself), beside the exact rates."""
    edges, _ = mech_cells(synthetic, clusters, seed)
    targets = mech_targets(seed, count, clusters)
    lo, hi = torch.tensor(edges[targets]), torch.tensor(edges[targets + 1])
    guide = autograd_of(lambda x, abar: cell_log_posterior(x, abar, lo, hi))
    exact = float(mech_exact(edges)[0][targets].mean())
    return [dict(sampler=name, exact=exact, **{
        label: float(mech_copies(mech_sample(count, seed, g, lam, name)[0]).mean())
        for label, g, lam in (("unguided", None, 0.0), ("guided", guide, 1.0))})
        for name in MECH_SAMPLERS]


def mech_lambda_markdown(tables: dict) -> list:
    """Table (a), as Markdown lines."""
    held = tables["held"]
    lines = [f"(a) Copy rate against lambda. Training points per cell: K = 8 {held[8]}, K = 4 "
             f"{held[4]}; 'exact' is p(x) p(c | x)^lambda at t = 0 with c uniform.", ""]
    header = ["lambda", "K=8, 50 steps", f"K=8, {tables['steps']} steps", "K=8, exact",
              "K=4, 50 steps", "K=4, exact"]
    rows = [[r["lam"], f"{r['k8']:.3f}", "-" if np.isnan(r["fine"]) else f"{r['fine']:.3f}",
             f"{r['exact8']:.3f}", f"{r['k4']:.3f}", f"{r['exact4']:.3f}"] for r in tables["lam"]]
    return lines + side.table_lines(header, rows)


def mech_mass_markdown(tables: dict) -> list:
    """Table (b), as Markdown lines."""
    lines = ["(b) Copy rate against the label's mass w_c, cells grouped by the training points "
             "they hold and by their place (outermost: one of the two unbounded cells).", ""]
    header = ["K", "points in cell", "place", "cells", "w_c", "log(1/w_c)", "exact p(x given c)",
              "lambda=1", "lambda=3"]
    rows = []
    for r in tables["mass"]:
        low, high = r["mass"]
        rows.append([r["clusters"], r["held"], "outermost" if r["outer"] else "inner", r["cells"],
                     f"{low:.3f}-{high:.3f}", f"{np.log(1 / high):.2f}-{np.log(1 / low):.2f}",
                     f"{r['exact']:.3f}", f"{r['copies'][1]:.3f}", f"{r['copies'][3]:.3f}"])
    return lines + side.table_lines(header, rows)


def mech_shuffled_markdown(tables: dict) -> list:
    """Table (c), as Markdown lines."""
    lines = ["(c) K = 8, lambda = 3: k-means labels, and the same labels shuffled among the "
             "samples.", ""]
    header = ["labels, classifier", "mass gain, mean log(N_syn/size)",
              "mean abs guidance term", "copy rate"]
    rows = [[r["name"], "-" if r["gain"] is None else f"{r['gain']:.2f}", f"{r['push']:.3f}",
             f"{r['copy']:.3f}"] for r in tables["shuffled"]]
    return lines + side.table_lines(header, rows)


def mech_sampler_markdown(tables: dict) -> list:
    """Table (d), as Markdown lines."""
    lines = [f"(d) The sampler, with the exact eps: copy rate unguided (p itself: "
             f"{tables['exact']:.3f}) and guided toward K = 8 cells by the exact posterior at "
             f"lambda 1 (p(x given c) itself: {tables['samplers'][0]['exact']:.3f}).", ""]
    rows = [[r["sampler"], f"{r['unguided']:.3f}", f"{r['guided']:.3f}"]
            for r in tables["samplers"]]
    return lines + side.table_lines(["sampler", "unguided", "guided, lambda 1"], rows)


def mechanism_markdown(tables: dict) -> str:
    """The three tables of section E2, in Markdown."""
    title = (f"Guidance toward k-means cells on a 1-D memorizing model: {len(MECH_POINTS)} "
             f"training points (spikes of width {MECH_SPIKE}, weight {1 - MECH_NOVEL}) and a broad "
             f"part (width {MECH_BROAD}, weight {MECH_NOVEL}). Copy: Gu et al. d1/d2 < 1/3. "
             f"Exact copy rate of p: {tables['exact']:.3f}; DDIM, 50 steps, unguided: "
             f"{tables['base']:.3f}.")
    parts = [mech_lambda_markdown(tables), mech_mass_markdown(tables),
             mech_shuffled_markdown(tables), mech_sampler_markdown(tables)]
    return title + "\n\n" + "\n\n".join("\n".join(part) for part in parts)


# --- F. Many GPUs: torchrun ----------------------------------------------------------------------
# `torchrun --nproc_per_node G experiments.py ...` starts G copies of this file with RANK,
# LOCAL_RANK and WORLD_SIZE set. DDPM training runs as DistributedDataParallel (each rank draws its
# own batches, so the effective batch is G x --batch-size); sampling is sharded by generation index
# (sharded_sample, in place of side.sample for the run); the other stages (data, k-means,
# classifiers) run on rank 0 while the others wait, then read what rank 0 wrote; every rank scores
# the (identical) generations, side.py's atomic writes keep their identical files whole. Only rank
# 0 prints.

EVERY_RANK = ("synthetic", "samples_")  # run-folder stages that every rank computes (sampling)


def launched_rank() -> int:
    """torchrun's RANK (0 for a plain `python experiments.py`), readable before and after the
    process group exists."""
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    """Rank 0 under torchrun; True in a plain process."""
    return not dist.is_initialized() or dist.get_rank() == 0


def sharded_sample(model, cfg, count: int, device, stream: int = side.STREAM_EVAL, classifier=None,
                   targets=None, guidance: float = 0.0, start: int = 0, **options) -> np.ndarray:
    """side.sample's generations start .. start+count-1, each rank drawing one contiguous block
    of them and every rank returning all of them in order. Generation i depends only on (seed,
    stream, i), so the result is bit for bit what one process draws."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    mine = range(rank * count // ranks, (rank + 1) * count // ranks)
    part = ONE_PROCESS_SAMPLE(model, cfg, len(mine), device, stream, classifier,
                              None if targets is None else targets[mine.start:mine.stop], guidance,
                              start=start + mine.start, **options)
    return np.concatenate(gather_all(part))


ONE_PROCESS_SAMPLE = side.sample


@contextlib.contextmanager
def distributed(cfg: ExperimentConfig):
    """Join torchrun's process group (nccl on CUDA, gloo on the CPU) for the length of a run, with
    side.sample sharded among the ranks and the other ranks' output silenced. Without torchrun this
    does nothing."""
    if "RANK" not in os.environ:
        yield
        return
    cuda = side.resolve_device(cfg.device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this rank's GPU
    # rank 0 alone trains the classifiers and scores; the others wait, for hours at paper scale
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=12))
    side.sample, streams = sharded_sample, (sys.stdout, sys.stderr)
    if not is_main():  # progress bars, warnings and prints: rank 0's only (errors: agreed_problem)
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        yield
    finally:
        side.sample, (sys.stdout, sys.stderr) = ONE_PROCESS_SAMPLE, streams
        dist.destroy_process_group()


def gather_all(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] without torchrun."""
    if not dist.is_initialized():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def agreed_problem(problem: str) -> str:
    """The first rank's problem ('' if none), on every rank: a check that failed on one rank
    alone (a file system race, say) stops them all, and rank 0 says why."""
    found = [(rank, p) for rank, p in enumerate(gather_all(problem)) if p]
    if not found:
        return ""
    rank, first = found[0]
    return f"{first} (on rank {rank})" if rank else first


class SaidOnRankZero(UserError):
    """A UserError that every rank raises because rank 0 found it (or the ranks agreed on it):
    rank 0 alone prints it."""


def rank0_only(work, *args, share: bool = False):
    """work(*args) on rank 0 while the others wait. A UserError on rank 0 is raised on every rank,
    so no rank is left waiting; with share=True every rank returns rank 0's (small) result."""
    if not dist.is_initialized():
        return work(*args)
    result, box = None, [None, None]
    if is_main():
        try:
            result = work(*args)
            box[0] = result if share else None
        except UserError as error:
            box[1] = str(error)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SaidOnRankZero(box[1])
    return result if is_main() else box[0]


class DistributedFolder(ExperimentFolder):
    """The run folder under torchrun: sampling stages on every rank (each draws its share), every
    other stage on rank 0, which saves it; the others then read it."""

    def __call__(self, name: str, compute, **values) -> dict:
        path, settings = self.path(name), self.settings(name, **values)
        if name.startswith(EVERY_RANK):
            return self.load_or_compute(path, settings, compute)
        result = rank0_only(self.load_or_compute, path, settings, compute)  # the others wait...
        if is_main():
            return result
        result = self.load(path, settings)  # ...then read what rank 0 saved
        if result is None:
            raise UserError(f"{path} was saved by rank 0 but cannot be read on rank "
                            f"{dist.get_rank()}; give --out a folder every rank sees")
        return result


def train_ddpm_distributed(cfg: ExperimentConfig, x0_all: torch.Tensor, path: Path) -> nn.Module:
    """side.train_ddpm as DistributedDataParallel over side.ddpm_loss and side.ema_update: every
    rank draws its own batches (the effective batch is G x --batch-size), the ranks agree on the
    loss and on stopping, and rank 0 saves the checkpoint with every rank's batch generator."""
    rank, ranks = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = side.build_unet(cfg, x0_all.shape[1]).to(x0_all.device)
    ema, opt = copy.deepcopy(model), torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(batch_seed(cfg.seed, rank))
    first = side.resume_ddpm(path, cfg, model, ema, opt, gen, rank, ranks)
    # 1x1 convolutions get gradients whose strides differ only on size-1 dims: harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    ids = [torch.cuda.current_device()] if x0_all.device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def save(step: int, rng: torch.Tensor) -> None:
        rngs = gather_all(rng)  # every rank takes part; rank 0 alone writes the one checkpoint
        if is_main():
            side.save_torch(path, dict(model=model.state_dict(), ema=ema.state_dict(), step=step,
                                       opt=opt.state_dict(), rngs=rngs,
                                       config=dataclasses.asdict(cfg)))
        dist.barrier()  # no rank reads ddpm.pt again before rank 0 has written it
    bar = side.progress(range(first, cfg.train_steps), desc=f"train DDPM ({ranks} processes)",
                        initial=first, total=cfg.train_steps, disable=first == cfg.train_steps)
    with side.StopAtStepBoundary() as stop:
        for step in bar:
            rng = gen.get_state()
            loss = side.ddpm_loss(net, x0_all, gen, cfg.batch_size)
            agreed = torch.tensor([loss.item(), float(stop.pressed or step == stop.stop_at)])
            dist.all_reduce(agreed)  # every rank decides alike
            mean_loss, stop.pressed = agreed[0].item() / ranks, agreed[1].item() > 0
            stop.check(step, mean_loss, path, lambda: save(step, rng))
            if step > first and step % cfg.ckpt_every == 0:
                save(step, rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            side.ema_update(ema, model, cfg.ema, step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
    if first < cfg.train_steps:
        save(cfg.train_steps, gen.get_state())
    return ema.eval()


def batch_seed(seed: int, rank: int) -> int:
    """Rank 0 draws its batches with `seed` itself (as one process does); rank r with (seed, r)."""
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def check_process_count(cfg: ExperimentConfig) -> None:
    """Every torchrun process must have generations to draw; checked before any process group."""
    labelled = any(METHODS[name].classifier for name in side.method_names(cfg) if name in METHODS)
    counts = {"--n-gen": cfg.n_gen, "--n-syn": cfg.n_syn if labelled else None,
              "--tune-n-gen": cfg.tune_n_gen if methods_to_tune(cfg) else None}
    counts = {flag: count for flag, count in counts.items() if count is not None}
    shared, processes = min(counts.values()), int(os.environ.get("WORLD_SIZE", 1))
    if processes > shared:
        given = ", ".join(f"{flag} {count}" for flag, count in counts.items())
        raise UserError(f"torchrun started {processes} processes but there are only {shared} "
                        f"generations to share ({given}); use --nproc_per_node {shared} or "
                        f"fewer, or raise {'/'.join(counts)}")


# --- F2. --compile: torch.compile for the UNet on CUDA --------------------------------------------


def compile_problem(device: torch.device) -> str:
    """Why torch.compile cannot run here ('' when it can)."""
    if not hasattr(torch, "compile"):
        return "this PyTorch has no torch.compile (it needs PyTorch 2.0 or later)"
    from torch import _dynamo
    if not _dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]} in this PyTorch"
    from torch.utils._triton import has_triton
    if device.type == "cuda" and not has_triton():
        return "torch.compile on CUDA needs triton, which is not installed (pip install triton)"
    return ""


@functools.cache
def warn_once(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def compiled_unets(cfg: ExperimentConfig, device: torch.device):
    """--compile: inside, every UNet's forward runs through torch.compile (the class's method, so
    the EMA copy and the checkpoint's keys are side.py's own); on the CPU it warns once and the
    UNet runs eagerly."""
    forward = side.UNet.forward
    if cfg.compile and device.type != "cuda":
        warn_once("--compile applies on CUDA only; running the UNet eagerly on the CPU")
    elif cfg.compile:
        side.UNet.forward = torch.compile(forward)
    try:
        yield
    finally:
        side.UNet.forward = forward


# --- G. The command line --------------------------------------------------------------------------


def build_parser() -> side.OneLineParser:
    parser = side.OneLineParser(
        prog="experiments.py", description="SIDE's evidence: lambda tuned per row on a seed that "
        "is never reported, several seeds with one aggregate report, controls, sweeps, torchrun. "
        "Every flag of side.py works here too; defaults marked 'profile' depend on --dataset and "
        "the device.")
    parser.add_argument("command", nargs="?", default="run",
                        choices=["run", "theorem1", "mechanism", "download"],
                        help="run: the protocol; theorem1: the numerical check of Theorem 1; "
                        "mechanism: why guidance toward a cluster copies, on a 1-D toy; "
                        "download: fetch --dataset (cifar10, celeba) into --data-root")
    side.add_config_flags(parser, ExperimentConfig)
    parser.add_argument("--n-train", dest="n", type=int, default=argparse.SUPPRESS,
                        help="--n, under torchrun (whose own parser takes --n)")
    return parser


def problem_with(cfg: ExperimentConfig) -> str:
    """validate()'s one line, or '' when every flag is fine."""
    try:
        validate(cfg)
    except UserError as error:
        return str(error)
    return ""


def main(argv=None) -> int:
    joined = False  # past the process group's agreement, a rank may fail alone
    try:
        args = build_parser().parse_args(argv)
        if args.command == "theorem1":
            print(theorem1_markdown(theorem1_table()))
            return 0
        if args.command == "mechanism":
            print(mechanism_markdown(mechanism_tables()))
            return 0
        if args.command == "download":
            download(side.config_from(args, ExperimentConfig))
            return 0
        cfg = apply_profile(side.config_from(args, ExperimentConfig))
        problem = problem_with(cfg)  # on every rank, before any process group...
        with distributed(cfg):
            problem = agreed_problem(problem)  # ...then shared: no rank is left waiting
            if problem:
                raise SaidOnRankZero(problem)
            joined = True
            print("config: " + json.dumps(dataclasses.asdict(cfg)))
            with compiled_unets(cfg, side.resolve_device(cfg.device)):
                run_sweep(cfg) if cfg.sweep else run_protocol(cfg)
        return 0
    except UserError as error:
        if launched_rank() == 0:  # what every rank stops with, rank 0 says
            print(f"error: {error}", file=sys.stderr)
        elif joined and not isinstance(error, SaidOnRankZero):  # this rank's alone
            print(f"error (rank {launched_rank()}): {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if launched_rank() == 0:
            print("\ninterrupted: finished stages are saved; rerun the same command to continue",
                  file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
