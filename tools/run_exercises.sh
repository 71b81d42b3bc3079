#!/usr/bin/env bash
# tools/run_exercises.sh: run and time the exercises of theory.md from a clean clone.
#
#   tools/run_exercises.sh                 # all twelve, in the default order below
#   tools/run_exercises.sh 0 2 1           # only these, in the order given
#
# Each exercise runs the commands of its *Command(s)* block in theory.md, character for character:
# each exercise below is a bash function whose body is that block (a test checks that every line
# of it is a line of theory.md). Every command fixes OMP_NUM_THREADS=1 itself, as printed in
# theory.md, so its numbers are those of the answer key (docs/answers.md) digit for digit.
# Exercise 0 is the set-up step; Exercise 11 is the instructor's demonstration (the three-seed
# protocol, about 30 min); theory.md's three problems are pen and paper and have no commands.
# Per exercise:
#   - wall seconds (date +%s.%N around the whole block) and the exit code of the block, appended
#     as "exercise N<TAB>seconds<TAB>rc" to runs/exercise_times.tsv;
#   - its stdout and stderr, with a header (date, HEAD, nproc, uptime) and a footer (seconds, rc),
#     in runs/exercise_logs/exN.log (overwritten when the exercise runs again).
# The block runs under `set -e` (a failed `cp` stops the exercise, as it would stop a student) and
# `set -x` (the log shows every command as run). A failing exercise is recorded and the script goes
# on to the next one. The header and the summary table go to the terminal and to
# runs/exercise_logs/session-<UTC time>.log. The exit status is 0 only when every exercise asked
# for ran and exited 0.
#
# Skipped, not run and not written to the tsv (the summary says why):
#   - an exercise whose run folder exists already (side.py / experiments.py would reuse its cached
#     stages, so the time would not be a from-scratch time; delete the folder to time it again);
#   - an exercise that needs runs/ex0 when runs/ex0/report.json is missing.
#
# Default order: Exercise 0 first (3-7 read or copy runs/ex0), then the short exercises,
# then the long ones (8, 9, 10, 11). Exercise 5 writes runs/ex0/figures/gradient_norm.png, the
# only file an exercise adds to runs/ex0; no stage reads it. What is only read or viewed (the
# reports, the figures) is not scripted.
set -u
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.." || exit 2
if [ ! -f side.py ] || [ ! -f experiments.py ] || [ ! -f theory.md ]; then
    echo "run_exercises.sh: side.py, experiments.py and theory.md not found in $(pwd)" >&2
    exit 2
fi

export PYTHONUNBUFFERED=1  # stdout reaches the log line by line, in order with stderr, as on a terminal

EXERCISES=(0 1 2 3 4 5 6 7 8 9 10 11)
DEFAULT_ORDER=(0 2 1 5 6 7 3 4 8 9 10 11)
# What an exercise's commands create and read, read off its function body (so the two cannot
# drift apart): the run folders it writes (every `--out FOLDER`), and whether it reads runs/ex0.
creates() { declare -f "ex$1" | grep -o -- '--out [^ ;]*' | cut -d' ' -f2; }
needs_ex0() { [ "$1" != 0 ] && declare -f "ex$1" | grep -q 'runs/ex0'; }

usage() {
    sed -n '2,5p' "$SELF" | sed 's/^# \{0,1\}//'
    echo "exercises: ${EXERCISES[*]}; default order: ${DEFAULT_ORDER[*]}"
}

ORDER=()
if [ $# -eq 0 ]; then
    ORDER=("${DEFAULT_ORDER[@]}")
else
    for arg in "$@"; do
        case "$arg" in
            -h|--help) usage; exit 0 ;;
        esac
        if [[ " ${EXERCISES[*]} " != *" $arg "* ]]; then
            echo "run_exercises.sh: '$arg' is not an exercise (${EXERCISES[*]})" >&2
            usage >&2
            exit 2
        fi
        case " ${ORDER[*]} " in
            *" $arg "*) ;;  # given twice: run once
            *) ORDER+=("$arg") ;;
        esac
    done
fi

