#!/usr/bin/env bash
# Installs PyTorch into the venv before the project, so pip never resolves a bare `torch`
# requirement to the multi-GB CUDA build by accident.
#   TORCH=cpu  (default) torch 2.13.0 CPU: from a local wheel when pip's find-links has one,
#              otherwise from the PyTorch CPU index.
#   TORCH=cuda the default PyPI build (CUDA on Linux x86-64), for GPU hosts.
#   TORCH=skip keep whatever torch the venv already has.
set -euo pipefail
pip="$1/bin/python -m pip"
case "${TORCH:-cpu}" in
  skip) exit 0 ;;
  cuda) $pip install "torch>=2.4,<2.14" ;;
  cpu)
    if $pip download --no-deps --no-index -q -d /tmp/cascade-torch-probe "torch==2.13.0" >/dev/null 2>&1; then
      $pip install "torch==2.13.0"
    else
      $pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi ;;
  *) echo "TORCH must be cpu, cuda or skip (got '${TORCH}')" >&2; exit 2 ;;
esac
