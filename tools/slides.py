"""Draw the slides of theory.md as PNG files in docs/, from the toys and the repository alone.

    OMP_NUM_THREADS=1 python tools/slides.py            # all four, about half a minute on one core
    OMP_NUM_THREADS=1 python tools/slides.py lambda     # only the named ones

Writes docs/slide_pipeline.png (Algorithm 1 as boxes and arrows), docs/slide_mechanism.png (the
1-D toy of theory.md section 4.1: density, k-means cells, copy rate against lambda),
docs/slide_theorem1.png (the Theorem 1 gap against epsilon on the 2-D toy of section 3.3) and
docs/slide_lambda.png (Gu memorized % against lambda on the digits tune seed, read from the table
in docs/results_digits.md). It needs no run folder: the toys are computed here by experiments.py's
own functions (`mechanism_tables()`, `theorem1_table()`), deterministic for seed 0.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import experiments  # noqa: E402
import side  # noqa: E402

DOCS = ROOT / "docs"
SIZE, DPI = (12, 6.75), 110  # 16:9, 1320 x 742 pixels


def save(fig, name: str) -> Path:
    path = DOCS / f"slide_{name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT)}")
    return path


def box(ax, x, y, text, colour, w=0.2, h=0.17):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.012",
                                facecolor=colour, edgecolor="0.25", linewidth=1.2))
    ax.text(x, y, text, ha="center", va="center", fontsize=11.5)


def arrow(ax, start, end, text="", dashed=False, offset=(0.0, 0.03), ha="center"):
    ax.annotate("", xy=end, xytext=start,
                arrowprops=dict(arrowstyle="-|>", linewidth=1.6, color="0.2",
                                linestyle="--" if dashed else "-", shrinkA=3, shrinkB=3))
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text,
                ha=ha, va="center", fontsize=10, color="0.25")


def slide_pipeline():
    """Algorithm 1 with the code that does each step; the training set enters only twice."""
    fig, ax = plt.subplots(figsize=SIZE)
    ax.set_xlim(0, 1), ax.set_ylim(0, 1), ax.axis("off")
    data, attack, score = "#f6d6c8", "#d7e6f5", "#dff0d8"
    w, top, low = 0.18, 0.76, 0.38
    box(ax, 0.11, top, "training set D\n(private)", data, w)
    box(ax, 0.37, top, "target DPM\ntrain_ddpm()", data, w)
    box(ax, 0.63, top, "N_syn samples\nsample()\n(line 1)", attack, w)
    box(ax, 0.89, top, "features, k-means,\ncohesion filter\nsurrogate_labels()\n(lines 2-5)",
        attack, w, 0.24)
    box(ax, 0.89, low, "time-dependent\nclassifier\np(c | x_t, t)\ntrain_classifier()\n"
        "(line 6, Eq. 2)", attack, w, 0.28)
    box(ax, 0.55, low, "guided sampling,\nN_G per row\nguided_eps()\n(lines 16-26, Eq. 1)",
        attack, w, 0.24)
    box(ax, 0.21, low, "memorization check\nagainst D\nevaluate()\n(Eq. 6-9)", score, w, 0.24)
    arrow(ax, (0.20, top), (0.28, top))
    arrow(ax, (0.46, top), (0.54, top))
    arrow(ax, (0.72, top), (0.80, top))
    arrow(ax, (0.89, top - 0.125), (0.89, low + 0.145), "labels D_syn", offset=(0.012, 0), ha="left")
    arrow(ax, (0.80, low), (0.64, low), "gradient of\nlog p(c | x_t)", offset=(0, 0.06))
    arrow(ax, (0.40, top - 0.09), (0.52, low + 0.125), "eps_theta\n(white box)", offset=(0.015, 0.0),
          ha="left")
    arrow(ax, (0.46, low), (0.30, low), "D_ext", offset=(0, 0.04))
    arrow(ax, (0.11, top - 0.09), (0.19, low + 0.125), "scoring\nonly", dashed=True,
          offset=(-0.015, 0), ha="right")
    ax.text(0.5, 0.09, "The attacker (blue) uses the model and its own samples only. The "
            "training set (red) trains the target,\nand is read again only to score the "
            "generations (green): Gu et al.'s d1/d2 < 1/3, Carlini's normalized L2, AMS/UMS.",
            ha="center", fontsize=11.5)
    ax.set_title("SIDE, Algorithm 1 of arXiv:2410.02467 v7: surrogate labels, a noise-aware "
                 "classifier, guided sampling\n(function names: side.py)", fontsize=14)
    return save(fig, "pipeline")


def toy_density(x: np.ndarray) -> np.ndarray:
    mean, width, weight = (v.numpy() for v in experiments.mech_components())
    return sum(a * np.exp(-((x - m) / s) ** 2 / 2) / (s * np.sqrt(2 * np.pi))
               for m, s, a in zip(mean, width, weight))


def slide_mechanism():
    """Left: the toy's density, its training points and the K = 8 k-means cells. Right: the copy
    rate against lambda (Exercise 1, table (a))."""
    tables = experiments.mechanism_tables()
    synthetic, _ = experiments.mech_sample(2000, 0, stream=side.STREAM_SYNTHETIC)
    edges, _ = experiments.mech_cells(synthetic, 8, 0)
    fig, (left, right) = plt.subplots(1, 2, figsize=SIZE, gridspec_kw=dict(width_ratios=[1.2, 1]))
    x = np.linspace(-1.1, 1.1, 20001)
    left.fill_between(x, toy_density(x), color="#9ecae1", label="model density p(x)")
    left.plot(experiments.MECH_POINTS, np.zeros(8), "kv", markersize=9,
              label="training points x_i")
    for e in edges[1:-1]:
        left.axvline(e, color="#d62728", linewidth=1.2, linestyle="--")
    left.plot([], [], color="#d62728", linestyle="--", label="k-means cell edges, K = 8")
    left.set_xlim(-1.1, 1.1), left.set_xlabel("x"), left.set_ylabel("density")
    left.set_title("A memorizing model in 1-D: a spike at each training point\n"
                   "(weight 0.5) on a broad part (novel samples, weight 0.5)")
    left.set_ylim(0, 2.35), left.legend(loc="upper center", fontsize=10, ncol=2)
    lams = [r["lam"] for r in tables["lam"]]
    shown = [0.3 if lam == 0 else lam for lam in lams]  # lambda 0 drawn at the left edge
    right.plot(shown, [r["k8"] for r in tables["lam"]], "o-", color="#1f77b4",
               label="K = 8 (one point per cell), 50 DDIM steps")
    right.plot(shown, [r["k4"] for r in tables["lam"]], "s-", color="#ff7f0e",
               label="K = 4 (two points per cell), 50 DDIM steps")
    fine = [(s, r["fine"]) for s, r in zip(shown, tables["lam"]) if not np.isnan(r["fine"])]
    right.plot(*zip(*fine), "D--", color="#1f77b4", markerfacecolor="white",
               label=f"K = 8, {tables['steps']} DDIM steps")
    right.axhline(tables["exact"], color="0.3", linestyle=":",
                  label=f"exact copy rate of p ({tables['exact']:.3f})")
    right.set_xscale("log"), right.set_ylim(0, 1.02)
    right.set_xticks(shown, ["0"] + [f"{v:g}" for v in lams[1:]])
    right.set_xlabel("guidance scale lambda (exact classifier p_t(c | x_t))")
    right.set_ylabel("copy rate (Gu: d1/d2 < 1/3)")
    right.set_title("lambda = 1 with fine steps adds almost nothing;\nlambda > 1 copies "
                    "where a cell holds one training point")
    right.legend(loc="lower left", fontsize=9.5)
    fig.suptitle("Why guidance toward a cluster copies (theory.md 4.1, Exercise 1; "
                 "exact densities, seed 0)", fontsize=14)
    fig.tight_layout()
    return save(fig, "mechanism")


def slide_theorem1():
    """The gap M(D_i; p_i, eps) - M(D_i; p, eps) against eps for the three labels of the 2-D toy,
    with its limit -KL(p_i || p) and the mass ceiling -log(1/w_i): left on a linear scale near
    the limit, right on a symmetric-log scale over the whole range."""
    epsilons = tuple(np.geomspace(0.01, 3.0, 16))
    rows = experiments.theorem1_table(epsilons=epsilons)
    fig, axes = plt.subplots(1, 2, figsize=SIZE)
    for ax in axes:
        for r, colour in zip(rows, ("#1f77b4", "#2ca02c", "#d62728")):
            ax.plot(epsilons, [r["gaps"][e] for e in epsilons], "o-", color=colour,
                    label=f"label {r['label']}: mass w = {r['weight']}, scale {r['scale']}")
            ax.axhline(r["neg_kl"], color=colour, linestyle="--", linewidth=1)
            ax.axhline(np.log(r["weight"]), color=colour, linestyle=":", linewidth=1)
        ax.axhline(0, color="k", linewidth=0.8)
        ax.set_xscale("log"), ax.set_xlabel("kernel width epsilon of Definition 1")
    left, right = axes
    left.plot([], [], "k--", linewidth=1, label="limit -KL(p_i || p) (the theorem)")
    left.plot([], [], "k:", linewidth=1, label="ceiling -log(1/w_i) (the label's mass)")
    left.set_ylim(-1.75, 0.4), left.set_ylabel("M(D_i; p_i, eps) - M(D_i; p, eps)   (nats)")
    left.set_title("Near the limit (linear scale): each gap tends to -KL,\njust above its "
                   "mass ceiling (overlap takes a little off)")
    left.legend(loc="center left", fontsize=10)
    right.set_yscale("symlog", linthresh=2)
    right.set_title("The whole range (symmetric-log scale): at large eps the gap\nturns "
                    "positive, the narrow label first")
    fig.suptitle("Theorem 1 (v7 Eq. 5) on a 2-D Gaussian mixture with perfect models "
                 "(theory.md 3.3; seed 0, |D_i| = 20,000)", fontsize=14)
    fig.tight_layout()
    return save(fig, "theorem1")


def tune_curve(path: Path) -> dict:
    """The tune seed's Gu memorized % by (method, sampler) and lambda, from the table of a
    protocol report ('| method | sampler | s / 512 | lambda 0 | ...')."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | sampler | s / 512"))
    lams = [float(c.split()[1]) for c in lines[start].strip("|").split("|")[3:]]
    curves = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        points = [(lam, float(v)) for lam, v in zip(lams, cells[3:]) if v]
        curves[(cells[0], cells[1])] = points
    return curves


