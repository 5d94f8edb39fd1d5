"""setup.sh: Debian packages are installed even while apt is busy (unattended-upgrades holds its locks)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKED = ("E: Could not get lock /var/lib/apt/lists/lock. It is held by process 812 (unattended-upgr)\n"
          "E: Unable to lock directory /var/lib/apt/lists/\n")

FAKE_APT = """#!/bin/bash
# apt-get as it behaves while unattended-upgrades runs: the first {busy} calls find the lock taken
n=$(cat "{state}/calls" 2>/dev/null || echo 0); echo $((n + 1)) > "{state}/calls"
echo "$*" >> "{state}/args"
if [ "$n" -lt {busy} ]; then printf '%s' "{locked}" >&2; exit 100; fi
exit 0
"""


def _sandbox(tmp_path: Path, busy: int) -> tuple[Path, dict]:
    """setup.sh in a copy of the checkout with fake apt-get/id (root) and a fake .venv: only the apt part is real."""
    work, fake, state = tmp_path / "checkout", tmp_path / "bin", tmp_path / "state"
    for d in (work / ".venv" / "bin", fake, state):
        d.mkdir(parents=True)
    shutil.copy(ROOT / "setup.sh", work / "setup.sh")
    scripts = {"apt-get": FAKE_APT.format(busy=busy, state=state, locked=LOCKED), "id": "#!/bin/sh\necho 0\n"}
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    (work / ".venv" / "bin" / "python").write_text("#!/bin/sh\nexit 0\n")  # pip install/check: not this test's job
    (work / ".venv" / "bin" / "python").chmod(0o755)
    for tool in ("dirname", "cat", "sleep", "grep", "date", "printf"):  # only what the script needs; no chromium
        real = shutil.which(tool)
        if real and not (fake / tool).exists():
            os.symlink(real, fake / tool)
    env = {"PATH": str(fake), "HOME": str(tmp_path), "HEYGEM_APT_RETRY_S": "0.2"}
    return work, env


def test_setup_waits_for_a_busy_apt(tmp_path):
    work, env = _sandbox(tmp_path, busy=3)
    r = subprocess.run(["/bin/bash", str(work / "setup.sh")], cwd=work, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    args = (tmp_path / "state" / "args").read_text().splitlines()
    assert sum(" update" in a for a in args) == 4  # three refusals, then it went through
    install = [a for a in args if " install " in a]
    assert len(install) == 1 and "chromium" in install[0] and "DPkg::Lock::Timeout=" in install[0]
    assert "apt is busy" in r.stdout + r.stderr


def test_setup_skips_apt_when_asked(tmp_path):
    work, env = _sandbox(tmp_path, busy=0)
    r = subprocess.run(["/bin/bash", str(work / "setup.sh")], cwd=work, env=dict(env, HEYGEM_SKIP_APT="1"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "state" / "args").exists()


def test_setup_installs_the_speech_detector_version_the_engine_pins():
    """setup.sh installs silero-vad (without its torch) at exactly the version whose model hash vad.py pins."""
    import re

    from heygem_watch import vad

    text = (ROOT / "setup.sh").read_text()
    pins = re.findall(r'install --no-deps "silero-vad==([0-9.]+)"', text)
    assert pins == [vad.VERSION]
