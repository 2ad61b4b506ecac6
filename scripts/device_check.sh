#!/usr/bin/env bash
# The first check on a GPU: SegNeXt-T and -B against the PyTorch reference (MMSegmentation 1.2.2) on the same GPU,
# under 8 minutes on one H100. Writes benchmarks/<date>_<machine>_gpu.md and .json (scripts/benchmark.py).
#
#   scripts/device_check.sh              run it (on the GPU machine, from the repository's root)
#   scripts/device_check.sh --wheels     download, here, the wheels a machine without them needs into .whl/
#   scripts/device_check.sh --plan       print the benchmark commands and check their flags, without running them
#
# Measured, ours (jitted, bfloat16) against the reference (torch.autocast bfloat16, i.e. PyTorch AMP), alternating:
#   evaluation of T and B at batch 1 and 16, 512 x 512 and 768 x 1536 (the forward pass, logits at stride 8);
#   one training step of T and B in bfloat16 at batch 16, 512 x 512 (forward, loss, backward, AdamW);
#   then T's training step again with the shift-add depth-wise convolution (benchmarks/<date>_<machine>_gpu-shift_add.*),
#   to decide the GPU's backend policy (segnext_jax/backend.py: XLA's grouped convolution today, whose weight gradient
#   is reported slow on GPU in jax-ml/jax#13800).
# Each group runs under its own time limit (GROUP_SECONDS), so one slow group cannot take the others' results:
# every finished configuration is already in the output files.
set -euo pipefail
cd "$(dirname "$0")/.."

GROUP_SECONDS=${GROUP_SECONDS:-110}
NAME=${NAME:-gpu}
COMMON=(--iters=10 --warmup=2 --settle=1 --dtype=bfloat16 --name="$NAME")
GROUPS_ARGS=(
  "--variants=t --modes=eval --eval_batches=1,16 --sizes=512x512,768x1536"
  "--variants=b --modes=eval --eval_batches=1,16 --sizes=512x512,768x1536"
  "--variants=t,b --modes=train --train_batch=16 --train_size=512x512"
)
SHIFT_ADD_GROUP="--variants=t --modes=train --train_batch=16 --train_size=512x512 --depthwise_impl=shift_add"
# What a GPU machine whose image has jax, flax, optax, orbax and torch lacks (versions as setup.cfg resolves here).
WHEELS=(grain ml_collections tensorflow-datasets array-record etils simplejson dm-tree promise tensorflow-metadata
        toml wrapt mmsegmentation mmengine mmcv-lite addict yapf termcolor rich prettytable ftfy regex
        opencv-python-headless tqdm cloudpickle)

case "${1:-run}" in
  --wheels)
    mkdir -p .whl
    for name in "${WHEELS[@]}"; do
      version=$(python -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
      [ -n "$version" ] || { echo "device_check: $name is not installed here; pip install -e '.[test]' first" >&2; exit 2; }
      python -m pip download -q --no-deps --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$name==$version"
    done
    echo "device_check: wheels in .whl/ ($(du -sh .whl | cut -f1)); carry .whl to the GPU machine"
    exit 0 ;;
  --plan)
    for group in "${GROUPS_ARGS[@]}" "$SHIFT_ADD_GROUP"; do
      # shellcheck disable=SC2086
      python - $group "${COMMON[@]}" <<'EOF'
import sys
sys.path.insert(0, "scripts")
import benchmark
args = benchmark.parse_args(sys.argv[1:])
for config in benchmark.configs(args):
    print("plan:", config)
EOF
    done
    exit 0 ;;
  run) ;;
  *) echo "usage: scripts/device_check.sh [--wheels | --plan]" >&2; exit 2 ;;
esac

if [ -d .whl ] && ! python -c "import mmseg, grain, ml_collections" 2>/dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, \
torch.cuda.is_available() and torch.cuda.get_device_name())"
python -c "import jax, torch, sys; sys.exit(0 if jax.default_backend() == 'gpu' and torch.cuda.is_available() else \
'device_check: needs a GPU visible to both jax and torch')"

status=0
append=()  # the first group starts today's file afresh, the others add to it
for group in "${GROUPS_ARGS[@]}"; do
  # shellcheck disable=SC2086
  timeout --signal=INT "$GROUP_SECONDS" python scripts/benchmark.py $group "${COMMON[@]}" "${append[@]}" || {
    echo "device_check: group '$group' stopped (exit $?); its finished configurations are in benchmarks/" >&2
    status=1
  }
  append=(--append)
done
# shellcheck disable=SC2086
timeout --signal=INT "$GROUP_SECONDS" python scripts/benchmark.py $SHIFT_ADD_GROUP "${COMMON[@]}" --name="$NAME-shift_add" \
  || { echo "device_check: the shift-add group stopped (exit $?)" >&2; status=1; }
ls -l benchmarks/*_"$NAME".* 2>/dev/null || true
exit $status
