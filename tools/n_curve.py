"""The n-curve on the tuning seed: how many distinct training images uncond and SIDE copy as the
training set grows, with K and lambda tuned per n on the tuning seed (never a reported seed).

For every n it trains one DDPM (train steps proportional to n), then for every K reruns labels and
classifiers and sweeps lambda, reusing the cached DDPM. Settings run in parallel processes (useful
on a GPU, where these tiny networks leave the card mostly idle). Writes <out>/n_curve.json and
<out>/n_curve.md.

    OMP_NUM_THREADS=1 python tools/n_curve.py --out runs/n_curve --device cpu --seed 100 \
        --sizes 64,128,256 --clusters 32,64 --methods uncond,side     # docs/n_curve.md
    python tools/n_curve.py --out runs/n_curve --device cuda --jobs 8

Torch's numbers depend on the thread count: fix OMP_NUM_THREADS to compare with docs/n_curve.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_one(n: int, steps: int, clusters: list[int], args) -> dict:
    """One n: train once, then a lambda sweep per K (each K's sweep.json kept)."""
    folder = Path(args.out) / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for k in clusters:
        command = [sys.executable, str(ROOT / "experiments.py"), "--seed", str(args.seed), "--n", str(n),
                   "--train-steps", str(steps), "--clusters", str(k), "--device", args.device,
                   "--methods", args.methods, "--sweep", f"guidance={args.grid}", "--out", str(folder),
                   *args.extra]
        with open(folder / f"log_K{k}.txt", "w") as log:
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        if code != 0:
            results[k] = dict(error=f"exit {code}, see {folder / f'log_K{k}.txt'}")
            continue
        shutil.copy(folder / "sweep.json", folder / f"sweep_K{k}.json")
        results[k] = json.loads((folder / "sweep.json").read_text())
    return dict(n=n, steps=steps, sweeps=results)


def collect(out: Path, n: int, steps: int) -> dict:
    """The sweeps already written under out/n<n>/ (keyed by K)."""
    sweeps = {int(p.stem.split("_K")[1]): json.loads(p.read_text())
              for p in sorted((out / f"n{n}").glob("sweep_K*.json"))}
    return dict(n=n, steps=steps, sweeps=sweeps)


def best_setting(entry: dict, method: str) -> dict | None:
    """The (K, lambda) with the highest Gu memorized fraction for `method` (ties: smaller lambda)."""
    best = None
    for k, sweep in entry["sweeps"].items():
        for row in sweep.get("rows", []):
            summary = row.get(method)
            if summary is None:
                continue
            key = (summary["memorized_fraction"], -row["value"])
            if best is None or key > best["key"]:
                best = dict(key=key, K=int(k), guidance=row["value"], summary=summary)
    return best


def markdown(entries: list[dict], methods: list[str]) -> str:
    head = ("| n | train steps | method | K | lambda | Gu mem. % | Gu unique | unique / n | "
            "Low AMS | Low UMS | Mid UMS | High UMS |")
    lines = [head, "|" + " --- |" * 12]
    for entry in entries:
        for method in methods:
            best = best_setting(entry, method)
            if best is None:
                continue
            s = best["summary"]
            k, lam = ("-", "0") if method == "uncond" else (best["K"], f"{best['guidance']:g}")
            lines.append(f"| {entry['n']} | {entry['steps']} | {method} | {k} | {lam} | "
                         f"{100 * s['memorized_fraction']:.2f} | {s['unique_memorized']} | "
                         f"{s['unique_memorized'] / entry['n']:.2f} | {s['ams_low']:.2f} | "
                         f"{s['ums_low']:.2f} | {s['ums_mid']:.2f} | {s['ums_high']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/n_curve")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=100, help="the tuning seed (never reported)")
    parser.add_argument("--sizes", default="64,128,256,512", help="training-set sizes n")
    parser.add_argument("--steps-per-image", type=float, default=1000 / 64,
                        help="DDPM steps per training image (the default run: 1000 for 64)")
    parser.add_argument("--clusters", default="32,64,128", help="K values tried per n")
    parser.add_argument("--grid", default="0.3,1,3,10,30", help="lambda values tried per K")
    parser.add_argument("--methods", default="uncond,cond,side")
    parser.add_argument("--jobs", type=int, default=1, help="settings run in parallel")
    parser.add_argument("--summarize-only", action="store_true",
                        help="only tabulate the sweep_K*.json files already under --out")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="more experiments.py flags, after --")
    args = parser.parse_args()
    args.extra = [a for a in args.extra if a != "--"]
    sizes = [int(v) for v in args.sizes.split(",")]
    clusters = [int(v) for v in args.clusters.split(",")]
    out = Path(args.out)
    if args.summarize_only:  # what finished of an earlier (perhaps interrupted) run
        entries = [collect(out, n, round(n * args.steps_per_image)) for n in sizes]
    else:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_one, n, round(n * args.steps_per_image), clusters, args)
                       for n in sizes]
            entries = sorted((f.result() for f in futures), key=lambda e: e["n"])
    (out / "n_curve.json").write_text(json.dumps(entries, indent=1))
    table = markdown(entries, args.methods.split(","))
    (out / "n_curve.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
