#!/usr/bin/env bash
# Create (or reuse) the pinned Python environment and link it as ./.venv.
#
# The environment lives outside the checkout, keyed by the hash of requirements.txt, so fresh
# clones reuse it; it is built from scratch whenever that key is missing. Override the location
# with TLSELECT_VENV_ROOT.
set -euo pipefail
cd "$(dirname "$0")/../.."
key=$(sha256sum requirements.txt | cut -c1-16)
root=${TLSELECT_VENV_ROOT:-$HOME/.cache/tlselect-venv}
venv="$root/$key"
if [ ! -x "$venv/bin/snakemake" ] || [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: building the environment in $venv (several minutes, about 6 GB)"
  rm -rf "$venv"
  mkdir -p "$root"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -r requirements.txt
  "$venv/bin/python" -m ipykernel install --prefix "$venv" --name python3 >/dev/null
  touch "$venv/.complete"
else
  echo "bootstrap: reusing the environment in $venv"
fi
ln -sfn "$venv" .venv
