#!/usr/bin/env bash
# mt_flax launcher. Sets up .venv (pinned dependencies, SWORD Bible packages) on first use, then:
#   ./launch.sh [--config.key=value ...]   the default experiment end to end: train
#                                          experiments/bible_en_es_tiny.py into runs/bible_en_es_tiny,
#                                          eval report on test, sample translations
#   ./launch.sh test [--all|--perf] [pytest args]  tests/unit, fast (--all: and tests/integration
#                                          and tests/e2e, as CI; --perf: tests/perf, probes)
#   ./launch.sh train|eval|translate|data-stats|audit|average|export|compare|compile ...
#                                          python -m mt_flax ...
#   ./launch.sh sweep CONFIG SWEEP [--workdir DIR] [--config.key=value ...]
#   ./launch.sh bench NAME [args]          python -m bench.NAME (e.g. all --quick, train_step --compare REV)
#   ./launch.sh tpu create|setup|run|sweep|logs|delete [--dry-run] --name NAME --zone ZONE \
#       --accelerator TYPE [-- <mt_flax command and flags>]
#   ./launch.sh slurm [logs|cancel] [--dry-run] --nodes N --gpus-per-node G [--partition P] \
#       [--time T] [--account A] -- train --config FILE --workdir DIR   (sbatch, one task per GPU)
# Environment: MT_FLAX_VENV (default .venv), PYTHON (default python3, >= 3.11) to create it with,
# MT_FLAX_EXTRAS (default test; gpu where nvidia-smi -L lists a GPU; tpu on TPU VMs) the extras
# installed with it, MT_FLAX_GPU_VENV (default .venv-gpu, gpu extra) the venv slurm jobs run,
# MT_FLAX_RUN_DIR (default runs/bible_en_es_tiny) and MT_FLAX_EVAL_ARGS (extra eval flags, e.g.
# "--beam 1 --max-examples 200") for the default run, MT_FLAX_NO_SETUP=1 to skip the install
# check (the venv must exist). Every command but tpu and slurm preloads tcmalloc (Debian
# libtcmalloc-minimal4, installed with the SWORD packages) when it is found; MT_FLAX_TCMALLOC=0
# runs them with the system malloc instead.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${MT_FLAX_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
APT_PACKAGES="sword-text-web sword-text-sparv libtcmalloc-minimal4"
DEFAULT_CONFIG=experiments/bible_en_es_tiny.py
RUN_DIR=${MT_FLAX_RUN_DIR:-runs/bible_en_es_tiny}

log() { echo "[launch $(date +%H:%M:%S)] $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

# Prints the path of libtcmalloc_minimal.so.4 (nothing if it is not installed).
find_tcmalloc() {
  local lib
  lib=$( { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true; } \
    | awk '$1 == "libtcmalloc_minimal.so.4" && !found { print $NF; found = 1 }')
  if [ -z "$lib" ]; then
    for lib in /usr/lib/{x86_64,aarch64}-linux-gnu/libtcmalloc_minimal.so.4 \
               /usr/lib64/libtcmalloc_minimal.so.4 ""; do
      [ -n "$lib" ] && [ -f "$lib" ] && break
    done
  fi
  echo "$lib"
}

# XLA on CPU frees and reallocates large buffers every step; glibc malloc hands them back to the
# kernel and faults them in again, tcmalloc keeps them. Preloaded for the commands that compute.
preload_tcmalloc() {
  [ "${MT_FLAX_TCMALLOC:-1}" = 0 ] && return 0
  case "${LD_PRELOAD:-}" in *libtcmalloc*) return 0 ;; esac
  local lib
  lib=$(find_tcmalloc)
  if [ -n "$lib" ]; then
    export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  else
    log "no tcmalloc (apt-get install libtcmalloc-minimal4): system malloc, slower steps on CPU"
  fi
}

install_system_packages() {
  # The Bible builder reads SWORD modules from these packages; without them it downloads the modules.
  # tcmalloc makes CPU training faster (see preload_tcmalloc).
  local ztext=/usr/share/sword/modules/texts/ztext
  if [ -d "$ztext/engWEB2015eb" ] && [ -d "$ztext/spaRV1909eb" ] && [ -n "$(find_tcmalloc)" ]; then
    return 0
  fi
  if command -v apt-get >/dev/null; then
    log "installing $APT_PACKAGES with apt-get"
    { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends $APT_PACKAGES; } >&2 \
      || log "could not install $APT_PACKAGES; the bible_en_es builder will download the modules"
  else
    log "no apt-get: the bible_en_es builder will download the SWORD modules (and no tcmalloc)"
  fi
}

# constraints.txt pins jax, numpy and grain releases that need Python >= 3.11 (pyproject.toml's
# requires-python); an older interpreter stops here in one line instead of deep inside pip.
check_python() {
  local version
  version=$("$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || { echo "launch.sh: cannot run Python '$1'; set PYTHON to a Python >= 3.11" >&2; exit 2; }
  case "$version" in
    2.*|3.[0-9]|3.10)
      echo "launch.sh: $1 is Python $version; mt_flax needs Python >= 3.11 (set PYTHON=python3.11," \
        "or install one with: uv python install 3.11)" >&2
      exit 2 ;;
  esac
}

