#!/usr/bin/env bash
# mt_flax launcher. Sets up .venv on first use, then:
#   ./launch.sh test [pytest args]       run the test suite
#   ./launch.sh train|eval|translate|data-stats|audit ...   python -m mt_flax ...
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${MT_FLAX_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}
APT_PACKAGES="sword-text-web sword-text-sparv"

log() { echo "[launch] $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

install_system_packages() {
  # The Bible builder reads SWORD modules from these packages; without them it downloads the modules.
  local ztext=/usr/share/sword/modules/texts/ztext
  if [ -d "$ztext/engWEB2015eb" ] && [ -d "$ztext/spaRV1909eb" ]; then
    return 0
  fi
  if command -v apt-get >/dev/null; then
    log "installing $APT_PACKAGES with apt-get"
    { as_root apt-get update -q && as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends $APT_PACKAGES; } >&2 \
      || log "could not install $APT_PACKAGES; the bible_en_es builder will download the modules"
  else
    log "no apt-get: the bible_en_es builder will download the SWORD modules"
  fi
}

setup() {
  install_system_packages
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.mt_flax-installed"
  local want
  want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    log "installing mt_flax and its pinned dependencies into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]" >&2
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    setup
    set +e
    "$VENV/bin/python" -m pytest "$@"
    rc=$?
    set -e
    if [ $rc = 5 ]; then log "pytest collected no tests: that is an error"; exit 1; fi
    exit $rc
    ;;
  train|eval|translate|data-stats|audit)
    setup
    exec "$VENV/bin/python" -m mt_flax "$cmd" "$@"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: ./launch.sh test|setup|train|eval|translate|data-stats|audit [args]" >&2
    exit 2
    ;;
esac
