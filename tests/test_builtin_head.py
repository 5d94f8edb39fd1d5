"""engines/builtin/head.py: streamed prediction equals one-shot, files round-trip, bad files are named."""
from __future__ import annotations

import numpy as np
import pytest

from heygem_watch.engines.builtin.head import SHIPPED, HeadError, SpeechHead, load_head


def random_head(offsets=range(-3, 6), dim=24, p=8, t=2, seed=0) -> SpeechHead:
    rng = np.random.default_rng(seed)
    offsets = np.asarray(list(offsets), np.int32)
    return SpeechHead(rng.normal(size=dim).astype(np.float32), rng.uniform(0.5, 2, dim).astype(np.float32),
                      rng.normal(size=(dim, p)).astype(np.float32), offsets,
                      rng.normal(size=(len(offsets) * p, t)).astype(np.float32), rng.normal(size=t).astype(np.float32),
                      ("open", "width")[:t])


def _blocks(feats, sizes):
    f0 = 0
    for s in sizes:
        if f0 >= len(feats):
            break
        yield f0, feats[f0:f0 + s]
        f0 += s


@pytest.mark.parametrize("sizes", [[500], [1] * 60, [7, 3, 50, 1, 200], [2, 2, 2, 100]])
@pytest.mark.parametrize("offsets", [range(-3, 6), range(0, 1), range(2, 9), range(-8, -1)])
def test_stream_equals_one_shot(sizes, offsets):
    head = random_head(offsets)
    feats = np.random.default_rng(1).normal(size=(sum(sizes), 24)).astype(np.float32)
    whole = head.predict(feats)
    parts = list(head.predict_stream(_blocks(feats, sizes)))
    got = np.concatenate([y for _, y in parts])
    starts = [f0 for f0, _ in parts]
    assert starts == sorted(starts) and starts[0] == 0
    assert got.shape == whole.shape == (len(feats), 2)
    assert np.allclose(got, whole, atol=1e-4)


def test_context_uses_neighbouring_frames():
    """One feature spike at frame 20 moves exactly the outputs whose context covers it (frames 20-5 .. 20+3)."""
    head = random_head(range(-3, 6))
    feats = np.tile(head.mean, (40, 1))
    base = head.predict(feats)
    feats[20] += 5.0
    moved = np.flatnonzero(np.abs(head.predict(feats) - base).max(1) > 1e-5)
    assert moved.tolist() == list(range(15, 24))


def test_out_of_order_blocks_are_an_error():
    head = random_head()
    feats = np.zeros((10, 24), np.float32)
    with pytest.raises(ValueError, match="out of order"):
        list(head.predict_stream([(0, feats), (12, feats)]))


def test_save_and_load_round_trip(tmp_path):
    head = random_head()
    head.meta = {"corpus": ["x"]}
    head.save(tmp_path / "h")  # no .npz suffix added behind the caller's back
    back = load_head(tmp_path / "h")
    assert back.targets == head.targets and back.meta["corpus"] == ["x"]
    x = np.random.default_rng(2).normal(size=(30, 24)).astype(np.float32)
    assert np.array_equal(back.predict(x), head.predict(x))


def test_bad_files_are_named(tmp_path):
    with pytest.raises(HeadError, match="not found"):
        load_head(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(HeadError, match="junk.npz"):
        load_head(junk)
    head = random_head()
    head.weights = head.weights[:-1]
    head.save(tmp_path / "bad.npz")
    with pytest.raises(HeadError, match="bad.npz: .*inconsistent"):
        load_head(tmp_path / "bad.npz")


def test_shipped_head_is_small_and_loads():
    head = load_head()
    assert SHIPPED.stat().st_size < 5e6
    assert head.mean.shape == (512,) and "open" in head.targets
    before, after = head.context
    assert after > 0  # it looks ahead: the mouth moves before its sound
    assert head.meta.get("corpus")


def test_a_head_fitted_on_other_encoder_layers_is_refused(tmp_path):
    """Features from another encoder depth mean nothing to a head: a train-speech head from before the depth was
    recorded (all 6 layers) and one from another depth are both refused by name; the shipped one matches."""
    from heygem_watch.engines.builtin.whisper import ENCODER_LAYERS

    assert load_head().meta["encoder_layers"] == ENCODER_LAYERS
    head = random_head()
    head.meta = {"whisper_sha256": "d01c", "compute_type": "int8"}  # what train-speech wrote before
    head.save(tmp_path / "old.npz")
    with pytest.raises(HeadError, match="old.npz: fitted on the features of 6 .*train-speech"):
        load_head(tmp_path / "old.npz")
    head.meta = {"encoder_layers": ENCODER_LAYERS + 1}
    head.save(tmp_path / "deeper.npz")
    with pytest.raises(HeadError, match="deeper.npz"):
        load_head(tmp_path / "deeper.npz")
