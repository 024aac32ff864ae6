#!/usr/bin/env bash
# The oldest torch + torchvision pair pyproject.toml allows (their `>=` bounds), in a virtual environment of its
# own (.venv-oldest) beside hpsearch, then one real trial of the default study on the CPU: the package imports,
# trains, checkpoints and records its outputs on the oldest torch it claims. .ci/run runs it after the tests.
#     bash tools/oldest_torch.sh
set -euo pipefail
cd "$(dirname "$0")/.."

read -r torch_min vision_min < <(python3.11 - <<'PY'
import re
import tomllib

with open("pyproject.toml", "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
lowest = {}
for dependency in dependencies:
    name = re.match(r"[A-Za-z0-9_.-]+", dependency).group(0)
    if name in ("torch", "torchvision"):
        lowest[name] = re.search(r">=\s*([\w.]+)", dependency).group(1)
print(lowest["torch"], lowest["torchvision"])
PY
)
echo "oldest pair: torch==$torch_min torchvision==$vision_min"

venv=.venv-oldest
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
[ -x "$venv/bin/uv" ] || "$venv/bin/pip" install -q uv
"$venv/bin/uv" pip install -q --python "$venv/bin/python" "torch==$torch_min" "torchvision==$vision_min" -e .
"$venv/bin/python" -c "import torch, torchvision; print('installed: torch', torch.__version__, 'torchvision', torchvision.__version__)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$venv/bin/hpsearch" -q run studies/digits.toml --n-trials 1 --device cpu --set data.subset=300 --set train.epochs=2 \
    --storage "sqlite:///$work/oldest.db" --artifacts "$work/artifacts"
"$venv/bin/hpsearch" status studies/digits.toml --storage "sqlite:///$work/oldest.db" --artifacts "$work/artifacts" --json \
    | "$venv/bin/python" -c "import json, sys; s = json.load(sys.stdin); assert s['states']['COMPLETE'] == 1, s; print('oldest pair: 1 COMPLETE trial, value', s['best']['value'])"
