"""Every bad input the issue lists ends in failed/ (with <name>.error.json) or a clear log line, and the daemon
keeps going: the good recording dropped after each bad one is still processed."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from heygem_watch.media import probe
from tests import gen_media
from tests.conftest import drain


def today():
    return time.strftime("%Y-%m-%d")


def run_all(d):
    d.watcher.scan()
    got = d.watcher.check()
    drain(d)
    return got


def error_json(d, name):
    return json.loads((d.settings.failed_dir / today() / f"{name}.error.json").read_text())


def assert_still_works(d, name="after.wav"):
    gen_media.write_wav(d.settings.incoming_dir / name, gen_media.speech(0.4, seed=hash(name) % 1000))
    run_all(d)
    assert (d.settings.outputs_dir / today() / Path(name).stem / "anchor.mp4").exists()


@pytest.mark.parametrize("name,make,reason", [
    ("empty.flv", lambda p: p.write_bytes(b""), "empty"),
    ("notes.flv", gen_media.text_file, "not a readable"),
    ("mute.mp4", lambda p: gen_media.write_av(p, 1.0, audio=None), "no audio track"),
])
def test_unusable_recording_goes_to_failed(daemon_factory, name, make, reason):
    d = daemon_factory()
    src = d.settings.incoming_dir / name
    make(src)
    assert run_all(d) == [src]
    assert not src.exists() and (d.settings.failed_dir / today() / name).exists()
    err = error_json(d, name)
    assert reason in err["reason"] and err["recording"] == name and err["failed_at"]
    recent = d.ledger.recent_recordings(1)  # an empty file never enters the ledger (it is nobody's duplicate)
    assert (recent[0].state == "failed") if name != "empty.flv" else recent == []
    assert_still_works(d)


def test_truncated_flv_processes_what_is_decodable_and_says_so(daemon_factory, tmp_path):
    d = daemon_factory()
    full = gen_media.write_av(tmp_path / "full.flv", 3.0)
    src = gen_media.truncate(full, d.settings.incoming_dir / "crashed obs.flv", 0.6)
    run_all(d)
    out = d.settings.outputs_dir / today() / "crashed obs"
    info = probe(out / "anchor.mp4")
    assert 0.8 < info.duration < 2.6  # part of the 3 s
    man = json.loads((out / "manifest.json").read_text())
    assert man["state"] == "done" and any("truncated" in n for n in man["notes"])
    assert (d.settings.archive_dir / today() / "crashed obs.flv").exists() and not src.exists()
    log = (d.settings.logs_dir / today() / "crashed obs.jsonl").read_text()
    assert "truncated" in log


def test_silent_recording_is_valid(daemon_factory):
    d = daemon_factory()
    gen_media.write_av(d.settings.incoming_dir / "quiet.mp4", 1.0, audio=np.zeros(16000, np.float32))
    run_all(d)
    out = d.settings.outputs_dir / today() / "quiet"
    assert abs(probe(out / "anchor.mp4").duration - 1.0) < 0.15
    assert json.loads((out / "manifest.json").read_text())["state"] == "done"


@pytest.mark.parametrize("name", ["voice.wav", "voice.m4a"])
def test_audio_only_recording_is_valid(daemon_factory, name):
    d = daemon_factory()
    p = d.settings.incoming_dir / name
    if name.endswith(".wav"):
        gen_media.write_wav(p, gen_media.speech(0.8))
    else:
        gen_media.write_av(p, 0.8, video=False)
    run_all(d)
    info = probe(d.settings.outputs_dir / today() / "voice" / "anchor.mp4")
    assert info.has_video and info.has_audio and abs(info.duration - 0.8) < 0.15


def test_template_without_face_is_marked_unusable_and_skipped(daemon_factory, face_template_file,
                                                              faceless_template_file, capsys):
    d = daemon_factory(templates=(face_template_file, faceless_template_file))
    checks = d.check_templates()  # what the rescan job does when a template appears, before any recording
    by_name = {c["name"]: c for c in checks.values()}
    assert by_name["anchor.png"]["usable"] and not by_name["wall.png"]["usable"]
    assert "no face found" in by_name["wall.png"]["reason"]
    assert '"template_unusable"' in capsys.readouterr().out
    gen_media.write_wav(d.settings.incoming_dir / "r.wav", gen_media.speech(0.4))
    run_all(d)
    assert [t.template_name for t in d.ledger.tasks_for(1)] == ["anchor.png"]  # the fan-out skips it
    rec = d.ledger.recording(1)
    assert rec.state == "done"  # done: every usable template is done
    man = json.loads((Path(rec.output_dir) / "manifest.json").read_text())
    assert man["state"] == "done" and man["unusable_templates"][0]["template"] == "wall.png"
    assert "no face" in man["unusable_templates"][0]["reason"]


def test_tasks_queued_before_a_template_was_found_unusable_do_not_make_it_partial(daemon_factory, face_template_file,
                                                                                 faceless_template_file):
    from heygem_watch.ledger import fingerprint_file

    d = daemon_factory(templates=(face_template_file, faceless_template_file))
    src = d.settings.incoming_dir / "old.wav"
    gen_media.write_wav(src, gen_media.speech(0.4))
    tpls = [(str(p), fingerprint_file(p)) for p in sorted(d.settings.template_dir.iterdir())]
    d.ledger.add_recording(src, fingerprint_file(src), src.stat().st_size, tpls,  # queued by an older version
                           output_dir=d.settings.outputs_dir / today() / "old")
    drain(d)
    tasks = {t.template_name: t for t in d.ledger.tasks_for(1)}
    assert tasks["anchor.png"].state == "done" and tasks["wall.png"].state == "failed"
    assert "unusable" in tasks["wall.png"].error and "no face" in tasks["wall.png"].error
    assert d.ledger.recording(1).state == "done"  # every usable template is done
    assert (d.settings.archive_dir / today() / "old.wav").exists()


def test_only_unusable_templates_leave_the_recording_waiting(daemon_factory, faceless_template_file, capsys):
    d = daemon_factory(templates=(faceless_template_file,))
    src = d.settings.incoming_dir / "r.wav"
    gen_media.write_wav(src, gen_media.speech(0.4))
    run_all(d)
    assert src.exists() and d.ledger.recent_recordings(1) == []
    assert '"no_usable_templates"' in capsys.readouterr().out


def test_template_with_some_faceless_frames_is_used(daemon_factory, tmp_path):
    tpl = gen_media.face_video(tmp_path / "mixed.mp4", n=10, faceless=frozenset({3, 4, 5}))
    d = daemon_factory(templates=(tpl,))
    gen_media.write_wav(d.settings.incoming_dir / "r.wav", gen_media.speech(0.6))
    run_all(d)
    t = d.ledger.tasks_for(1)[0]
    assert t.state == "done", t.error
    assert 0.5 < t.timings["face_fraction"] < 0.9


def test_unreadable_file_goes_to_failed(daemon_factory, monkeypatch):
    d = daemon_factory()
    src = d.settings.incoming_dir / "locked.flv"
    gen_media.write_av(src, 0.5)
    if os.geteuid() == 0:  # root reads anything: make the read fail the way it would for the service user
        import heygem_watch.ingest as dm

        real = dm.fingerprint_file

        def deny(p):
            if Path(p).name == "locked.flv":
                raise PermissionError(13, "Permission denied", str(p))
            return real(p)

        monkeypatch.setattr(dm, "fingerprint_file", deny)
    else:
        src.chmod(0)
    run_all(d)
    err = error_json(d, "locked.flv")
    assert "cannot read" in err["reason"] and "ermission" in err["exception"]
    assert (d.settings.failed_dir / today() / "locked.flv").exists()
    monkeypatch.undo()
    assert_still_works(d)


def test_hundred_files_at_once_all_processed_in_order(daemon_factory):
    d = daemon_factory()
    base = time.time() - 500
    names = [f"clip {(i * 37) % 100:02d}.wav" for i in range(100)]
    for i, n in enumerate(names):
        p = d.settings.incoming_dir / n
        gen_media.write_wav(p, gen_media.tone(0.08, 200 + 5 * i))
        os.utime(p, (base + i, base + i))
    d.watcher.scan()
    assert len(d.watcher.check()) == 100
    order = []
    while (t := d.run_one()) is not None:
        order.append(d.ledger.recording(t.recording_id).name)
    assert order == names
    assert len(list((d.settings.outputs_dir / today()).glob("*/anchor.mp4"))) == 100
    assert not any(d.settings.incoming_dir.iterdir())
    assert d.ledger.recording_counts()["done"] == 100
