#!/usr/bin/env bash
# One command to set everything up: ./setup.sh
#   - Debian packages the tests and the service use (chromium for the dashboard's browser test, systemd for
#     systemd-analyze, redis-server for the render farm's tests: they start their own on a free port, espeak-ng
#     for spoken test speech), when run
#     as root on Debian/Ubuntu (skip with HEYGEM_SKIP_APT=1); waits while apt is busy;
#   - a virtual environment in .venv with heygem-watch and its extras (test, web, export), and silero-vad (the
#     speech detector's model) without its dependencies.
# Environment: PYTHON (default python3), HEYGEM_EXTRAS (default "test,web,export"), HEYGEM_GPU=1 adds onnxruntime-gpu.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
EXTRAS=${HEYGEM_EXTRAS:-test,web,export}

# Debian packages, one per line: the package, then what shows it is installed (a command, or a path).
DEBIAN_PACKAGES=(
  "chromium          chromium"                                       # the dashboard's browser test
  "systemd           systemd-analyze"                                # the systemd unit's test
  "redis-server      redis-server"                                   # the render farm's tests start their own
  "openssl           openssl"                                        # the farm's TLS test makes its certificates
  "fonts-wqy-zenhei  /usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"   # Chinese names in screenshots
  "jq                jq"                                             # the README's log recipes (and their test)
  "espeak-ng         espeak-ng"                                      # spoken test speech (the speech detector's tests)
)
# apt may be busy (unattended-upgrades runs right after boot): wait for it this long instead of failing at once.
APT_LOCK_WAIT_S=${HEYGEM_APT_LOCK_WAIT_S:-900}
APT_RETRY_S=${HEYGEM_APT_RETRY_S:-10}

apt_get() {
  # install waits for the dpkg lock itself (DPkg::Lock::Timeout); `update` does not honour that option for
  # /var/lib/apt/lists/lock (apt 2.6), so a refused lock is retried here until APT_LOCK_WAIT_S has passed.
  local deadline=$((SECONDS + APT_LOCK_WAIT_S)) out said=0
  while :; do
    if out=$(DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout="$APT_LOCK_WAIT_S" "$@" 2>&1); then
      return 0
    fi
    if [ "$SECONDS" -lt "$deadline" ] && grep -qiE "could not get lock|unable to lock|unable to acquire" <<<"$out"; then
      [ "$said" = 1 ] || echo "setup: apt is busy (another apt or unattended-upgrades run); waiting up to ${APT_LOCK_WAIT_S} s"
      said=1
      sleep "$APT_RETRY_S"
      continue
    fi
    printf '%s\n' "$out" >&2
    return 1
  done
}

if [ "${HEYGEM_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  for entry in "${DEBIAN_PACKAGES[@]}"; do
    read -r pkg probe <<<"$entry"
    if [[ "$probe" == /* ]]; then [ -e "$probe" ] || need+=("$pkg")
    else command -v "$probe" >/dev/null 2>&1 || need+=("$pkg"); fi
  done
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends "${need[@]}"
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
# The built-in engine's speech detector (vad.py) reads Silero VAD's ONNX model from this wheel, pinned
# with its hash there. Without its dependencies: the wheel's own Python helpers need torch, which as a dependency of
# heygem-watch would pull a multi-GB CUDA build onto every box; heygem-watch never imports them.
"${PIP[@]}" install --no-deps "silero-vad==6.2.3"
if [ "${HEYGEM_GPU:-0}" = 1 ]; then
  "${PIP[@]}" install -e ".[gpu]"
fi
# pip check, except the one complaint expected without the export extra: silero-vad's torch (see above)
if ! out=$(.venv/bin/python -m pip check 2>&1); then
  problems=$(grep -E " requires | has requirement " <<<"$out" | grep -vE "^silero-vad [0-9.]+ requires torch," || true)
  if [ -n "$problems" ] || ! grep -qE " requires | has requirement " <<<"$out"; then
    printf '%s\n' "$out" >&2
    exit 1
  fi
fi
echo "setup: done. Run the tests with: .venv/bin/python -m pytest -q"
