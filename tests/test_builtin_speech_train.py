"""engines/builtin/speech_train.py and `heygem-watch train-speech` on a tiny synthetic corpus: the public-domain face
photo (tests/mediagen.py) whose mouth opens with the loudness of speech-like audio, two "speakers"."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from heygem_watch import cli
from heygem_watch.engines.builtin import speech_train as T
from heygem_watch.engines.builtin.head import load_head
from tests import mediagen

FPS = 25
SECONDS = 4.0


def talking_clip(path, seed):
    """A clip whose drawn mouth opening follows its audio's envelope (what a head can learn from)."""
    audio = mediagen.speech_like(SECONDS, seed=seed, gaps=[(1.6, 2.1)])
    n = int(SECONDS * FPS)
    hop = mediagen.SR // FPS
    env = np.array([np.sqrt(np.mean(audio[i * hop:(i + 1) * hop] ** 2)) for i in range(n)])
    opening = np.clip(env / (env.max() + 1e-9), 0, 1)
    return mediagen.write_video(path, mediagen.face_frames(n, mouth_open=opening), fps=FPS, audio=audio)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for spk, seeds in (("anna", (1, 2)), ("ben", (3, 4))):
        (root / spk).mkdir()
        for s in seeds:
            talking_clip(root / spk / f"clip{s}.mp4", s)
    return root


def test_speakers_come_from_the_manifest_else_the_folder(corpus, tmp_path):
    assert [(p.name, s) for p, s in T.find_clips([corpus])] == [
        ("clip1.mp4", "anna"), ("clip2.mp4", "anna"), ("clip3.mp4", "ben"), ("clip4.mp4", "ben")]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.mp4").write_bytes((corpus / "anna" / "clip1.mp4").read_bytes())
    (flat / "b.mp4").write_bytes((corpus / "ben" / "clip3.mp4").read_bytes())
    assert [s for _, s in T.find_clips([flat])] == ["a", "b"]
    (flat / "MANIFEST.tsv").write_text("file\tspeaker\tlicence\na.mp4\tSame Person\tx\nb.mp4\tSame Person\tx\n")
    assert [s for _, s in T.find_clips([flat])] == ["Same Person", "Same Person"]


def test_a_folder_without_videos_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no video here")
    rc = cli.main(["train-speech", "--corpus", str(tmp_path), "--out", str(tmp_path / "h.npz")])
    assert rc == 2 and "no video files" in capsys.readouterr().err and not (tmp_path / "h.npz").exists()


def test_targets_follow_the_drawn_mouth(corpus, tmp_path):
    clip = T.load_clip(corpus / "anna" / "clip1.mp4", "anna", None, tmp_path)
    assert clip is not None and len(clip.times) == SECONDS * FPS
    assert np.allclose(np.diff(clip.times), 1.0 / FPS, atol=1e-3)
    assert np.isfinite(clip.raw_open).mean() > 0.9
    # the gap (1.6-2.1 s) is silent: the drawn mouth is shut there, open in speech
    t = clip.times
    assert np.nanmean(clip.y[(t > 1.7) & (t < 2.0), 0]) < np.nanmean(clip.y[(t > 0.3) & (t < 1.4), 0]) - 0.2
    assert abs(len(clip.feats) - SECONDS * 50) <= 2 and clip.feats.shape[1] == 512  # AAC pads a few ms


def test_footage_a_phone_stored_sideways_is_tracked_upright(tmp_path):
    shown = list(mediagen.face_frames(8))
    plain = mediagen.write_video(tmp_path / "plain.mp4", shown, fps=FPS)
    phone = mediagen.write_video(tmp_path / "phone.mp4", [np.ascontiguousarray(np.rot90(f, 1)) for f in shown],
                                 fps=FPS, display=(-90, False))
    (_, want), (_, got) = T.track_video(plain, 0.0), T.track_video(phone, 0.0)
    assert np.isfinite(want).all() and np.isfinite(got).all()
    assert np.abs(got - want).max() < 4  # pixels, in the picture as shown


