"""requeue.py and the ways into it: a known recording rendered with a new template (`rerun`, incoming/ again),
outputs added to the same dated folder and manifest, rendered from the archived source."""
import json
import shutil
import time
from pathlib import Path

from heygem_watch import cli
from tests import gen_media
from tests.conftest import drain


def today() -> str:
    return time.strftime("%Y-%m-%d")


def ingest_all(d):
    d.watcher.scan()
    return d.watcher.check()


def finished(daemon_factory):
    d = daemon_factory()
    gen_media.write_wav(d.settings.incoming_dir / "talk.wav", gen_media.speech(0.5))
    ingest_all(d)
    assert drain(d) == 1
    rec = d.ledger.recent_recordings(1)[0]
    assert rec.state == "done"
    gen_media.face_png(d.settings.template_dir / "ben.png", size=(200, 240))  # a new avatar, new content
    return d, rec


def test_rerun_command_queues_only_the_new_template_and_adds_to_the_same_folder(daemon_factory, env_clean,
                                                                                 capsys):
    monkeypatch = env_clean
    d, rec = finished(daemon_factory)
    monkeypatch.setenv("HEYGEM_VAR_DIR", str(d.settings.var_dir))
    capsys.readouterr()
    assert cli.main(["rerun", "talk", "--template", "ben.png", "-t", "anchor.png"]) == 0
    out = capsys.readouterr().out
    assert "queued ben.png" in out and "already had anchor.png" in out
    assert drain(d) == 1
    out_dir = Path(rec.output_dir)
    assert sorted(p.name for p in out_dir.glob("*.mp4")) == ["anchor.mp4", "ben.mp4"]
    man = json.loads((out_dir / "manifest.json").read_text())
    assert man["state"] == "done" and [t["template"] for t in man["templates"]] == ["anchor.png", "ben.png"]
    archived = d.settings.archive_dir / today() / "talk.wav"
    assert archived.exists() and d.ledger.recording(rec.id).final_path == str(archived)
    assert len(list(d.settings.archive_dir.rglob("*.wav"))) == 1
    assert cli.main(["rerun", str(rec.id), "-t", "ben.png"]) == 0
    assert "nothing new to queue" in capsys.readouterr().out and drain(d) == 0
    assert cli.main(["rerun", str(rec.id), "-t", "nobody.png"]) == 1
    assert "nobody.png: not found" in capsys.readouterr().err


def test_dropping_a_known_recording_again_renders_the_templates_it_lacks(daemon_factory, capsys):
    d, rec = finished(daemon_factory)
    copy = d.settings.incoming_dir / "talk again.wav"
    shutil.copy(d.settings.archive_dir / today() / "talk.wav", copy)
    capsys.readouterr()
    ingest_all(d)
    ev = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"recording_requeued"' in x]
    assert ev and ev[0]["queued"] == ["ben.png"] and ev[0]["existing"] == ["anchor.png"]
    assert drain(d) == 1
    assert sorted(p.name for p in Path(rec.output_dir).glob("*.mp4")) == ["anchor.mp4", "ben.mp4"]
    assert not copy.exists() and d.ledger.recording(rec.id).state == "done"
    # once every template is done, a copy is a plain duplicate again
    shutil.copy(d.settings.archive_dir / today() / "talk.wav", copy)
    ingest_all(d)
    assert drain(d) == 0 and not copy.exists()
    assert d.ledger.events("duplicate")[0]["detail"]["queued"] == []


def test_rerun_refuses_a_recording_whose_source_is_gone(daemon_factory, env_clean, capsys):
    monkeypatch = env_clean
    d = daemon_factory(HEYGEM_ON_DONE="delete")
    gen_media.write_wav(d.settings.incoming_dir / "gone.wav", gen_media.speech(0.4))
    ingest_all(d)
    drain(d)
    gen_media.face_png(d.settings.template_dir / "ben.png", size=(200, 240))
    monkeypatch.setenv("HEYGEM_VAR_DIR", str(d.settings.var_dir))
    monkeypatch.setenv("HEYGEM_ON_DONE", "delete")
    assert cli.main(["rerun", "gone.wav", "-t", "ben.png"]) == 1
    assert "no longer kept" in capsys.readouterr().err
    assert d.ledger.counts()["queued"] == 0
