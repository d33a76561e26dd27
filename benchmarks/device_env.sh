# Source this on the GPU machine (from the repo root) before running anything of the project.
# The machine has no network, so nothing is pip-installed: `reattention_kernels` (the folder
# `kernels/`) is made importable through a symlink, the rest through PYTHONPATH.
mkdir -p /tmp/shim && ln -sfn "$PWD/kernels" /tmp/shim/reattention_kernels
export PYTHONPATH="$PWD:/tmp/shim:/root/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