def test_train_speech_end_to_end_and_deterministic(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    out1, out2 = tmp_path / "one.npz", tmp_path / "two.npz"
    assert cli.main(["train-speech", "--corpus", str(corpus), "--out", str(out1), "--cache", str(cache)]) == 0
    text = capsys.readouterr().out
    assert "training on 4 clips, 2 speakers" in text and "leave-speaker-out pooled correlation: open" in text
    lso = float(text.split("leave-speaker-out pooled correlation: open ")[1].split(",")[0])
    assert lso > 0.3  # a head fitted on one "speaker" predicts the other's drawn mouth from the audio
    assert len(list(cache.glob("*.npz"))) == 4
    assert cli.main(["train-speech", "--corpus", str(corpus), "--out", str(out2), "--cache", str(cache)]) == 0
    assert out1.read_bytes() == out2.read_bytes()
    head = load_head(out1)
    assert head.targets == ("open", "width") and head.meta["speakers"] == 2
    assert head.meta["leave_speaker_out"]["open"] == pytest.approx(lso, abs=1e-3)


def test_the_engine_uses_a_trained_head(corpus, tmp_path, capsys):
    out = tmp_path / "mine.npz"
    assert cli.main(["train-speech", "--corpus", str(corpus / "anna"), "--out", str(out)]) == 0
    assert "training on 2 clips, 2 speakers" in capsys.readouterr().out  # loose files: each its own speaker
    from heygem_watch.engines import create_engine

    eng = create_engine("builtin", speech_model=out)
    assert eng.describe()["speech_model"] == "mine.npz"
    assert np.array_equal(eng.head.weights, load_head(out).weights)


# ------------------------------------------------------------------ --from: own footage starting from a base head

@pytest.fixture(scope="module")
def clips(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("clips")
    return [T.load_clip(p, s, None, cache) for p, s in T.find_clips([corpus])]


def small_base(clips):
    """A base head few enough weights (3 offsets x 6 components) that 2 clips determine a least-squares fit."""
    return T.fit(clips[2:], offsets=(-1, 0, 1), pca_dim=6, meta={"speakers": 1})


def design(head, clips):
    """Stacked features in head's basis and targets of every frame with a face, as gram() sees them."""
    b = T.head_basis(head)
    xs, ys = [], []
    for c in clips:
        z = ((c.feats.astype(np.float64) - b.mean) / b.scale) @ b.proj
        idx = np.clip(np.rint(c.times * T.whisper.FEATURE_RATE).astype(int), 0, len(z) - 1)
        ok = np.isfinite(c.y).all(1)
        xs.append(T._stack(z, idx[ok], head.offsets))
        ys.append(c.y[ok].astype(np.float64))
    return np.concatenate(xs), np.concatenate(ys)


def test_a_huge_strength_keeps_the_base_weights_and_a_tiny_one_is_least_squares(clips):
    base, own = small_base(clips), clips[:2]
    far = T.fit_from(base, own, strength=1e12)
    assert np.allclose(far.weights, base.weights, atol=1e-5)
    x, y = design(base, own)
    coef = np.linalg.lstsq(np.c_[x, np.ones(len(x))], y, rcond=None)[0]
    near = T.fit_from(base, own, strength=1e-9)
    assert np.allclose(near.weights, coef[:-1], rtol=1e-3, atol=1e-4 * np.abs(coef[:-1]).max())
    assert np.allclose(near.bias, coef[-1], atol=1e-3)
    assert not np.allclose(coef[:-1], base.weights, atol=1e-2)  # else the two checks above could not tell apart
    # in between, the weights move from the base toward the own-footage fit as the strength falls
    gaps = [np.abs(T.fit_from(base, own, strength=s).weights - base.weights).sum() for s in (1e5, 1e3, 10.0)]
    assert gaps[0] < gaps[1] < gaps[2]
    assert T.fit_from(base, own).meta["prior_strength"] == base.meta["frames"] / 1  # frames per base speaker


def test_from_keeps_the_base_basis_and_records_it(corpus, tmp_path, capsys):
    base_file, mine = tmp_path / "base.npz", tmp_path / "mine.npz"
    assert cli.main(["train-speech", "--corpus", str(corpus / "ben"), "--out", str(base_file)]) == 0
    assert cli.main(["train-speech", "--corpus", str(corpus / "anna"), "--out", str(mine),
                     "--from", str(base_file)]) == 0
    assert "started from base.npz" in capsys.readouterr().out
    base, head = load_head(base_file), load_head(mine)
    for k in ("mean", "scale", "proj", "offsets"):
        assert np.array_equal(getattr(head, k), getattr(base, k)), k
    assert not np.allclose(head.weights, base.weights)
    origin = head.meta["started_from"]
    assert origin["file"] == "base.npz" and origin["frames"] == base.meta["frames"]
    assert origin["sha256"] == hashlib.sha256(base_file.read_bytes()).hexdigest()
    assert head.meta["prior_strength"] == base.meta["frames"] / base.meta["speakers"]


def test_from_shipped_end_to_end(corpus, tmp_path, capsys):
    out = tmp_path / "presenter.npz"
    assert cli.main(["train-speech", "--corpus", str(corpus / "anna"), "--out", str(out), "--from", "shipped"]) == 0
    head, shipped = load_head(out), load_head(None)
    assert head.meta["started_from"]["file"] == "shipped"
    assert np.array_equal(head.proj, shipped.proj) and np.array_equal(head.offsets, shipped.offsets)
    assert not np.allclose(head.weights, shipped.weights, atol=1e-4)  # the footage moved it
    capsys.readouterr()
    missing = tmp_path / "nope.npz"
    rc = cli.main(["train-speech", "--corpus", str(corpus / "anna"), "--out", str(tmp_path / "x.npz"),
                   "--from", str(missing)])
    assert rc == 2 and "nope.npz" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
