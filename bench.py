"""bench.py: speed of side.py (issue 7). Prints Markdown tables and writes bench.json.

    python bench.py                      # about 7 minutes on one thread of a 2-core CPU
    python bench.py --quick              # about 2 minutes: fewer windows, smaller search sizes
    python bench.py --nn-scale 0.25,0.5,1 --report runs/digits-n128-8px/report.json

1. DDPM training throughput of side.UNet vs diffusers' UNet2DModel of a similar parameter count,
   same batch, resolution, dtype, device and process; timed windows interleaved, medians reported.
2. Sampling throughput of unguided and SIDE-guided DDIM (side.sample) at the same steps.
3. side.nearest_neighbours at the paper's scale (N_G = 50,000 vs n = 25,000 at 64x64x3, random
   uint8): time, peak resident memory over the baseline (the input arrays are data, not extra), and
   the scaling in N_G x n; sizes not measured are extrapolated and marked so.
4. The default run, stage by stage, read from its report.json (nothing is rerun).
diffusers and psutil are benchmark-only (requirements-bench.txt); side.py never imports them.

    python bench.py --profile gpu                          # FLOP counts and predictions, any machine
    python bench.py --profile gpu --measure --json g.json  # and measured steps, on a CUDA device

--profile gpu costs the GPU profile's commands (celeba --n 1000 at 64 px, and the paper's CelebA-25000
at 128 px) from FLOPs counted with torch.utils.flop_counter's formulas: parameters, forward FLOPs per
image, and each stage's predicted wall time on one GPU and on 8 (ideal scaling) at an ASSUMED sustained
throughput (--tflops). --measure times the real-size networks in bf16 on the GPU beside the prediction.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import experiments  # the profiles of the datasets side.py does not read (cifar10)
import side

PAPER_N_GEN, PAPER_N_TRAIN, PAPER_SIZE = 50_000, 25_000, 64
DIFFUSERS_WIDTHS = {"32,64": (32, 56)}  # its up path has one more resnet per level: 64 -> 56 evens the count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--quick", action="store_true", help="fewer timed windows and smaller search sizes (~2 min)")
    p.add_argument("--nn-scale", default=None, help="fractions of N_G and of n for the search, e.g. 0.25,0.5,1 "
                   "(work grows as the square) [0.125,0.25,0.5; quick: 0.0625,0.125]")
    p.add_argument("--report", default="runs/digits-n128-8px/report.json", help="report.json of a default run [%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu | cuda [%(default)s]")
    p.add_argument("--windows", type=int, default=None, help="timed windows per measurement [5; quick: 3]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core) [0]")
    p.add_argument("--out", "--json", dest="out", default=None,
                   help="where to write the raw numbers [bench.json; --profile gpu: bench_gpu.json]")
    p.add_argument("--profile", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: the sections above; gpu: FLOP counts and stage predictions of the GPU profile [cpu]")
    p.add_argument("--measure", action="store_true", help="--profile gpu: also time the real-size networks (CUDA)")
    p.add_argument("--dry-run", action="store_true", help="--profile gpu: toy networks, any device; checks the "
                   "code paths only, its numbers mean nothing")
    p.add_argument("--tflops", type=float, default=237.0, help="ASSUMED sustained bf16 TFLOP/s per GPU "
                   "[237: 30 %% of the 790 an H200 gave on an 8192^3 bf16 matmul]")
    p.add_argument("--fp32-tflops", type=float, default=20.0, help="ASSUMED sustained fp32 TFLOP/s of the "
                   "search's matmul [20: 30 %% of an H200's 67 fp32 datasheet peak]")
    p.add_argument("--pcie-gbs", type=float, default=10.0, help="ASSUMED host-device copy GB/s of the "
                   "search's pageable transfers [10]")
    p.add_argument("--cpu-gflops", type=float, default=200.0, help="ASSUMED sustained CPU GFLOP/s of "
                   "scikit-learn's k-means [200]")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the multi-GPU column (ideal scaling) [8]")
    args = p.parse_args(argv)
    args.out = args.out or ("bench_gpu.json" if args.profile == "gpu" else "bench.json")
    return args


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def profile_cfg(dataset: str, device) -> side.Config:
    """The profile for (dataset, device): digits -> 8x8x1, cifar10 (CPU, experiments.py's) ->
    16x16x3. Any lambda > 0 costs the same, so 10 stands for it here (--guidance takes text)."""
    cfg = side.apply_profile(side.Config(dataset=dataset, device=device.type), experiments.PROFILES)
    cfg.guidance = "10"
    return cfg


LAMBDA = 10.0  # the guidance scale every guided measurement here uses (see profile_cfg)


def diffusers_unet(cfg: side.Config, in_ch: int):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=cfg.image_size, in_channels=in_ch, out_channels=in_ch,
                       block_out_channels=DIFFUSERS_WIDTHS[cfg.channels], layers_per_block=cfg.blocks,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=8, attention_head_dim=None)  # one-head mid attention, as side's


def training_stepper(model, forward, cfg, in_ch, device):
    """One DDPM step as side trains it (side.ddpm_loss, Adam); EMA and checkpoints left out."""
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    x0_all = torch.rand(cfg.n, in_ch, cfg.image_size, cfg.image_size, generator=gen).to(device) * 2 - 1

    def step():  # side.ddpm_loss on either UNet, through its own forward()
        loss = side.ddpm_loss(lambda x, t: forward(model, x, t), x0_all, gen, cfg.batch_size)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def interleaved_rates(jobs: dict, items: int, windows: int, warmup: int, device) -> dict:
    """images/s per job: warm-up, then timed windows taken A, B, A, B... so machine load hits all alike."""
    for job in jobs.values():
        for _ in range(warmup):
            job()
    rates = {name: [] for name in jobs}
    for _ in range(windows):
        for name, job in jobs.items():
            sync(device)
            start = time.perf_counter()
            job()
            sync(device)
            rates[name].append(items / (time.perf_counter() - start))
    return rates


def bench_training(dataset, in_ch, device, windows, steps):
    cfg = profile_cfg(dataset, device)
    torch.manual_seed(0)
    ours, theirs = side.build_unet(cfg, in_ch), diffusers_unet(cfg, in_ch)
    steppers = {"side": training_stepper(ours, lambda m, x, t: m(x, t), cfg, in_ch, device),
                "diffusers": training_stepper(theirs, lambda m, x, t: m(x, t).sample, cfg, in_ch, device)}
    jobs = {name: (lambda s=s: [s() for _ in range(steps)]) for name, s in steppers.items()}
    rates = interleaved_rates(jobs, steps * cfg.batch_size, windows, 1, device)
    ratio = statistics.median(a / b for a, b in zip(rates["side"], rates["diffusers"]))
    return dict(config=f"{cfg.image_size}x{cfg.image_size}x{in_ch}, channels {cfg.channels}, blocks {cfg.blocks}, "
                       f"batch {cfg.batch_size}", params_side=params(ours), params_diffusers=params(theirs),
                side=statistics.median(rates["side"]), diffusers=statistics.median(rates["diffusers"]),
                ratio=ratio, windows=rates)


def bench_sampling(dataset, in_ch, device, windows, count):
    """side.sample with untrained networks (the cost does not depend on the weights)."""
    cfg = profile_cfg(dataset, device)
    torch.manual_seed(0)
    model = side.build_unet(cfg, in_ch).to(device).eval()
    clf = side.build_classifier(cfg, in_ch, cfg.clusters, time_dependent=True).to(device).eval()
    targets = side.draw_targets(cfg.seed, count, cfg.clusters)
    jobs = {"unguided": lambda: side.sample(model, cfg, count, device),
            "guided": lambda: side.sample(model, cfg, count, device, classifier=clf, targets=targets,
                                          guidance=LAMBDA)}
    rates = interleaved_rates(jobs, count, windows, 0, device)  # the median absorbs a slow first window
    unguided, guided = statistics.median(rates["unguided"]), statistics.median(rates["guided"])
    return dict(config=f"{cfg.image_size}x{cfg.image_size}x{in_ch}, {cfg.sampler}, batch {count}, "
                       f"lambda {LAMBDA:g}", unguided=unguided, guided=guided, cost_ratio=unguided / guided,
                params_classifier=params(clf), windows=rates)


def timed_peak(fn):
    """(seconds, peak RSS above the RSS just before the call, in bytes), RSS polled every 2 ms."""
    import psutil
    gc.collect()
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)
    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return seconds, max(0, max(peak[0], process.memory_info().rss) - baseline)


def bench_search(fractions, device):
    rows, k = [], side.CARLINI_NEIGHBOURS
    for i, f in enumerate(fractions):
        n_gen, n_train = round(PAPER_N_GEN * f), round(PAPER_N_TRAIN * f)
        rng = np.random.default_rng(0)
        generated = rng.integers(0, 256, (n_gen, PAPER_SIZE, PAPER_SIZE, 3), dtype=np.uint8)
        train = rng.integers(0, 256, (n_train, PAPER_SIZE, PAPER_SIZE, 3), dtype=np.uint8)
        seconds, extra = timed_peak(lambda: side.nearest_neighbours(generated, train, k, device))
        row = dict(fraction=f, n_gen=n_gen, n_train=n_train, seconds=seconds, extra_bytes=extra,
                   data_bytes=generated.nbytes + train.nbytes, ns_per_pair=1e9 * seconds / (n_gen * n_train))
        if i == 0:  # the full memorization check (search + Gu, Carlini, AMS/UMS) once, at the smallest size
            row["metrics_seconds"], row["metrics_extra_bytes"] = timed_peak(lambda: side.memorization_metrics(
                generated, train, None, side.PIXEL_BANDS, device))
        rows.append(row)
        del generated, train
    # least squares through the origin: seconds = c * N_G * n
    work = np.array([r["n_gen"] * r["n_train"] for r in rows], dtype=float)
    c = float(work @ np.array([r["seconds"] for r in rows]) / (work @ work))
    largest = max(rows, key=lambda r: r["n_gen"])
    measured_full = largest["n_gen"] == PAPER_N_GEN and largest["n_train"] == PAPER_N_TRAIN
    # extra memory: fixed-size blocks plus the k-nearest outputs (float32 + int64 per entry), ~N_G
    full_extra = max(r["extra_bytes"] for r in rows) + 12 * k * (PAPER_N_GEN - largest["n_gen"])
    return dict(rows=rows, seconds_per_pair=c, full=dict(
        seconds=largest["seconds"] if measured_full else c * PAPER_N_GEN * PAPER_N_TRAIN,
        extra_bytes=largest["extra_bytes"] if measured_full else full_extra, measured=measured_full,
        spread=max(r["ns_per_pair"] for r in rows) / min(r["ns_per_pair"] for r in rows)))


def end_to_end(path: str):
    if not Path(path).is_file():
        return dict(path=path, missing=True)
    report = json.loads(Path(path).read_text())
    return dict(path=path, timings=report["timings_s"], config={k: report["config"][k] for k in
                ("dataset", "n", "image_size", "channels", "train_steps", "n_syn", "clf_steps", "n_gen", "device")})


def table(header: list, rows: list) -> list:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results) -> str:
    mb = lambda b: f"{b / 2**20:,.0f} MB"
    out = table(["training (DDPM step)", "side.UNet", "diffusers UNet2DModel", "side / diffusers"],
                [[r["config"], f"{r['side']:,.0f} img/s ({r['params_side']:,} params)",
                  f"{r['diffusers']:,.0f} img/s ({r['params_diffusers']:,} params)", f"{r['ratio']:.2f}"]
                 for r in results["training"]])
    out += [""] + table(["sampling (side.sample)", "unguided", "SIDE-guided", "guided cost / unguided"],
                        [[r["config"], f"{r['unguided']:,.1f} img/s", f"{r['guided']:,.1f} img/s", f"{r['cost_ratio']:.2f}"]
                         for r in results["sampling"]])
    s, full = results["search"], results["search"]["full"]
    rows = [[f"{r['fraction']:g} of paper size", f"{r['n_gen']:,} x {r['n_train']:,}", f"{r['seconds']:.2f} s",
             f"{r['ns_per_pair']:.0f}", mb(r["extra_bytes"]), mb(r["data_bytes"])] for r in s["rows"]]
    rows.append(["paper size (" + ("measured" if full["measured"] else "EXTRAPOLATED: c N_G n fitted to the rows above") + ")",
                 f"{PAPER_N_GEN:,} x {PAPER_N_TRAIN:,}", f"{full['seconds']:.0f} s", f"{1e9 * s['seconds_per_pair']:.0f}",
                 mb(full["extra_bytes"]), mb((PAPER_N_GEN + PAPER_N_TRAIN) * 3 * PAPER_SIZE ** 2)])
    out += [""] + table([f"nearest_neighbours, k={side.CARLINI_NEIGHBOURS}, {PAPER_SIZE}x{PAPER_SIZE}x3", "N_G x n", "time",
                         "ns per pair", "peak extra RSS", "input data"], rows)
    first, last = s["rows"][0], s["rows"][-1]
    span = last["n_gen"] * last["n_train"] / (first["n_gen"] * first["n_train"])
    out += ["", f"Time per pair varies {full['spread']:.2f}x over a {span:.0f}x range of N_G x n "
            f"({'linear' if full['spread'] < 1.5 else 'NOT linear'}). memorization_metrics at {first['n_gen']:,} x "
            f"{first['n_train']:,}: {first['metrics_seconds']:.2f} s (search alone {first['seconds']:.2f} s), "
            f"peak extra {mb(first['metrics_extra_bytes'])}."]
    e = results["end_to_end"]
    if e.get("missing"):
        out += ["", f"End to end: no report at {e['path']} (run `python side.py` first or pass --report)."]
    else:
        out += [""] + table([f"default run ({e['path']})"] + list(e["timings"]),
                            [["seconds"] + [f"{v:.1f}" for v in e["timings"].values()]])
    targets = [("training throughput side / diffusers", min(r["ratio"] for r in results["training"]), ">= 1.0", lambda v: v >= 1),
               ("guided / unguided sampling cost", max(r["cost_ratio"] for r in results["sampling"]), "<= 2.5", lambda v: v <= 2.5),
               ("search peak extra memory at paper size, GB", full["extra_bytes"] / 2**30, "< 2", lambda v: v < 2)]
    if not e.get("missing"):
        targets.append(("default run, minutes", e["timings"]["total"] / 60, "<= 10", lambda v: v <= 10))
    out += [""] + table(["target", "measured (worst row)", "goal", "result"],
                        [[name, f"{v:.2f}", goal, "pass" if ok(v) else "MISS"] for name, v, goal, ok in targets])
    m = results["machine"]
    out += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, device {m['device']}, "
            f"float32, torch {m['torch']}, diffusers {m['diffusers']}; load average {m['load_before']} before, "
            f"{m['load_after']} after."]
    if float(m["load_before"].split()[0]) > 1.0:  # after the run the load includes our own threads
        out.append("CAUTION: other processes were using the CPU during this run; the figures are pessimistic.")
    return "\n".join(out)


# =================================================================================================
# --profile gpu: the GPU profile's commands costed by counted FLOPs and, with --measure, timed on CUDA
# =================================================================================================

# The paper's CelebA-25000 command (paper App.: 128 px, about 1,000 epochs, N_G = 50,000, K = 100).
# The 128-px UNet adds a 512-wide fifth level to the 64-px profile's four; attention stays at 16x16.
# N_syn is not in the paper (50,000 is a third-party guess). 195,313 steps x 128 = 1,000 epochs.
PAPER_SCALE = dict(n=25_000, image_size=128, channels="128,256,256,256,512", train_steps=195_313,
                   n_syn=50_000, n_gen=50_000, extract_sampler="ddim50")  # the paper's DDIM sampler
GPU_COMMANDS = [("python side.py --dataset celeba --n 1000 (64 px)", {}),
                ("paper scale: CelebA-25000, 128 px", PAPER_SCALE)]
TOY = dict(image_size=16, channels="16,32", attn_res="8", clusters=4)  # --dry-run
METHODS = ("uncond", "cond", "side")
KMEANS_ITERATIONS = 3 * 50  # side's n_init = 3 times an ASSUMED 50 Lloyd iterations (sklearn stops at tol)


class CountFlops(TorchDispatchMode):
    """torch.utils.flop_counter's per-operator formulas, summed over every operator that runs.
    FlopCounterMode itself adds module hooks that refuse torch.autograd.grad on a leaf tensor, which
    is how guided_eps takes the classifier's gradient; on a DDPM training step the two agree exactly."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted_flops(fn) -> int:
    """FLOPs of fn() (a multiply-add counts 2). Attention goes through the math kernel, whose matmuls
    are counted: the CPU's fused attention kernel has no formula."""
    with sdpa_kernel([SDPBackend.MATH]), CountFlops() as counter:
        fn()
    return counter.total


def gpu_config(overrides: dict) -> side.Config:
    """The (celeba, gpu) profile with overrides, on any machine (apply_profile picks by device);
    lambda = 10 stands for the tuned one (any lambda > 0 costs the same)."""
    cfg = side.Config(dataset="celeba", device="cuda")
    for name, value in {**side.PROFILES[("celeba", "gpu")], "guidance": 10.0, **overrides}.items():
        setattr(cfg, name, value)
    return cfg


def gpu_networks(cfg: side.Config, device) -> dict:
    torch.manual_seed(0)
    return dict(unet=side.build_unet(cfg, 3).to(device).eval(),
                side=side.build_classifier(cfg, 3, cfg.clusters, time_dependent=True).to(device).eval(),
                cond=side.build_classifier(cfg, 3, cfg.clusters, time_dependent=False).to(device).eval())


def classifier_train_step(net, x0, soft, gen, time_dependent: bool):
    """The body of side.train_classifier's loop without the optimizer: noise (Eq. 2), loss, backward."""
    x_t, t = side.classifier_inputs(x0, gen, time_dependent)
    with side.autocast(x0.device):
        loss = side.soft_cross_entropy(net(x_t, t).float(), soft)
    loss.backward()


def flops_per_image(cfg: side.Config) -> dict:
    """Counted on the CPU at batch 1; every count is linear in the batch."""
    nets, gen = gpu_networks(cfg, "cpu"), torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1
    t, target = torch.tensor([500]), torch.tensor([0])
    soft = torch.eye(cfg.clusters)[target]

    def guided_step(classifier):  # UNet forward, classifier forward and its gradient in x (Eq. 1)
        return counted_flops(lambda: side.guided_eps(nets["unet"], classifier, x, t, target, LAMBDA))

    def classifier_train(name, time_dependent):
        return counted_flops(lambda: classifier_train_step(nets[name], x, soft, gen, time_dependent))
    with torch.no_grad():
        forward = dict(unet_forward=counted_flops(lambda: nets["unet"](x, t)),
                       classifier_forward=counted_flops(lambda: nets["side"](x, t)))
    return dict(forward, unet_train=counted_flops(lambda: side.ddpm_loss(nets["unet"], x, gen, 1).backward()),
                side_classifier_train=classifier_train("side", True), cond_classifier_train=classifier_train("cond", False),
                side_guided_step=guided_step(nets["side"]), cond_guided_step=guided_step(nets["cond"]),
                params={name: params(net) for name, net in nets.items()})


def stage(name, items, unit, per_item, rate, measured_kind, splits) -> dict:
    return dict(stage=name, items=items, unit=unit, flops=items * per_item, rate=rate, measured_kind=measured_kind,
                splits_over_gpus=splits)


def stage_work(cfg: side.Config, flops: dict) -> list:
    """Every stage of one run: its work, the throughput it runs at (bf16 GPU work, the search's fp32
    matmul, scikit-learn's k-means on the CPU), and whether it splits over GPUs (DDP training and
    sharded sampling do; the classifiers, k-means and the search run in one process)."""
    sample_steps = side.parse_sampler(cfg.sampler)[1]  # Part 1
    extract_steps = side.parse_sampler(cfg.extract_sampler or cfg.sampler)[1]  # Part 2, every row
    steps, pairs, pixels = cfg.n_gen * extract_steps, cfg.n_gen * cfg.n, 3 * cfg.image_size ** 2
    clf_images = cfg.clf_steps * cfg.clf_batch
    return [stage("DDPM training", cfg.train_steps * cfg.batch_size, "images", flops["unet_train"], "bf16", "train", True),
            stage("N_syn sampling", cfg.n_syn * sample_steps, "image-steps", flops["unet_forward"], "bf16",
                  "unguided", True),
            stage("k-means on pixels (CPU)", KMEANS_ITERATIONS * cfg.n_syn * cfg.clusters, "distances", 2 * pixels,
                  "cpu", None, False),
            stage("classifier p(y|x_t,t) (side)", clf_images, "images", flops["side_classifier_train"], "bf16",
                  "classifier", False),
            stage("classifier p(y|x) (cond)", clf_images, "images", flops["cond_classifier_train"], "bf16",
                  "classifier", False),
            stage("generate uncond", steps, "image-steps", flops["unet_forward"], "bf16", "unguided", True),
            stage("generate cond", steps, "image-steps", flops["cond_guided_step"], "bf16", "guided", True),
            stage("generate side", steps, "image-steps", flops["side_guided_step"], "bf16", "guided", True),
            stage(f"nearest neighbours ({len(METHODS)} methods)", len(METHODS) * pairs, "pairs", 2 * pixels, "fp32",
                  "search", False)]


def host_merge_ns_per_pair() -> float:
    """side.nearest_neighbours merges each block's distances into the k nearest on the CPU. Its cost
    per pair, measured on this CPU with 1-pixel images (so the distance matmul costs nothing)."""
    rng = np.random.default_rng(0)
    generated, train = (rng.integers(0, 256, (size, 1, 1, 1), dtype=np.uint8) for size in (2048, 4096))
    side.nearest_neighbours(generated[:256], train, side.CARLINI_NEIGHBOURS)  # warm-up
    start = time.perf_counter()
    side.nearest_neighbours(generated, train, side.CARLINI_NEIGHBOURS)
    return 1e9 * (time.perf_counter() - start) / (len(generated) * len(train))


def search_overhead_s(cfg: side.Config, pairs: int, args) -> float:
    """What the search's FLOPs leave out: the host-side merge (measured, host_merge_ns_per_pair), the
    distances copied back (4 bytes a pair) and the training images re-sent for every block of 1,024
    generations (pixels / 1,024 bytes a pair), at an ASSUMED host-device bandwidth."""
    bytes_per_pair = 4 + 3 * cfg.image_size ** 2 / 1024
    return pairs * (args.host_ns_per_pair * 1e-9 + bytes_per_pair / (args.pcie_gbs * 1e9))


def predict(cfg: side.Config, flops: dict, args, measured: dict | None) -> list:
    """Seconds per stage: FLOPs / ASSUMED rate on one GPU and on args.gpus (ideal scaling where the
    stage splits), and FLOPs / the rate measured for that kind of step when there is one."""
    rates = dict(bf16=args.tflops * 1e12, fp32=args.fp32_tflops * 1e12, cpu=args.cpu_gflops * 1e9)
    rows = stage_work(cfg, flops)
    for row in rows:
        row["predicted_s"] = row["flops"] / rates[row["rate"]]
        if row["measured_kind"] == "search":
            row["predicted_s"] += search_overhead_s(cfg, row["items"], args)
        row["predicted_multi_gpu_s"] = row["predicted_s"] / (args.gpus if row["splits_over_gpus"] else 1)
        if measured and row["measured_kind"] == "search":
            row["from_measured_rate_s"] = row["items"] * measured["search"]["ns_per_pair"] * 1e-9
        elif measured and row["measured_kind"] in measured:
            row["from_measured_rate_s"] = row["flops"] / (measured[row["measured_kind"]]["tflops"] * 1e12)
    return rows


def timed_ms(step, repeats: int, device, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return 1000 * (time.perf_counter() - start) / repeats


def classifier_stepper(net, cfg, device):
    """One step of side.train_classifier (bf16 autocast on CUDA, AdamW) on random images."""
    net.train()
    opt, gen = torch.optim.AdamW(net.parameters(), lr=cfg.clf_lr), torch.Generator().manual_seed(0)
    x0_all = torch.rand(1024, 3, cfg.image_size, cfg.image_size, generator=gen).to(device) * 2 - 1
    soft = torch.eye(cfg.clusters, device=device)[torch.randint(cfg.clusters, (1024,), generator=gen).to(device)]

    def step():
        batch = torch.randint(len(x0_all), (cfg.clf_batch,), generator=gen).to(device)
        opt.zero_grad(set_to_none=True)
        classifier_train_step(net, x0_all[batch], soft[batch], gen, True)
        opt.step()
    return step


def sampling_stepper(unet, classifier, cfg, batch: int, device):
    """One step of side.sample at t = 500: guided_eps (unguided when classifier is None), then DDIM."""
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    t = torch.full((batch,), 500, device=device)
    targets = torch.randint(cfg.clusters, (batch,), device=device)
    guidance = LAMBDA if classifier is not None else 0.0
    return lambda: side.reverse_step(x, side.guided_eps(unet, classifier, x, t, targets, guidance),
                                     500, 480, 0.0, 0)  # DDIM, eta = 0


def measure_gpu(cfg: side.Config, flops: dict, device, repeats: int) -> dict:
    """ms per step at the batch side.py uses, achieved TFLOP/s (counted FLOPs / time), peak memory."""
    nets = gpu_networks(cfg, device)
    small = dataclasses.replace(cfg, n=1024)  # a step's cost does not depend on n
    jobs = [("train", lambda b: training_stepper(nets["unet"], lambda m, x, t: m(x, t),
                                                 dataclasses.replace(small, batch_size=b), 3, device),
             cfg.batch_size, flops["unet_train"]),
            ("classifier", lambda b: classifier_stepper(nets["side"], dataclasses.replace(cfg, clf_batch=b), device),
             cfg.clf_batch, flops["side_classifier_train"]),
            ("unguided", lambda b: sampling_stepper(nets["unet"].eval(), None, cfg, b, device),
             side.sampling_batch(device, cfg.image_size, guided=False), flops["unet_forward"]),
            ("guided", lambda b: sampling_stepper(nets["unet"].eval(), nets["side"].eval(), cfg, b, device),
             side.sampling_batch(device, cfg.image_size, guided=True), flops["side_guided_step"])]
    results = {}
    for name, make, batch, per_image in jobs:
        print(f"  measure {name} ({cfg.image_size} px) ...", flush=True)
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        first_batch = batch
        while True:  # halve the batch until it fits, and say so: side.sample would run out of memory
            try:
                ms = timed_ms(make(batch), repeats, device)
                break
            except torch.cuda.OutOfMemoryError:
                if batch == 1:
                    raise
                torch.cuda.empty_cache()
                batch //= 2
        results[name] = dict(batch=batch, ms_per_step=ms, tflops=per_image * batch / ms / 1e9,
                             peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else float("nan"),
                             out_of_memory_at=None if batch == first_batch else first_batch)
    results["search"] = measure_search(cfg, device)
    return results


def measure_search(cfg: side.Config, device) -> dict:
    """side.nearest_neighbours on random images at up to 8,192 x 4,096 pairs; fp32 FLOP rate of it."""
    rng = np.random.default_rng(0)
    shape = (cfg.image_size, cfg.image_size, 3)
    generated = rng.integers(0, 256, (min(cfg.n_gen, 8192), *shape), dtype=np.uint8)
    train = rng.integers(0, 256, (min(cfg.n, 4096), *shape), dtype=np.uint8)
    side.nearest_neighbours(generated[:64], train[:256], side.CARLINI_NEIGHBOURS, device)  # warm-up
    sync(device)
    start = time.perf_counter()
    side.nearest_neighbours(generated, train, side.CARLINI_NEIGHBOURS, device)
    seconds = time.perf_counter() - start
    pairs = len(generated) * len(train)
    return dict(n_gen=len(generated), n_train=len(train), seconds=seconds, ns_per_pair=1e9 * seconds / pairs,
                tflops=2 * np.prod(shape) * pairs / seconds / 1e12)


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def pflop(flops: float) -> str:
    return f"{flops / 1e15:,.1f}" if flops >= 1e15 else f"{flops / 1e15:.2g}"


def gpu_markdown(results: dict) -> str:
    a, out = results["assumptions"], []
    for c in results["commands"]:
        f, p, measured = c["flops_per_image"], c["flops_per_image"]["params"], c.get("measured")
        g = lambda key: f"{f[key] / 1e9:,.1f}"
        out += [f"#### {c['name']}: {c['config']}", "",
                f"Parameters: UNet {p['unet']:,}, classifier {p['side']:,} (time-dependent), {p['cond']:,} (cond). "
                f"GFLOPs per image: UNet forward {g('unet_forward')}, training step {g('unet_train')} "
                f"({f['unet_train'] / f['unet_forward']:.2f}x forward); classifier forward {g('classifier_forward')}, "
                f"training step {g('side_classifier_train')}; guided step (UNet forward + classifier forward and "
                f"gradient in x) {g('side_guided_step')}.", ""]
        header = ["stage", "work", "PFLOP", "predicted, 1 GPU", f"predicted, {a['gpus']} GPUs"]
        rows = [[r["stage"], f"{r['items']:,} {r['unit']}", pflop(r["flops"]), duration(r["predicted_s"]),
                 duration(r["predicted_multi_gpu_s"]) + ("" if r["splits_over_gpus"] else " (one process)")]
                for r in c["stages"]]
        totals = [sum(r[k] for r in c["stages"]) for k in ("predicted_s", "predicted_multi_gpu_s")]
        rows.append(["total", "", "", duration(totals[0]), duration(totals[1])])
        if measured:
            header.append("at the measured rate, 1 GPU")
            for row, r in zip(rows, c["stages"]):
                row.append(duration(r["from_measured_rate_s"]) if "from_measured_rate_s" in r else "")
            rows[-1].append(duration(sum(r.get("from_measured_rate_s", 0) for r in c["stages"])) + " (GPU stages)")
            out += table(["measured step", "batch", "ms / step", "achieved TFLOP/s", "peak GiB"],
                         [[k, str(m["batch"]) + (f" ({m['out_of_memory_at']} ran out of memory)"
                                                  if m["out_of_memory_at"] else ""),
                           f"{m['ms_per_step']:,.1f}", f"{m['tflops']:,.1f}", f"{m['peak_gib']:,.1f}"]
                          for k, m in measured.items() if k != "search"]) + [""]
            s = measured["search"]
            out += [f"Search measured: {s['n_gen']:,} x {s['n_train']:,} pairs in {s['seconds']:.2f} s "
                    f"({s['ns_per_pair']:.2f} ns per pair, {s['tflops']:.1f} fp32 TFLOP/s).", ""]
        out += table(header, rows) + [""]
    out += [f"PREDICTIONS, not measurements: GPU stages at an ASSUMED sustained {a['tflops']:g} TFLOP/s in bf16 "
            f"({a['tflops'] / 790:.0%} of the 790 TFLOP/s an H200 gave on an 8192^3 bf16 matmul), the search's fp32 "
            f"matmul at {a['fp32_tflops']:g} TFLOP/s, k-means at {a['cpu_gflops']:g} CPU GFLOP/s over an assumed "
            f"{KMEANS_ITERATIONS} Lloyd iterations (3 inits x 50). The search adds its host-side merge, "
            f"{a['host_ns_per_pair']:.1f} ns per pair as measured on this CPU with {a['cpu_threads']} torch threads, "
            f"and its copies at an assumed {a['pcie_gbs']:g} GB/s. The {a['gpus']}-GPU column assumes ideal scaling "
            "of DDPM training (DDP) and of sampling (sharded by generation index); the classifiers, k-means and the "
            "search stay in one process. side.guided_eps takes the classifier's gradient in fp32 (TF32 convolutions "
            "on CUDA), so the bf16 rate is optimistic for guided steps. Memorization check, figures and data loading "
            "are left out."]
    return "\n".join(out)


def gpu_main(args):
    """--profile gpu: count, predict, and with --measure time the real-size networks on CUDA."""
    if args.measure and not (torch.cuda.is_available() or args.dry_run):
        raise SystemExit("bench.py --measure needs a CUDA device; --profile gpu without --measure predicts only")
    os.environ["TQDM_DISABLE"] = "1"
    device = side.resolve_device("auto") if args.measure else None
    args.host_ns_per_pair = host_merge_ns_per_pair()
    assumptions = dict(tflops=args.tflops, fp32_tflops=args.fp32_tflops, cpu_gflops=args.cpu_gflops, gpus=args.gpus,
                       pcie_gbs=args.pcie_gbs, host_ns_per_pair=args.host_ns_per_pair,
                       cpu_threads=torch.get_num_threads())
    results = dict(assumptions=assumptions, commands=[], machine=dict(
        torch=torch.__version__, cpu=cpu_name(), gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        dry_run=args.dry_run))
    for name, overrides in GPU_COMMANDS:
        cfg = gpu_config({**overrides, **(TOY if args.dry_run else {})})
        print(f"counting FLOPs: {name} ...", flush=True)
        flops = flops_per_image(cfg)
        measured = measure_gpu(cfg, flops, device, args.windows or 5) if device else None
        results["commands"].append(dict(
            name=name, flops_per_image=flops, measured=measured, stages=predict(cfg, flops, args, measured),
            config=f"n {cfg.n}, {cfg.image_size} px, channels {cfg.channels}, {cfg.train_steps:,} steps x batch "
                   f"{cfg.batch_size}, N_syn {cfg.n_syn:,}, K {cfg.clusters}, classifiers {cfg.clf_steps:,} x "
                   f"{cfg.clf_batch}, N_G {cfg.n_gen:,} per method, Part 1 {cfg.sampler}, "
                   f"Part 2 {cfg.extract_sampler or cfg.sampler}"))
    text = ("DRY RUN (toy networks): the numbers below mean nothing.\n\n" if args.dry_run else "") + gpu_markdown(results)
    print(text)
    Path(args.out).write_text(json.dumps(dict(results, markdown=text), indent=1))
    print(f"\nwrote {args.out}")


def cpu_name() -> str:
    names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
             if l.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return names[0] if names else platform.machine()


def main(argv=None):
    args = parse_args(argv)
    if args.profile == "gpu":
        return gpu_main(args)
    device = side.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = args.windows or (3 if args.quick else 5)
    fractions = [float(f) for f in (args.nn_scale or ("0.0625,0.125" if args.quick else "0.125,0.25,0.5")).split(",")]
    os.environ["TQDM_DISABLE"] = "1"  # no progress bars inside timed calls (tqdm reads it)
    import diffusers
    load = lambda: " ".join(f"{x:.1f}" for x in os.getloadavg())
    machine = dict(cpu=cpu_name(), cores=os.cpu_count(), torch_threads=torch.get_num_threads(), device=str(device),
                   torch=torch.__version__, diffusers=diffusers.__version__, load_before=load())
    results, seconds = dict(machine=machine, args=vars(args)), {}
    sections = [("training", lambda: [bench_training(d, c, device, windows, 5 if args.quick else 20)
                                      for d, c in (("digits", 1), ("cifar10", 3))]),
                ("sampling", lambda: [bench_sampling(d, c, device, max(1, windows - 2), count)
                                      for d, c, count in (("digits", 1, 256), ("cifar10", 3, 128))]),
                ("search", lambda: bench_search(fractions, device)), ("end_to_end", lambda: end_to_end(args.report))]
    for name, run in sections:
        print(f"{name} ...", flush=True)
        start = time.perf_counter()
        results[name] = run()
        seconds[name] = round(time.perf_counter() - start, 1)
    machine["load_after"], results["bench_seconds"] = load(), seconds
    table = markdown(results)
    print(table)
    Path(args.out).write_text(json.dumps(dict(results, markdown=table), indent=1))
    print(f"\nwrote {args.out} (bench sections, s: {seconds})")


if __name__ == "__main__":
    main()