if ! command -v python >/dev/null 2>&1; then
    if command -v python3 >/dev/null 2>&1; then
        # theory.md's commands say `python`; where only python3 exists, `python` runs it
        python() { command python3 "$@"; }
        PYTHON_NOTE="(no 'python' on PATH: python runs $(command -v python3))"
    else
        echo "run_exercises.sh: neither python nor python3 on PATH" >&2
        exit 2
    fi
else
    PYTHON_NOTE="$(command -v python)"
fi

mkdir -p runs/exercise_logs || exit 2
TSV=runs/exercise_times.tsv
SESSION=runs/exercise_logs/session-$(date -u +%Y%m%dT%H%M%SZ).log

say() { printf '%s\n' "$*" | tee -a "$SESSION"; }

machine_header() {
    echo "## date: $(date -u '+%Y-%m-%d %H:%M:%S UTC') ($(date '+%Y-%m-%d %H:%M:%S %Z'))"
    echo "## git rev-parse HEAD: $(git rev-parse HEAD 2>&1)"
    echo "## git status --short: $(git status --short 2>&1 | wc -l) line(s)"
    git status --short 2>&1 | head -20 | sed 's/^/##   /'
    echo "## nproc: $(nproc)"
    echo "## uptime: $(uptime)"
    echo "## OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}   python: $PYTHON_NOTE $(python --version 2>&1)"
}

# --- the exercises: each body is theory.md's command block, verbatim --------------------------------

# Exercise 0. Set-up: the default run
ex0() {
OMP_NUM_THREADS=1 python side.py --out runs/ex0
}

# Exercise 1. The copy rate on a 1-D toy (seconds)
ex1() {
OMP_NUM_THREADS=1 python experiments.py mechanism
}

# Exercise 2. Overlap, not tightness
ex2() {
OMP_NUM_THREADS=1 python -c "
import numpy as np, experiments
for mean, scale in (((0, 2.5), 0.1), ((0, 2.5), 0.3), ((0, 2.5), 1.0), ((0, 2.5), 3.0), ((0, 1.0), 0.3), ((2, 0), 0.3)):
    experiments.TOY_MEANS[2], experiments.TOY_SCALES[2] = mean, scale
    row = experiments.theorem1_table(epsilons=(0.01,))[2]
    print('label 2 (w = 0.2) at %-8s scale %.1f:  -KL %+.3f   ceiling -log(1/w) = -1.609' % (mean, scale, row['neg_kl']))
"
OMP_NUM_THREADS=1 python -c "
import numpy as np
x = np.random.default_rng(0).standard_normal(2_000_000)   # p = N(0, 1)
for name, post in [('soft, width 1.0', 1 / (1 + np.exp(-(x - 1) / 1.0))), ('soft, width 0.1', 1 / (1 + np.exp(-(x - 1) / 0.1))),
                   ('hard: x > 1', (x > 1) * 1.0), ('hard: |x| < 0.2', (abs(x) < 0.2) * 1.0), ('random, P = 0.16', np.full_like(x, 0.16))]:
    w = post.mean()   # mass of the label; KL(p_i || p) = E_p[P(y|x) log(P(y|x) / w)] / w
    kl = (post * np.log(np.maximum(post, 1e-300) / w)).mean() / w
    print('%-17s w = %.3f   KL(p_i||p) = %.3f   log(1/w) = %.3f' % (name, w, kl, np.log(1 / w)))
"
}

# Exercise 3. Shuffled labels: a control
ex3() {
cp -r runs/ex0 runs/ex3
OMP_NUM_THREADS=1 python experiments.py --out runs/ex3 --methods uncond,side,shuffled --guidance side=30,shuffled=30
}

# Exercise 4. side against cond: a fair λ for each
ex4() {
cp -r runs/ex0 runs/ex4
OMP_NUM_THREADS=1 python experiments.py --out runs/ex4 --methods uncond,cond,cond_x0,side --guidance cond=0.3,cond_x0=0.3,side=30
cp -r runs/ex0 runs/ex4_30
OMP_NUM_THREADS=1 python experiments.py --out runs/ex4_30 --methods uncond,cond,cond_x0,side --guidance 30
}

