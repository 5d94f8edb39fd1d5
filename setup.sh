#!/usr/bin/env bash
# One command to set everything up: ./setup.sh
#   - Debian packages the tests and the service use (chromium for the dashboard's browser test, systemd for
#     systemd-analyze), when run as root on Debian/Ubuntu (skip with HEYGEM_SKIP_APT=1);
#   - a virtual environment in .venv with heygem-watch and its extras (test, web, export).
# Environment: PYTHON (default python3), HEYGEM_EXTRAS (default "test,web,export"), HEYGEM_GPU=1 adds onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
EXTRAS=${HEYGEM_EXTRAS:-test,web,export}

if [ "${HEYGEM_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
  [ -e /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc ] || need+=(fonts-wqy-zenhei)  # Chinese names in screenshots
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if [[ ",$EXTRAS," == *",export,"* ]]; then
  # torch for the export extra: the CPU build (any newer release pulls a multi-GB CUDA build)
  "${PIP[@]}" install "torch==2.13.0"
fi
"${PIP[@]}" install -e ".[${EXTRAS}]"
if [ "${HEYGEM_GPU:-0}" = 1 ]; then
  "${PIP[@]}" install -e ".[gpu]"
fi
.venv/bin/python -m pip check
echo "setup: done. Run the tests with: .venv/bin/python -m pytest -q"
