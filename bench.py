"""bench.py: speed of side.py (issue 7). Prints Markdown tables and writes bench.json.

    python bench.py                      # about 7 minutes on one thread of a 2-core CPU
    python bench.py --quick              # about 2 minutes: fewer windows, smaller search sizes
    python bench.py --nn-scale 0.25,0.5,1 --report runs/digits-n64-8px/report.json

1. DDPM training throughput of side.UNet vs diffusers' UNet2DModel of a similar parameter count,
   same batch, resolution, dtype, device and process; timed windows interleaved, medians reported.
2. Sampling throughput of unguided and SIDE-guided DDIM (side.sample) at the same steps.
3. side.nearest_neighbours at the paper's scale (N_G = 50,000 vs n = 25,000 at 64x64x3, random
   uint8): time, peak resident memory over the baseline (the input arrays are data, not extra), and
   the scaling in N_G x n; sizes not measured are extrapolated and marked so.
4. The default run, stage by stage, read from its report.json (nothing is rerun).
diffusers and psutil are benchmark-only (requirements-bench.txt); side.py never imports them.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.nn.functional as F

import side

PAPER_N_GEN, PAPER_N_TRAIN, PAPER_SIZE = 50_000, 25_000, 64
DIFFUSERS_WIDTHS = {"32,64": (32, 56)}  # its up path has one more resnet per level: 64 -> 56 evens the count


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--quick", action="store_true", help="fewer timed windows and smaller search sizes (~2 min)")
    p.add_argument("--nn-scale", default=None, help="fractions of N_G and of n for the search, e.g. 0.25,0.5,1 "
                   "(work grows as the square) [0.125,0.25,0.5; quick: 0.0625,0.125]")
    p.add_argument("--report", default="runs/digits-n64-8px/report.json", help="report.json of a default run [%(default)s]")
    p.add_argument("--device", default="cpu", help="cpu | cuda [%(default)s]")
    p.add_argument("--windows", type=int, default=None, help="timed windows per measurement [5; quick: 3]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default, one per core) [0]")
    p.add_argument("--out", default="bench.json", help="where to write the raw numbers [%(default)s]")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def profile_cfg(dataset: str, device) -> side.Config:
    """side's own profile for (dataset, device): digits -> 8x8x1, cifar10 (CPU) -> 16x16x3."""
    return side.apply_profile(side.Config(dataset=dataset, device=device.type))


def diffusers_unet(cfg: side.Config, in_ch: int):
    from diffusers import UNet2DModel
    return UNet2DModel(sample_size=cfg.image_size, in_channels=in_ch, out_channels=in_ch,
                       block_out_channels=DIFFUSERS_WIDTHS[cfg.channels], layers_per_block=cfg.blocks,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                       norm_num_groups=8, attention_head_dim=None)  # one-head mid attention, as side's


def training_stepper(model, forward, cfg, in_ch, device):
    """One DDPM step (q_sample, MSE on eps, Adam) as side trains; EMA and checkpoints left out."""
    model.to(device).train()
    opt, diffusion = torch.optim.Adam(model.parameters(), lr=cfg.lr), side.Diffusion()
    gen = torch.Generator().manual_seed(0)
    x0_all = torch.rand(cfg.n, in_ch, cfg.image_size, cfg.image_size, generator=gen).to(device) * 2 - 1

    def step():  # the same calls, in the same order, as side.train_ddpm
        batch = torch.randint(len(x0_all), (cfg.batch_size,), generator=gen)
        t = torch.randint(side.T_STEPS, (cfg.batch_size,), generator=gen)
        noise = torch.randn((cfg.batch_size, *x0_all.shape[1:]), generator=gen).to(device)
        x0 = x0_all[batch.to(device)]
        with side.autocast(device):
            loss = F.mse_loss(forward(model, diffusion.q_sample(x0, t, noise), t.to(device)).float(), noise)
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
                                          guidance=cfg.guidance)}
    rates = interleaved_rates(jobs, count, windows, 0, device)  # the median absorbs a slow first window
    unguided, guided = statistics.median(rates["unguided"]), statistics.median(rates["guided"])
    return dict(config=f"{cfg.image_size}x{cfg.image_size}x{in_ch}, DDIM {cfg.sample_steps} steps, batch {count}, "
                       f"lambda {cfg.guidance}", unguided=unguided, guided=guided, cost_ratio=unguided / guided,
                params_classifier=params(clf), windows=rates)


def timed_peak(fn):
    """(seconds, peak RSS above the RSS just before the call, in bytes), RSS polled every 2 ms."""
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


def cpu_name() -> str:
    names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
             if l.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return names[0] if names else platform.machine()


def main(argv=None):
    args = parse_args(argv)
    device = side.resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = args.windows or (3 if args.quick else 5)
    fractions = [float(f) for f in (args.nn_scale or ("0.0625,0.125" if args.quick else "0.125,0.25,0.5")).split(",")]
    side.progress = functools.partial(side.tqdm, disable=True)  # no progress bars inside timed calls
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
