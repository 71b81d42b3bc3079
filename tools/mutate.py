"""Plant one-line bugs in a copy of side.py or experiments.py, one at a time, and check that the test
suite catches each.

Each mutation is (name, old, new): `old` must occur exactly once in its file (MUTATIONS: side.py,
EXPERIMENT_MUTATIONS: experiments.py) and is replaced by `new` in a copy of the project in a
temporary folder, where `python -m pytest -q -x` then runs. A bug is
caught when the suite fails; the first failing test is reported. Standard library only; slow (one
suite run per bug, stopping at the first failure), so it is not part of CI.

    OMP_NUM_THREADS=1 python tools/mutate.py                 # every mutation, a table at the end
    OMP_NUM_THREADS=1 python tools/mutate.py --only ema     # mutations whose name contains "ema"
    python tools/mutate.py --check                          # only check that every `old` is found
    OMP_NUM_THREADS=1 python tools/mutate.py --no-diffusers # as on a machine without diffusers

When a file changes, a mutation whose `old` text is gone stops the script with its name: edit
its `old` and `new` below to the new spelling of the same line.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTATIONS = [
    ("a resumed DDPM draws fresh batches (the saved generator ignored)",
     'gen.set_state(saved["rngs"][rank].cpu())',
     "pass"),
    ("a stopped DDPM saves the generator one step ahead of its weights",
     "value = stop.check(step, loss, checkpoint, lambda: save(step, rng))",
     "value = stop.check(step, loss, checkpoint, lambda: save(step, gen.get_state()))"),
    ("the decoder's skips bypass the encoder's attention",
     "skips[-1] = h  # a block's output, after its attention (as in DDPM)",
     "pass"),
    ("a stage file is reused although a setting it depends on changed",
     "        return None if diffs else data",
     "        return data"),
    ("a stage made with a setting the run no longer has is reused (one-way comparison)",
     "for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name)]",
     "for name in sorted(now) if then.get(name) != now.get(name)]"),
    ("a checkpoint trained with another network loads silently",
     "    check_compatible(trained_with, cfg, path, DATA_SETTINGS + DDPM_SETTINGS)",
     "    pass"),
    ("run() samples guided rows that have no lambda",
     "if any(row.classifier and row.guidance is None for row in rows):",
     "if False:"),
    ("k-means ignores the run's seed",
     "KMeans(n_clusters=clusters, n_init=3, random_state=seed)",
     "KMeans(n_clusters=clusters, n_init=3, random_state=0)"),
    # --- the three named bugs: sampler and classifier training lose the time of Eq. 1-2; held-out leak
    ("sampler asks the classifier at t = 0",
     "log_probs = F.log_softmax(classifier(x_in, t).float(), dim=1)",
     "log_probs = F.log_softmax(classifier(x_in, torch.zeros_like(t)).float(), dim=1)"),
    ("classifier trained with t = 0 for every input",
     "x_t, t, _ = DIFFUSION.noised(x0, gen)",
     "x_t, t, _ = DIFFUSION.noised(x0, gen, 0, 1)"),
    ("classifier trained on clean x_0 only",
     "return x_t, t.to(x0.device)",
     "return x0, t.to(x0.device)"),
    ("held-out accuracy measured on training samples",
     'accuracy_by_t(net, synthetic[held_out], labels["labels"][held_out], device, cfg.seed)',
     'accuracy_by_t(net, synthetic[~held_out], labels["labels"][~held_out], device, cfg.seed)'),
    # --- classifiers (section 6) and the threat model
    ("classifier also trained on the held-out samples",
     'train_classifier(cfg, synthetic[~held_out], labels["soft"][~held_out]',
     'train_classifier(cfg, synthetic, labels["soft"]'),
    ("classifier told another t than the noising t",
     "return x_t, t.to(x0.device)",
     "return x_t, (T_STEPS - 1 - t).to(x0.device)"),
    ("Cond classifier made time-dependent",
     '"cond": Method("cond", classifier="cond", time_dependent=False',
     '"cond": Method("cond", classifier="cond", time_dependent=True'),
    ("SIDE classifier made time-independent",
     '"side": Method("side", classifier="side", time_dependent=True)',
     '"side": Method("side", classifier="side", time_dependent=False)'),
    ("training images leak into the attacker's synthetic set",
     'STREAM_SYNTHETIC, desc="sample N_syn")))["images"]',
     'STREAM_SYNTHETIC, desc="sample N_syn")))["images"]; synthetic = np.concatenate('
     '[train["images"], synthetic[len(train["images"]):]])'),
    ("classifier learns another sample's label",
     "loss = soft_cross_entropy(net(x, t).float(), soft[batch])",
     "loss = soft_cross_entropy(net(x, t).float(), soft[batch.roll(1)])"),
    ("soft cross-entropy on probabilities, not log-probabilities",
     "return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()",
     "return -(targets * F.softmax(logits, dim=1)).sum(1).mean()"),
    ("classifier seed not fixed",
     "torch.manual_seed(cfg.seed + 1)",
     "torch.seed()"),
    ("accuracy_by_t always scores at t = 0",
     "x_t, t, _ = DIFFUSION.noised(x0, gen, low, high)",
     "x_t, t, _ = DIFFUSION.noised(x0, gen, 0, 1)"),
    # --- networks (section 1)
    ("time embedding ignores t",
     "angles = t.float()[:, None] * freqs[None]",
     "angles = 0 * t.float()[:, None] * freqs[None]"),
    ("self-attention mixes the samples of a batch",
     "reshape(b, 3, c, h * w).unbind(1)",
     "reshape(3, b, c, h * w).unbind(0)"),
    # --- diffusion maths (section 2) and the reverse step (section 4)
    ("q_sample noise scaled by 1 - abar_t, not its square root",
     "return a.sqrt() * x0 + (1 - a).sqrt() * noise",
     "return a.sqrt() * x0 + (1 - a) * noise"),
    ("beta schedule ends at 0.01",
     "beta_end: float = 0.02",
     "beta_end: float = 0.01"),
    ("the one noising function draws t = 0 only",
     "t = torch.randint(low, high or self.steps, (len(x0),), generator=gen)",
     "t = torch.randint(low, low + 1, (len(x0),), generator=gen)"),
    ("DDIM timesteps with trailing spacing",
     "return list(range(0, T_STEPS, T_STEPS // sample_steps))[::-1]",
     "return list(range(T_STEPS // sample_steps - 1, T_STEPS, T_STEPS // sample_steps))[::-1]"),
    ("x_0 estimate not clamped",
     "x0 = DIFFUSION.predicted_x0(x, eps, t_now).clamp(-1, 1)",
     "x0 = DIFFUSION.predicted_x0(x, eps, t_now)"),
    ("predicted x_0 skips the 1 / sqrt(abar_t) rescale",
     "return (x_t - (1 - a).sqrt() * eps) / a.sqrt()",
     "return x_t - (1 - a).sqrt() * eps"),
    ("raw eps kept next to the clamped x_0",
     "eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()",
     "eps = eps"),
    ("DDPM step variance beta_t instead of beta_tilde_t",
     "sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()",
     "sigma = eta * (1 - a_t / a_prev).sqrt()"),
    # --- DDPM training (section 3)
    ("DDPM regresses x_0 instead of eps",
     "t.to(x0.device)).float(), noise)",
     "t.to(x0.device)).float(), x0)"),
    ("DDPM model told t = 0",
     "t.to(x0.device)).float(), noise)",
     "(0 * t).to(x0.device)).float(), noise)"),
    ("EMA moves by decay instead of 1 - decay",
     "e.lerp_(p, 1 - decay)",
     "e.lerp_(p, decay)"),
    # --- sampling and guidance (section 4)
    ("guidance pushes away from the target",
     "return eps - guidance * (1 - DIFFUSION.abar(t.cpu(), x)).sqrt() * grad",
     "return eps + guidance * (1 - DIFFUSION.abar(t.cpu(), x)).sqrt() * grad"),
    ("guidance scaled by 1 - abar_t, not its square root",
     "return eps - guidance * (1 - DIFFUSION.abar(t.cpu(), x)).sqrt() * grad",
     "return eps - guidance * (1 - DIFFUSION.abar(t.cpu(), x)) * grad"),
    ("guidance toward class 0 whatever the target",
     "selected = log_probs[torch.arange(len(x), device=x.device), targets].sum()",
     "selected = log_probs[:, 0].sum()"),
    ("DDPM sampler without fresh noise (eta = 0)",
     'timesteps, eta = sampling_timesteps(sample_steps), float(kind == "ddpm")  # DDIM: eta = 0',
     "timesteps, eta = sampling_timesteps(sample_steps), 0.0"),
    ("every generation draws the same noise",
     "rngs = [sample_rng(cfg.seed, stream, i) for i in",
     "rngs = [sample_rng(cfg.seed, stream, 0) for i in"),
    ("random streams ignore their purpose",
     "np.random.SeedSequence([seed, stream, index])",
     "np.random.SeedSequence([seed, index])"),
    # --- surrogate labels (section 5)
    ("pixel features not centred",
     "flat = pixels / 255.0 - pixels.mean(0) / 255.0",
     "flat = pixels / 255.0"),
    ("a cluster with cohesion exactly tau is dropped",
     "kept = np.flatnonzero(cohesions >= cohesion)",
     "kept = np.flatnonzero(cohesions > cohesion)"),
    ("dropped members go to the farthest kept centroid",
     "similarity[:, nonempty].argmax(1)",
     "similarity[:, nonempty].argmin(1)"),
    ("cohesion measured against the mean centroid",
     "cosines = (features * centroids[kmeans.labels_]).sum(1)",
     "cosines = (features * centroids.mean(0)).sum(1)"),
    # --- extraction (section 7)
    ("one constant target cluster",
     "torch.randint(num_classes, (1,), generator=",
     "torch.randint(1, (1,), generator="),
    ("the last kept label is never a target",
     "torch.randint(num_classes, (1,), generator=",
     "torch.randint(max(1, num_classes - 1), (1,), generator="),
    ("guided methods sample with other seeds than the baseline",
     "images = sample(model, cfg, cfg.n_gen, device, STREAM_EVAL, classifier, targets,",
     "images = sample(model, cfg, cfg.n_gen, device, STREAM_EVAL + (classifier is not None), "
     "classifier, targets,"),
    # --- the run's rows and their lambdas (side.py, section 9)
    ("the shuffled row's classifier learns the unshuffled labels",
     "row_labels = row.relabel(cfg, labels, synthetic, train) if row.relabel else labels",
     "row_labels = labels"),
    ("a row's samples not keyed by its own lambda",
     "            guidance=row.guidance, extract_sampler=row.sampler)",
     "            extract_sampler=row.sampler)"),
    ("a row's samples not keyed by its own sampler",
     "            guidance=row.guidance, extract_sampler=row.sampler)",
     "            guidance=row.guidance)"),
    ("every row samples unguided: method_rows ignores --guidance",
     "guidance=guidance_for(cfg, table[name]),",
     "guidance=0.0,"),
    ("ancestral noise drawn for the batch, not per generation",
     "noise = per_sample_noise(rngs, shape, device) if eta > 0 else 0",
     "noise = torch.randn((len(rngs), *shape), generator=rngs[0]).to(device) if eta > 0 else 0"),
    ("ddpm<S> without fresh noise (eta = 0)",
     "kind, steps = name[:4], name[4:]",
     "kind, steps = 'ddim', name[4:]"),
    # --- memorization check (section 8)
    ("memorization scored against all but one training image",
     'memorization_metrics(data["images"], train_images, bands, device, similarity)',
     'memorization_metrics(data["images"], train_images[1:], bands, device, similarity)'),
    ("d2 is the 50th nearest, not the second",
     "d1, d2 = dist[:, 0], dist[:, second]",
     "d1, d2 = dist[:, 0], dist[:, -1]"),
    ("Gu's threshold 1/2 instead of 1/3",
     "GU_THRESHOLD = 1 / 3",
     "GU_THRESHOLD = 1 / 2"),
    ("the command line pickles __main__.Classifier, which experiments.py cannot load",
     "    sys.exit(side.main())",
     "    sys.exit(main())"),
]

# The same, planted in experiments.py: the controls, the protocol and torchrun's agreement.
EXPERIMENT_MUTATIONS = [
    ("a checkpoint trained on other dataset options loads silently",
     'side.check_compatible(self.checkpoint["config"], cfg, self.out / "ddpm.pt", DATA_FIELDS)',
     "pass"),
    ("a row's own extraction sampler ignored: Part 1's for every row",
     "return [dataclasses.replace(row, sampler=fixed_sampler(cfg, row.name))",
     "return [dataclasses.replace(row, sampler=cfg.sampler)"),
    ("torchrun: every rank draws the first block of generations",
     "mine = range(rank * count // ranks, (rank + 1) * count // ranks)",
     "mine = range(0, count // ranks)"),
    ("SeesPredictedX0 judges x_t, not the predicted x_0",
     "return self.classifier(x0_hat, t)",
     "return self.classifier(x, t)"),
    ("the shuffled control does not permute the labels",
     'return dict(labels, labels=labels["labels"][order], soft=labels["soft"][order])',
     "return dict(labels)"),
    ("oracle labels misaligned with the samples",
     "kept, labels = np.unique(index[:, 0], return_inverse=True)",
     "kept, labels = np.unique(index[::-1, 0], return_inverse=True)"),
    ("every row samples at the first guided row's lambda",
     'pinned = ",".join(f"{m}={v!r}" for m, v in choice["lambdas"].items())',
     'pinned = ",".join(f"{m}={next(iter(choice[\'lambdas\'].values()))!r}" for m in choice["lambdas"])'),
    ("lambda tuned on the first reported seed",
     "tune_cfg = dataclasses.replace(cfg, seed=cfg.tune_seed,",
     "tune_cfg = dataclasses.replace(cfg, seed=reported_seeds(cfg)[0],"),
    ("the tuned setting is the one with the fewest copies",
     "sampler, value = max(curve, key=score).split()",
     "sampler, value = min(curve, key=score).split()"),
    ("the sampler is ignored by the tuning (every run at Part 1's)",
     "chosen = {m: sampler if sampler_is_free(cfg, m) else fixed_sampler(cfg, m)",
     "chosen = {m: fixed_sampler(cfg, m)"),
    ("the reported seeds ignore the tuned samplers",
     "methods=\",\".join(rows), extract_sampler=samplers))",
     "methods=\",\".join(rows), extract_sampler=\"\"))"),
    ("side compared with the weaker uncond",
     'strongest = max(unconds, key=lambda m: memorized[m]["memorized_fraction"], default=None)',
     'strongest = min(unconds, key=lambda m: memorized[m]["memorized_fraction"], default=None)'),
    ("side compared with uncond at uncond's own sampler, not side's",
     'same = [m for m in unconds if samplers[m] == samplers["side"]]',
     'same = [m for m in unconds if m == "uncond"]'),
    ("the paired interval resamples each row on its own",
     "top, bottom = flags[pick].sum(1), base_flags[pick].sum(1)",
     "top, bottom = flags[pick].sum(1), base_flags[pick[::-1, ::-1]].sum(1)"),
    ("rows from other seeds accepted as paired",
     "if not np.array_equal(seeds, base_seeds):",
     "if len(seeds) != len(base_seeds):"),
    ("a tune seed among the reported seeds is accepted",
     "if methods_to_tune(cfg) and cfg.tune_seed in seeds:",
     "if methods_to_tune(cfg) and cfg.tune_seed in seeds and False:"),
    ("aggregate mean taken over the methods, not the seeds",
     'summary = {m: {k: spread([r["methods"][m][k] for r in reports.values()]) for k in first[m]}',
     'summary = {m: {k: spread([row[k] for row in first.values()]) for k in first[m]}'),
    ("seed spread minimum is the mean",
     "min=float(np.min(values))",
     "min=float(np.mean(values))"),
    ("ever-extracted counts subset positions, not dataset indices",
     'copied |= set(indices[nn["nn_index"][nn["nn_ratio"] < side.GU_THRESHOLD]].tolist())',
     'copied |= set(nn["nn_index"][nn["nn_ratio"] < side.GU_THRESHOLD].tolist())'),
    ("the cond_x0 row judges x_t, not the predicted x_0",
     "judge=SeesPredictedX0),",
     "judge=None),"),
    ("aggregate ratios written upside down (row / side)",
     "f\"side / {what}\": dict(paired_ratio(*side_flags, *memorized_flags(folders[seed], row)),",
     "f\"side / {what}\": dict(paired_ratio(*memorized_flags(folders[seed], row), *side_flags),"),
    ("aggregate compares side with the weaker Cond variant",
     'best_cond = max(conds, key=lambda m: summary[m]["memorized_fraction"]["mean"], default=None)',
     'best_cond = min(conds, key=lambda m: summary[m]["memorized_fraction"]["mean"], default=None)'),
    ("a problem found on rank 1 alone is ignored",
     "found = [(rank, p) for rank, p in enumerate(gather_all(problem)) if p]",
     "found = [(rank, p) for rank, p in enumerate(gather_all(problem)) if p and rank == 0]"),
    ("the toy's sampler ignores its number of steps (always 50)",
     "kind, steps = side.parse_sampler(sampler)",
     "kind, steps = side.parse_sampler(sampler)[0], 50"),
    ("the shuffled permutation ignores the seed",
     "np.random.default_rng([cfg.seed, STREAM_SHUFFLE])",
     "np.random.default_rng([0, STREAM_SHUFFLE])"),
    ("torchrun's process count not checked against --tune-n-gen",
     '"--tune-n-gen": cfg.tune_n_gen if methods_to_tune(cfg) else None}',
     '"--tune-n-gen": None}'),
    ("the shuffled verdict compares the control with uncond, not with side",
     'elif mean["shuffled"] >= mean["side"]:',
     'elif mean["shuffled"] >= mean["uncond"]:'),
    ("seed spread maximum is the mean",
     "max=float(np.max(values))",
     "max=float(np.mean(values))"),
]

IGNORED = shutil.ignore_patterns(".git", "runs", "data", "__pycache__", ".pytest_cache", "*.pyc", ".venv*")


def planted() -> list:
    """(file, name, old, new) for every mutation."""
    return [("side.py", *m) for m in MUTATIONS] + [("experiments.py", *m) for m in EXPERIMENT_MUTATIONS]


def check_mutations(sources: dict, mutations: list) -> None:
    """Stop with the names of every mutation whose `old` text is missing or ambiguous in its file."""
    problems = []
    for file, name, old, new in mutations:
        count = sources[file].count(old)
        if count != 1:
            problems.append(f"  {name!r}: {'not found' if count == 0 else f'found {count} times'}: {old!r}")
        elif old == new:
            problems.append(f"  {name!r}: new equals old")
    if problems:
        sys.exit("the code has changed; edit these mutations in tools/mutate.py:\n" + "\n".join(problems))


def blocker(folder: Path) -> Path:
    """A `diffusers` package that fails to import, so pytest.importorskip skips as without diffusers."""
    package = folder / "blocked" / "diffusers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('diffusers blocked by tools/mutate.py')\n")
    return package.parent


def run_suite(file: str, source: str, timeout: int, no_diffusers: bool, pytest_args: list,
              origin: Path = ROOT) -> tuple:
    """(exit code, first failing test, seconds) of the suite on a copy of `origin` with `source` as `file`."""
    with tempfile.TemporaryDirectory(prefix="side-mutant-") as tmp:
        project = Path(tmp) / ROOT.name
        shutil.copytree(origin, project, ignore=IGNORED)
        if (ROOT.parent / "shared").is_dir():  # the tests look for real sample data at ../shared/data
            (Path(tmp) / "shared").symlink_to(ROOT.parent / "shared")
        (project / file).write_text(source)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if no_diffusers:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker(Path(tmp))), env.get("PYTHONPATH")]))
        start = time.perf_counter()
        try:
            command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args]
            result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"(timed out after {timeout} s)", time.perf_counter() - start
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.M)
        first = failed[0].split("::")[-1] if failed else (result.stdout.strip().splitlines() or ["?"])[-1]
        return result.returncode, first, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=[], help="run the mutations whose name contains one of these")
    parser.add_argument("--check", action="store_true", help="only check that every mutation applies")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--clean", action="store_true", help="first run the suite on the unmodified side.py")
    parser.add_argument("--no-diffusers", action="store_true", help="hide diffusers, as on a machine without it")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per suite run")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    sources = {file: (ROOT / file).read_text() for file in ("side.py", "experiments.py")}
    names = [name for _, name, _, _ in planted()]
    if len(set(names)) != len(names):
        sys.exit("two mutations share a name")
    check_mutations(sources, planted())
    chosen = [m for m in planted() if not args.only or any(part in m[1] for part in args.only)]
    if args.list or args.check:
        print("\n".join(f"{file}: {name}: {old!r} -> {new!r}" for file, name, old, new in chosen))
        print(f"{len(chosen)} mutations; every `old` occurs exactly once in its file")
        return 0
    with tempfile.TemporaryDirectory(prefix="side-frozen-") as frozen:
        origin = Path(frozen) / ROOT.name  # the project as it was at the start: edits made meanwhile do not leak in
        shutil.copytree(ROOT, origin, ignore=IGNORED)
        return run_all(chosen, sources, args, origin)


def run_all(chosen: list, sources: dict, args, origin: Path) -> int:
    if args.clean:
        code, first, seconds = run_suite("side.py", sources["side.py"], args.timeout, args.no_diffusers,
                                         args.pytest_args, origin)
        print(f"unmodified code: exit {code} in {seconds:.0f} s ({first})", flush=True)
        if code != 0:
            return 2
    rows = []
    for i, (file, name, old, new) in enumerate(chosen, 1):
        code, first, seconds = run_suite(file, sources[file].replace(old, new), args.timeout, args.no_diffusers,
                                         args.pytest_args, origin)
        verdict = "SURVIVED" if code == 0 else "caught"
        rows.append((name, verdict, first if code != 0 else "-", seconds))
        print(f"[{i}/{len(chosen)}] {verdict:8s} {seconds:5.0f} s  {name}  <- {first}", flush=True)
    print("\n| planted bug | result | first failing test | s |\n| --- | --- | --- | --- |")
    for name, verdict, first, seconds in rows:
        print(f"| {name} | {verdict} | {first} | {seconds:.0f} |")
    survived = [row[0] for row in rows if row[1] == "SURVIVED"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} caught" + (f"; survived: {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