# Exercise 5. The noise-aware classifier and the size of its gradient
ex5() {
OMP_NUM_THREADS=1 python -c "import json; print(json.load(open('runs/ex0/report.json'))['classifier_accuracy_by_t'])"
OMP_NUM_THREADS=1 python -c "
import json, side, torch, numpy as np, matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
cfg = side.apply_profile(side.Config(out='runs/ex0', device='cpu')); d = side.DIFFUSION
lam = json.load(open('runs/ex0/report.json'))['guidance']   # each row's own lambda
syn = np.load('runs/ex0/synthetic.npz')['images']; lab = np.load('runs/ex0/labels.npz')['labels']
h = np.arange(len(syn)) % 10 == 0; x0 = side.to_unit_range(syn[h]); c = torch.as_tensor(lab[h])
unet = side.build_unet(cfg, 1); unet.load_state_dict(torch.load('runs/ex0/ddpm.pt', weights_only=False)['ema']); unet.eval()
ts, g = (0, 100, 200, 300, 500, 700, 900, 980), torch.Generator().manual_seed(0)
for name in ('side', 'cond'):
    net = torch.load(f'runs/ex0/classifier_{name}.pt', weights_only=False)['net'].eval()
    pushes, epss = [], []
    for t0 in ts:
        t = torch.full((len(x0),), t0); xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        eps = side.guided_eps(unet, None, xt, t, None, 0)
        push = eps - side.guided_eps(unet, net, xt, t, c, 1.0)   # the guidance term at lambda = 1
        epss.append(eps.flatten(1).norm(dim=1).mean().item()); pushes.append(push.flatten(1).norm(dim=1).mean().item())
        print('%-4s t = %3d   |eps| %.2f   |push| at lambda = 1: %.4f   at its lambda %g: %.3f' % (name, t0, epss[-1], pushes[-1], lam[name], lam[name] * pushes[-1]))
    plt.semilogy(ts, [lam[name] * p for p in pushes], 'o-', label='%s push, lambda = %g' % (name, lam[name]))
plt.semilogy(ts, epss, 'k--', label='|eps_theta|'); plt.xlabel('t'); plt.ylabel('mean L2 norm'); plt.legend()
plt.savefig('runs/ex0/figures/gradient_norm.png', dpi=80)
"
}

# Exercise 6. Reading a match grid: true copies and near misses
ex6() {
OMP_NUM_THREADS=1 python -c "
import numpy as np
tr = np.load('runs/ex0/train_subset.npz')['images']; tr = tr.reshape(len(tr), -1) / 255.
D = np.sqrt(((tr[:, None] - tr[None]) ** 2).sum(-1)); np.fill_diagonal(D, np.inf)
yard = D.min() / 2
print('closest pair of distinct training digits %.3f, median NN distance %.3f, yardstick %.3f' % (D.min(), np.median(D.min(1)), yard))
for m in ['uncond', 'cond', 'side']:
    d = np.load(f'runs/ex0/nn_{m}.npz'); r, d1 = d['nn_ratio'], d['d1']; o = np.argsort(r)[:24]
    mem, close = r < 1/3, d1 < yard
    print(m, 'grid ratio %.3f-%.3f d1 %.3f-%.3f distinct train imgs %d' % (r[o].min(), r[o].max(), d1[o].min(), d1[o].max(), len(np.unique(d['nn_index'][o]))),
          '| Gu&close', (mem & close).sum(), 'Gu&far', (mem & ~close).sum(), 'notGu&close', (~mem & close).sum())
"
}

# Exercise 7. UMS depends on $N_G$
ex7() {
cp -r runs/ex0 runs/ex7
OMP_NUM_THREADS=1 python side.py --out runs/ex7 --n-gen 128
}

# Exercise 8. Memorization against training-set size
ex8() {
OMP_NUM_THREADS=1 python side.py --n 64 --methods uncond --out runs/ex8_n64
OMP_NUM_THREADS=1 python side.py --n 256 --methods uncond --out runs/ex8_n256
}