setup() {
  if [ "${MT_FLAX_NO_SETUP:-}" = 1 ]; then
    [ -x "$VENV/bin/python" ] || { log "MT_FLAX_NO_SETUP=1 but $VENV/bin/python is missing"; exit 1; }
    return 0
  fi
  if [ -x "$VENV/bin/python" ]; then check_python "$VENV/bin/python"; else check_python "$PY"; fi
  install_system_packages
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.mt_flax-installed" extras=${MT_FLAX_EXTRAS:-test}
  # a GPU here: the CUDA build of the pinned JAX (the gpu extra)
  if [ -z "${MT_FLAX_EXTRAS:-}" ] && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then extras=gpu; fi
  local want
  want=$( { cat pyproject.toml constraints.txt; echo "$extras"; } | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing mt_flax[$extras] and its pinned dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[$extras]" >&2
    echo "$want" > "$stamp"
  fi
}

# Prints a few validation sentences, their translations and references (args: config overrides).
sample_translations() {
  "$VENV/bin/python" - "$DEFAULT_CONFIG" "$RUN_DIR" "$@" <<'EOF'
import subprocess, sys
from mt_flax.config import load_config
from mt_flax.data import load_pairs

config_path, workdir, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
pairs = load_pairs(load_config(config_path, overrides), "validation")[:5]
run = subprocess.run([sys.executable, "-m", "mt_flax", "translate", "--workdir", workdir],
                     input="".join(src + "\n" for src, _ in pairs), text=True,
                     stdout=subprocess.PIPE)
if run.returncode != 0:
  sys.exit(run.returncode)
for (src, ref), hyp in zip(pairs, run.stdout.splitlines()):
  print(f"  source:      {src}\n  translation: {hyp}\n  reference:   {ref}\n")
EOF
}

default_run() {
  local start=$SECONDS py="$VENV/bin/python"
  setup
  preload_tcmalloc
  log "1/3 training $DEFAULT_CONFIG into $RUN_DIR (a re-run resumes it, or reuses a finished run)"
  "$py" -m mt_flax train --config "$DEFAULT_CONFIG" --workdir "$RUN_DIR" "$@"
  local report="$RUN_DIR/eval/test/report.md"
  if [ -f "$report" ] && [ "$report" -nt "$RUN_DIR/metrics.jsonl" ]; then
    log "2/3 $report is newer than the training run; not evaluating again"
    echo; cat "$report"; echo
  else
    log "2/3 evaluating the best checkpoint on the test split"
    # shellcheck disable=SC2086  # MT_FLAX_EVAL_ARGS is a list of flags
    "$py" -m mt_flax eval --workdir "$RUN_DIR" --split test ${MT_FLAX_EVAL_ARGS:-}
  fi
  log "3/3 sample translations of validation sentences"
  sample_translations "$@"
  log "done in $(( (SECONDS - start) / 60 ))m$(( (SECONDS - start) % 60 ))s; everything is in $RUN_DIR"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  ""|--config.*)
    [ -n "$cmd" ] && set -- "$cmd" "$@"
    default_run "$@"
    ;;
  test)
    setup
    preload_tcmalloc
    # Tiers by folder: tests/unit by default (pure functions and small compiles); --all adds
    # tests/integration (in-process: models, steps, training, checkpoints, commands) and
    # tests/e2e (subprocesses, signals, pods), what CI runs; --perf runs tests/perf
    # (performance probes, opt-in). Test paths among the pytest args replace the tier's
    # folders. Tests run on min(cores, 4) pytest-xdist workers (MT_FLAX_TEST_WORKERS=N;
    # 0 runs them in this process).
    tier=(tests/unit)
    case "${1:-}" in
      --all) tier=(tests/unit tests/integration tests/e2e); shift ;;
      --perf) tier=(tests/perf); shift ;;
    esac
    for arg in "$@"; do
      case "$arg" in -*) ;; *) if [ -e "${arg%%::*}" ]; then tier=(); break; fi ;; esac
    done
    workers=${MT_FLAX_TEST_WORKERS:-$(nproc)}
    [ "$workers" -gt 4 ] && workers=4
    [ "$workers" -gt 1 ] && tier+=(-n "$workers" --dist loadfile --no-loadscope-reorder --max-worker-restart 0)
    set +e
    MT_FLAX_NO_SETUP=1 "$VENV/bin/python" -m pytest "${tier[@]}" "$@"
    rc=$?
    set -e
    if [ $rc = 5 ]; then log "pytest collected no tests: that is an error"; exit 1; fi
    exit $rc
    ;;
  train|eval|translate|data-stats|audit|average|sweep|export|compare|compile)
    setup
    preload_tcmalloc
    exec "$VENV/bin/python" -m mt_flax "$cmd" "$@"
    ;;
  bench)
    [ $# -gt 0 ] || { echo "launch.sh bench: expected a benchmark name, e.g. all --quick" >&2; exit 2; }
    name=$1
    shift
    [ -f "bench/$name.py" ] || { echo "launch.sh bench: no benchmark bench/$name.py" >&2; exit 2; }
    setup
    preload_tcmalloc
    exec "$VENV/bin/python" -m "bench.$name" "$@"
    ;;
  tpu)
    setup
    exec "$VENV/bin/python" -m mt_flax tpu "$@"
    ;;
  slurm)
    # The jobs run a venv of their own with the gpu extra (MT_FLAX_GPU_VENV, default .venv-gpu),
    # made here on first use; --dry-run only prints, from the usual venv, and installs no CUDA.
    gpu_venv=${MT_FLAX_GPU_VENV:-$ROOT/.venv-gpu}
    case " $* " in
      *" --dry-run "*) setup ;;
      *) VENV=$gpu_venv MT_FLAX_EXTRAS=${MT_FLAX_EXTRAS:-gpu} setup; VENV=$gpu_venv ;;
    esac
    exec "$VENV/bin/python" -m mt_flax slurm --python "$gpu_venv/bin/python" "$@"
    ;;
  setup)
    setup
    ;;
  -h|--help|help)
    sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "launch.sh: unknown command '$cmd'; expected nothing (the default run), test, setup, train," \
      "eval, translate, data-stats, audit, average, sweep, compile, bench, tpu or slurm (./launch.sh help)" >&2
    exit 2
    ;;
esac