def slide_lambda():
    """Gu memorized % against lambda on the digits tune seed 100, two samplers, from the table
    in docs/results_digits.md (the run behind the README's digits results)."""
    source = DOCS / "results_digits.md"
    curves = tune_curve(source)
    fig, ax = plt.subplots(figsize=SIZE)
    colours = {"side": "#d62728", "cond": "#1f77b4", "shuffled": "#7f7f7f", "uncond": "k"}
    for (method, sampler), points in curves.items():
        style = "-" if sampler.startswith("ddpm") else "--"
        if method == "uncond":
            ax.axhline(points[0][1], color="k", linestyle=style, linewidth=1,
                       label=f"uncond (lambda 0), {sampler}")
            continue
        lam, value = zip(*points)
        ax.plot(lam, value, "o" + style, color=colours.get(method, "C4"),
                label=f"{method}, {sampler}")
    grid = sorted({lam for points in curves.values() for lam, _ in points if lam > 0})
    ax.set_xscale("log"), ax.set_ylim(bottom=0)
    ax.set_xticks(grid, [f"{lam:g}" for lam in grid])
    ax.set_xlabel("guidance scale lambda (one seed: a difference of a few generations is noise)")
    ax.set_ylabel("Gu memorized % of 256 generations")
    ax.set_title("The lambda sweep on the digits tune seed 100 (never a reported seed), "
                 "N_G = 256 per point, one thread:\nside rises to the top of the grid; cond "
                 "and shuffled are best at its bottom (solid: 250 ancestral steps; dashed: "
                 "50 DDIM)", fontsize=12.5)
    ax.legend(loc="upper left", fontsize=10, ncol=2)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.text(0.99, 0.01, f"data: the tune-seed table of {source.relative_to(ROOT)}", ha="right",
             va="bottom", fontsize=9, color="0.4")
    return save(fig, "lambda")


SLIDES = {"pipeline": slide_pipeline, "mechanism": slide_mechanism,
          "theorem1": slide_theorem1, "lambda": slide_lambda}


def main(argv: list[str]) -> int:
    names = argv or list(SLIDES)
    unknown = [n for n in names if n not in SLIDES]
    if unknown:
        print(f"slides.py: unknown slide(s) {unknown}; choose from {list(SLIDES)}", file=sys.stderr)
        return 2
    for name in names:
        SLIDES[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
