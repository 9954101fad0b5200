#!/usr/bin/env bash
# On a machine with a GPU and torch already installed (the lent device machine: no network):
# build the extension in place against that torch, run the CUDA tests and the whole suite, then
# the GPU benchmarks. Everything is logged to OUT/log.txt; benchmark results land in OUT.
#
#   bash scripts/gpu_check.sh OUT [build] [cuda-tests] [sanitize] [tests] [kernels] [profile] [factor] [unlearn-profile] [choice-profile] [imagenet] [auto-alpha] [eigh]
#
# A folder .devcarry/ (ignored by git), when present, supplies what the machine lacks: wheels
# (foolbox, for the CLI test's photographs), fashion-mnist/ (the Debian package's IDX files) and cache/
# (the suite's trained models, for stage auto-alpha: cp ~/.cache/deepunlearn/suite_*_original_*.pt .devcarry/cache/);
# recreate it here before a call that runs the whole suite, and name it in the call's carry:
#   mkdir -p .devcarry/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .devcarry/fashion-mnist/
#   pip download --no-deps --only-binary=:all: foolbox==3.3.4 -d .devcarry   (and /.devcarry/ in .git/info/exclude)
# Each stage runs under its own time limit (seconds: T_BUILD, T_CUDA_TESTS, T_MEMCHECK, T_RACECHECK, T_TESTS, T_KERNELS,
# T_PROFILE, T_FACTOR, T_UNLEARN_PROFILE, T_CHOICE_PROFILE, T_IMAGENET, T_AUTO_ALPHA, T_EIGH), so one slow stage cannot take the others' results with it. IMAGENET_ARGS goes to
# bench_imagenet.py (e.g. "--archs vit_b_16 resnet50 vgg11_bn --paper-images 500").
#
# On the lent device machine (15 minutes of device time per session, a machine start included; a
# warm machine keeps the build between calls). What fitted one H200 lease (about 300 s):
#   T_BUILD=100 T_CUDA_TESTS=150 T_KERNELS=170 T_MEMCHECK=80 T_RACECHECK=40 T_IMAGENET=125 \
#     IMAGENET_ARGS="--archs vit_b_16 resnet50 vgg11_bn --paper-images 500" \
#     bash scripts/gpu_check.sh $OUT build cuda-tests kernels sanitize imagenet
# (build 32-37 s, CUDA tests over 100 s serially or 30 s with pytest -n 8, the kernel benchmark with
# its sweeps 53 s, memcheck and racecheck 5 s each, ImageNet shapes 108-113 s; the whole suite
# (stage tests) needs .devcarry for its data and about 60 s with -n 12). The kernel benchmark prints
# each row to the log as it goes and writes its rows before the sweep, so a stage cut off by its
# limit still leaves its measured rows. Stage auto-alpha takes about 120 s on an H100 (with
# --alpha-f-only; --parts adds one automatic call per case).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: gpu_check.sh OUT [stages...]}
shift
mkdir -p "$out"
log="$out/log.txt"
stages=${*:-build cuda-tests sanitize tests kernels profile imagenet}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -d .devcarry ]; then
  if ls .devcarry/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/devsite .devcarry/*.whl >>"$log" 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/devsite
  fi
fi
suite_files=()  # the suite's data and checkpoints, where they were carried (the machine has neither)
[ -d .devcarry/fashion-mnist ] && suite_files+=(--data "$PWD/.devcarry/fashion-mnist")
[ -d .devcarry/cache ] && suite_files+=(--cache-dir "$PWD/.devcarry/cache")

stage() {  # stage NAME LIMIT COMMAND...: run, log, and record the exit status
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$log"
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.version.cuda)"
} >>"$log" 2>&1
for s in $stages; do
  case $s in
    build)
      # The device image sets CXX/CC to /opt/gcc (a shell-script wrapper around GCC 13.3, as torch's, same ABI), yet an extension
      # built with it segfaults whenever an op raises an error; one built by /usr/bin/g++ raises
      # cleanly (seen 2026-11-23). Build with the system GCC where there is one.
      { echo "CXX=${CXX:-} LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"; ${CXX:-c++} -v 2>&1 | tail -2; } >>"$log"
      [ -x /usr/bin/g++ ] && export CXX=/usr/bin/g++ CC=/usr/bin/gcc
      CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=$(nproc) \
        stage build "${T_BUILD:-300}" $PY -m pip install --no-build-isolation --no-deps --no-index -e . || exit 1
      stage info 60 $PY -c "import deepunlearn, json; print(json.dumps(deepunlearn.extension_info()))" || exit 1
      ldd deepunlearn/_C*.so | grep -E "stdc|gcc_s|gomp" >>"$log" 2>&1 ;;
    sanitize)
      # memcheck over every CUDA path of the ops (cuBLAS / cuDNN kernels included), then
      # racecheck on the one kernel with shared memory; logs land in OUT, zero errors expected.
      stage memcheck "${T_MEMCHECK:-150}" compute-sanitizer --tool memcheck --error-exitcode 1 \
        --log-file "$out/sanitizer_memcheck.log" $PY scripts/sanitize_ops.py
      stage racecheck "${T_RACECHECK:-90}" compute-sanitizer --tool racecheck --error-exitcode 1 \
        --kernel-name kns=mirror_lower_to_upper --log-file "$out/sanitizer_racecheck.log" $PY scripts/sanitize_ops.py ;;
    cuda-tests) stage cuda-tests "${T_CUDA_TESTS:-240}" $PY -m pytest tests -m cuda -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" --dist loadgroup -p no:benchmark ;;
    tests) stage tests "${T_TESTS:-400}" $PY -m pytest tests -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" --dist loadgroup -p no:benchmark ;;
    kernels) stage kernels "${T_KERNELS:-240}" $PY benchmarks/bench_kernels.py --device cuda --out "$out" ;;
    profile) stage profile "${T_PROFILE:-150}" $PY benchmarks/profile_kernels.py --device cuda --out "$out" ;;
    factor) stage factor "${T_FACTOR:-90}" $PY benchmarks/bench_factor.py --out "$out/factor_cuda" ;;
    eigh) stage eigh "${T_EIGH:-90}" $PY benchmarks/bench_eigh.py --device cuda --shapes 128x5 144x5 288x5 576x5 64x60 \
      1152x10 768x10 2304x5 --out "$out/eigh_cuda" ;;
    unlearn-profile) stage unlearn-profile "${T_UNLEARN_PROFILE:-200}" $PY benchmarks/profile_unlearn.py --choose \
      --out "$out/profile_unlearn_cuda" ${PROFILE_ARGS:-} ;;
    choice-profile) stage choice-profile "${T_CHOICE_PROFILE:-240}" $PY benchmarks/profile_unlearn.py --archs vit_b_16 \
      --choose --task --phases "unlearn, α chosen" --repeat 1 --out "$out/profile_choice_cuda" ;;
    imagenet) stage imagenet "${T_IMAGENET:-360}" $PY benchmarks/bench_imagenet.py --out "$out/imagenet_cuda" ${IMAGENET_ARGS:-} ;;
    auto-alpha) stage auto-alpha "${T_AUTO_ALPHA:-300}" $PY benchmarks/bench_auto_alpha.py --device cuda --alpha-f-only --parts \
      --out "$out/auto_alpha_cuda" "${suite_files[@]}" ;;
    *) echo "unknown stage $s" | tee -a "$log"; exit 2 ;;
  esac
done
