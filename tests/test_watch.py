"""watch.py: settling with an injected clock, ignored names, refused symlinks, open writers, a growing file."""
import os
import time
from pathlib import Path

import pytest

from heygem_watch.watch import IncomingWatcher, ignored_name, open_for_writing

EXTS = (".flv", ".mp4", ".wav")


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def rig(tmp_path):
    inc = tmp_path / "incoming"
    inc.mkdir()
    clock, ready, refused = Clock(), [], []
    w = IncomingWatcher(inc, EXTS, 10, ready.append, clock=clock, writer_check=lambda p: False,
                        on_refused=lambda p, why: refused.append((p, why)))
    return w, inc, clock, ready, refused


def test_taken_only_after_settle_time_unchanged(rig):
    w, inc, clock, ready, _ = rig
    f = inc / "rec.flv"
    f.write_bytes(b"a" * 100)
    w.scan()
    assert w.check() == []
    clock.t += 9.9
    assert w.check() == []
    with open(f, "ab") as fh:  # grows: the settle period starts again
        fh.write(b"b" * 100)
    clock.t += 0.5
    assert w.check() == []
    clock.t += 9.0
    assert w.check() == []
    clock.t += 1.1
    assert w.check() == [f] and ready == [f]
    clock.t += 100
    w.scan()
    assert w.check() == [] and ready == [f]  # handed on once


def test_a_changed_file_with_the_same_name_is_taken_again(rig):
    w, inc, clock, ready, _ = rig
    f = inc / "rec.flv"
    f.write_bytes(b"one")
    w.scan()
    clock.t += 11
    w.check()
    f.unlink()
    w.scan()
    f.write_bytes(b"second recording")
    w.scan()
    clock.t += 11
    assert w.check() == [f] and len(ready) == 2


@pytest.mark.parametrize("name", [".hidden.flv", "rec.flv.part", "rec.tmp", "rec.flv~", "notes.txt", "rec.FLV.crdownload"])
def test_hidden_temp_and_other_types_ignored(rig, name):
    w, inc, clock, ready, refused = rig
    (inc / name).write_bytes(b"x" * 10)
    w.scan()
    clock.t += 100
    assert w.check() == [] and ready == [] and refused == []


def test_ignored_name_rules():
    assert ignored_name(".x.flv") and ignored_name("a.part") and ignored_name("a~")
    assert not ignored_name("- leading dash 直播 'quoted'.flv")


def test_upper_case_extension_and_odd_names_accepted(rig):
    w, inc, clock, ready, _ = rig
    f = inc / "-直播 \"quoted\" 'x'.FLV"
    f.write_bytes(b"x")
    w.scan()
    clock.t += 11
    assert w.check() == [f]


def test_symlinks_and_escapes_refused(rig, tmp_path):
    w, inc, clock, ready, refused = rig
    outside = tmp_path / "secret.flv"
    outside.write_bytes(b"x" * 10)
    (inc / "link.flv").symlink_to(outside)
    (inc / "inner.flv").write_bytes(b"y")
    (inc / "link2.flv").symlink_to(inc / "inner.flv")
    w.scan()
    w.scan()  # refused once per path, not per scan
    clock.t += 100
    assert w.check() == [inc / "inner.flv"]
    assert sorted(p.name for p, _ in refused) == ["link.flv", "link2.flv"]
    assert all("symlink" in why for _, why in refused)


def test_hundred_files_handed_on_in_arrival_order(rig):
    w, inc, clock, ready, _ = rig
    base = time.time() - 1000
    names = [f"r{(i * 37) % 100:03d}.wav" for i in range(100)]  # arrival order differs from name order
    for i, n in enumerate(names):
        p = inc / n
        p.write_bytes(b"x" * (i + 1))
        os.utime(p, (base + i, base + i))
    w.scan()
    clock.t += 11
    assert [p.name for p in w.check()] == names


def test_open_for_writing_sees_our_own_writer(tmp_path):
    f = tmp_path / "obs.flv"
    fh = open(f, "wb")
    try:
        fh.write(b"x")
        fh.flush()
        assert open_for_writing(f)
    finally:
        fh.close()
    assert not open_for_writing(f)
    with open(f, "rb"):  # readers do not count
        assert not open_for_writing(f)


def test_file_held_open_is_not_taken(tmp_path):
    inc = tmp_path / "in"
    inc.mkdir()
    clock, ready = Clock(), []
    w = IncomingWatcher(inc, EXTS, 5, ready.append, clock=clock)  # real /proc writer check
    f = inc / "live.flv"
    fh = open(f, "wb")
    fh.write(b"header")
    fh.flush()
    w.scan()
    clock.t += 60
    assert w.check() == []  # unchanged for a minute but OBS still has it open
    fh.close()
    clock.t += 1
    assert w.check() == []  # a full settle period after the writer closed it
    clock.t += 5
    assert w.check() == [f]


def test_growing_file_with_real_observer(tmp_path):
    """A file written in chunks for longer than the settle time is taken only after the writes stop."""
    inc = tmp_path / "in"
    inc.mkdir()
    got: list[tuple[float, Path]] = []
    w = IncomingWatcher(inc, EXTS, 0.4, lambda p: got.append((time.monotonic(), p)))
    w.start()
    try:
        f = inc / "growing.flv"
        with open(f, "wb") as fh:
            for _ in range(12):  # 1.2 s of writing, 3x the settle time
                fh.write(os.urandom(4096))
                fh.flush()
                last_write = time.monotonic()
                time.sleep(0.1)
            assert got == []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p for _, p in got] == [f]
        assert got[0][0] - last_write >= 0.4  # unchanged for the settle time, and closed
        (inc / "late.wav").write_bytes(b"x")  # the observer (not a scan) notices new files
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.name for _, p in got] == ["growing.flv", "late.wav"]
    finally:
        w.stop()


def test_polling_observer_also_works(tmp_path):
    inc = tmp_path / "in"
    inc.mkdir()
    got = []
    w = IncomingWatcher(inc, EXTS, 0.2, got.append, polling=True)
    w.start()
    try:
        (inc / "a.mp4").write_bytes(b"x" * 100)
        deadline = time.monotonic() + 6
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [inc / "a.mp4"]
    finally:
        w.stop()
