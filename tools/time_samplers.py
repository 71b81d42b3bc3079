"""Time the extraction samplers on a finished run folder: seconds per 512 generations, unguided
(uncond) and guided by the run's side classifier, each sampler after the other in one process,
so that their ratios come from one run on one machine.

    OMP_NUM_THREADS=1 python tools/time_samplers.py runs/ex10 ddim50 ddpm50 ddpm250 ddpm1000

The folder needs ddpm.pt, labels.npz and classifier_side.pt (any run of side.py or experiments.py
with the side row). N_G = 256 per timing (one CPU batch), doubled for 512. Nothing is written.
"""
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import experiments  # noqa: E402
import side  # noqa: E402


def load_run(folder: Path):
    """The run's config, its EMA model and its side classifier, on the CPU."""
    saved = json.loads((folder / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(experiments.ExperimentConfig)}
    cfg = experiments.ExperimentConfig(**{k: v for k, v in saved.items() if k in fields})
    in_ch = np.load(folder / "train_subset.npz")["images"].shape[-1]
    model = side.build_unet(cfg, in_ch)
    model.load_state_dict(torch.load(folder / "ddpm.pt", map_location="cpu")["ema"])
    classifier = torch.load(folder / "classifier_side.pt", map_location="cpu", weights_only=False)["net"]
    return cfg, model.eval(), classifier.eval(), classifier.head[-1].out_features


def main() -> int:
    folder, samplers = Path(sys.argv[1]), sys.argv[2:] or ["ddim50", "ddpm50", "ddpm250"]
    cfg, model, classifier, classes = load_run(folder)
    cpu, count = torch.device("cpu"), 256
    targets = side.draw_targets(cfg.seed, count, classes)
    guidance = side.row_lambdas(cfg).get("side", 10.0)
    rows = []
    for name in samplers:
        seconds = {}
        for row, guide in (("uncond", None), ("side", classifier)):
            start = time.perf_counter()
            side.sample(model, cfg, count, cpu, classifier=guide, targets=targets,
                        guidance=guidance if guide is not None else 0.0, sampler=name,
                        desc=f"{name} {row}")
            seconds[row] = (time.perf_counter() - start) * 512 / count
        rows.append([name, f"{seconds['uncond']:.0f}", f"{seconds['side']:.0f}"])
    print("\n".join(side.table_lines(["sampler", "uncond: s / 512", f"side (lambda "
                                      f"{guidance:g}): s / 512"], rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
