#!/usr/bin/env bash
# tier_env.sh KIND REQFILE [CURRENT_REQFILE...]: print the path of the cached virtual environment
# for REQFILE, building it first if needed, and remove cached KIND environments that none of the
# CURRENT_REQFILEs (default: REQFILE) names any more, so the cache keeps only what is in use.
#
# An environment is named by the hash of its requirement file's content (venv-KIND-<hash>), so a
# fresh clone reuses it and an edited file gets a new one. It is built in a .tmp directory and
# moved into place only when complete; a lock serialises builds of the same environment.
# A line "#! uninstall NAME..." in REQFILE removes those distributions after the install (e.g.
# a CUDA-only wheel that cannot load against the CPU torch build); it is part of the hash.
#
# KIND "overlay" builds no virtual environment but a `pip install --no-deps --target` tree
# (overlay-<hash>) that a tier puts on PYTHONPATH over its environment: packages that must not pull
# their declared dependencies (mindiesd declares torch-npu) and that the large environments need
# not be rebuilt for.
set -euo pipefail

kind=$1 req=$2
shift 2
current=("$@")
[ ${#current[@]} -gt 0 ] || current=("$req")
cache=${ERNIE_PATCHER_CACHE:-$HOME/.cache/ernie-patcher}
python=${PYTHON:-python3.11}

prefix=venv-$kind
[ "$kind" != overlay ] || prefix=overlay
venv_for() { echo "$cache/$prefix-$(sha256sum < "$1" | cut -c1-12)"; }

mkdir -p "$cache"
venv=$(venv_for "$req")
keep=()
for file in "${current[@]}"; do keep+=("$(venv_for "$file")"); done
for old in "$cache"/"$prefix"-*; do
  [ -e "$old" ] || continue
  base=${old%.lock}
  base=${base%.tmp}
  case " ${keep[*]} " in *" $base "*) continue ;; esac
  echo "tier_env: removing $old (no current requirement file names it)" >&2
  rm -rf "$old"
done

exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.ready" ]; then
  echo "tier_env: building $venv from $req" >&2
  rm -rf "$venv" "$venv.tmp"
  if [ "$kind" = overlay ]; then
    "$python" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$venv.tmp" -r "$req" >&2
  else
    "$python" -m venv "$venv.tmp"
    "$venv.tmp/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    remove=$(sed -n 's/^#! uninstall //p' "$req")
    [ -z "$remove" ] || "$venv.tmp/bin/python" -m pip uninstall -y -q $remove >&2
  fi
  mv "$venv.tmp" "$venv"
  touch "$venv/.ready"
fi
echo "$venv"
