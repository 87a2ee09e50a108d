#!/usr/bin/env bash
# Runs GenMill's whole test suite, installing first whatever the tests need that is missing:
# Redis and PostgreSQL binaries (the tests start their own servers on free ports), espeak-ng
# (test speech), the CPU build of torch, and the package with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_missing=()
command -v redis-server >/dev/null 2>&1 || apt_missing+=(redis-server)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || apt_missing+=(postgresql)
command -v espeak-ng >/dev/null 2>&1 || apt_missing+=(espeak-ng)
if ((${#apt_missing[@]})); then
  echo "installing ${apt_missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

# start the machine's own services when installed but stopped (the tests use their own instances,
# this keeps a developer's `genmill submit` against the defaults working too)
if command -v redis-cli >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null 2>&1 || true
fi
if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 2>/dev/null; then
  for v in /etc/postgresql/*; do
    [ -d "$v" ] && pg_ctlcluster --skip-systemctl-redirect "$(basename "$v")" main start >/dev/null 2>&1 || true
  done
fi

# torch first: the CPU wheel 2.13.0, so that no multi-GB CUDA build is pulled by the range below
python -c "import torch" >/dev/null 2>&1 || pip install -q torch==2.13.0
pip install -q -e ".[test]"
# reference implementations the parity tests compare against; k-diffusion's metadata asks for
# torchvision (no CPU wheel here, and it would pull a CUDA torch), which its sampling code never uses
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('k_diffusion') is None)" || pip install -q --no-deps k-diffusion torchdiffeq torchsde trampoline
exec python -m pytest -q "$@"
