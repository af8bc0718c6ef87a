# Source this at the start of a device run (see docs/performance.md):
#   . benchmarks/gpu_setup.sh
# The GPU machine has torch and transformers but not batchd's own needs, and no
# network: wheels travel in .whl/ (and .whl8/ for torchao), carried with the tree.
# batchd itself goes on the path as a package tree of links, the layout pyproject's
# package-dir gives an install, so no build tools are needed there. Run what imports
# batchd from outside the checkout (cd /tmp): its batchd/ folder alone is not the package.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    $(ls .whl8/*.whl 2>/dev/null)
rm -rf /tmp/pkg && mkdir -p /tmp/pkg && cp -r batchd /tmp/pkg/
for part in client scheduler workers; do ln -s "$PWD/$part" "/tmp/pkg/batchd/$part"; done
export PYTHONPATH=/tmp/pkg:/tmp/site:$PWD/benchmarks PYTHONUNBUFFERED=1
(cd /tmp && python3 -c "import batchd.workers.hf, batchd.embedded; print('batchd importable')")
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
set +e