# Exercise 9. Fewer DDPM steps as a defence
ex9() {
OMP_NUM_THREADS=1 python side.py --train-steps 1000 --out runs/ex9_steps1000
OMP_NUM_THREADS=1 python side.py --train-steps 500 --out runs/ex9_steps500
}

# Exercise 10. The sampler
ex10() {
OMP_NUM_THREADS=1 python experiments.py --seed 100 --methods uncond,side --guidance side=30 --n-gen 256 --sweep extract_sampler=ddim50,ddim250,ddpm50,ddpm250,ddpm1000 --out runs/ex10
}

# Exercise 11. Instructor's demonstration: the spread over seeds
ex11() {
OMP_NUM_THREADS=1 python experiments.py --out runs/ex11 --seeds 0,1,2
}

# --- the runner ---------------------------------------------------------------------------------
say "=== tools/run_exercises.sh: exercises ${ORDER[*]} ($(pwd))"
machine_header | tee -a "$SESSION"
say "## torch / numpy / scikit-learn: $(python -c 'import torch, numpy, sklearn; print(torch.__version__, numpy.__version__, sklearn.__version__)' 2>&1 | tail -1)"
say "## times: $TSV   logs: runs/exercise_logs/exN.log   this session: $SESSION"

declare -A SECS=() RC=() NOTE=()
for n in "${ORDER[@]}"; do
    log=runs/exercise_logs/ex$n.log
    skip=""
    for folder in $(creates "$n"); do
        if [ -e "$folder" ]; then
            skip="$folder exists (its cached stages would be reused; delete it to time exercise $n)"
            break
        fi
    done
    if [ -z "$skip" ] && needs_ex0 "$n" && [ ! -f runs/ex0/report.json ]; then
        skip="needs runs/ex0 from Exercise 0, and runs/ex0/report.json is missing"
    fi
    if [ -n "$skip" ]; then
        NOTE[$n]="skipped: $skip"
        say "--- exercise $n: skipped: $skip"
        continue
    fi

    say "--- exercise $n: started $(date '+%H:%M:%S'), load $(uptime | sed 's/.*load average: //')"
    {
        echo "## exercise $n (tools/run_exercises.sh, function ex$n; theory.md)"
        machine_header
        echo "## ---- output"
    } > "$log"
    t0=$(date +%s.%N)
    ( set -e; set -x; "ex$n" ) >> "$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    {
        echo "## ---- end"
        echo "## exercise $n: $secs s, rc $rc, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "## uptime at the end: $(uptime)"
    } >> "$log"
    printf 'exercise %s\t%s\t%s\n' "$n" "$secs" "$rc" >> "$TSV"
    SECS[$n]=$secs
    RC[$n]=$rc
    [ "$rc" -ne 0 ] && NOTE[$n]="FAILED, see $log"
    say "--- exercise $n: $secs s, rc $rc"
done

say ""
say "=== summary ($(date -u '+%Y-%m-%d %H:%M:%S UTC'); HEAD $(git rev-parse --short HEAD 2>/dev/null); nproc $(nproc); OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})"
say "## uptime: $(uptime)"
say "$(printf '%-9s %10s %4s  %s' exercise seconds rc note)"
total=0
failed=0
for n in "${ORDER[@]}"; do
    if [ -n "${SECS[$n]:-}" ]; then
        total=$(awk -v a="$total" -v b="${SECS[$n]}" 'BEGIN { printf "%.3f", a + b }')
        [ "${RC[$n]}" -ne 0 ] && failed=$((failed + 1))
        say "$(printf '%-9s %10s %4s  %s' "$n" "${SECS[$n]}" "${RC[$n]}" "${NOTE[$n]:-}")"
    else
        failed=$((failed + 1))
        say "$(printf '%-9s %10s %4s  %s' "$n" - - "${NOTE[$n]:-}")"
    fi
done
say "total: $total s ($(awk -v t="$total" 'BEGIN { printf "%.1f", t / 60 }') min); failed or skipped: $failed"
[ "$failed" -eq 0 ]
