"""config.py: defaults, config file vs environment, validation by key name, path resolution."""
from pathlib import Path

import pytest

from heygem_watch.config import DEFAULT_EXTENSIONS, KEYS, ConfigError, EncoderSettings, load_settings


def test_defaults_without_any_config(tmp_path):
    s = load_settings(None, environ={}, cwd=tmp_path, isatty=False)
    assert s.var_dir == tmp_path / "var"
    assert s.incoming_dir == tmp_path / "var" / "incoming"
    assert s.template_dir == tmp_path / "var" / "templates"
    assert s.model_dir == tmp_path / "models" and s.model is None
    assert s.engine == "auto" and s.on_done == "archive"
    assert s.extensions == tuple(DEFAULT_EXTENSIONS.split(","))
    assert (s.settle_seconds, s.retention_days, s.rescan_seconds) == (10.0, 30, 60.0)
    assert s.polling is False and s.log_format == "json"
    assert s.encoder == EncoderSettings("superfast", 17, 0, "mbtree=1:rc-lookahead=10")
    assert s.ledger_path == tmp_path / "var" / "ledger.sqlite3"
    assert s.config_file is None


def test_console_logs_on_a_tty(tmp_path):
    assert load_settings(None, environ={}, cwd=tmp_path, isatty=True).log_format == "console"
    assert load_settings(None, environ={"HEYGEM_LOG_FORMAT": "json"}, cwd=tmp_path, isatty=True).log_format == "json"


def test_config_file_read_and_environment_wins(tmp_path):
    cfg = tmp_path / "my.env"
    cfg.write_text("# comment\nHEYGEM_VAR_DIR=/srv/hg\nHEYGEM_SETTLE_SECONDS=3\nHEYGEM_ON_DONE=keep\n"
                   "HEYGEM_EXTENSIONS=flv, .MP4\nHEYGEM_X264_CRF=23\n")
    s = load_settings(cfg, environ={"HEYGEM_SETTLE_SECONDS": "7.5", "PATH": "/bin"}, cwd=tmp_path, isatty=False)
    assert s.var_dir == Path("/srv/hg") and s.incoming_dir == Path("/srv/hg/incoming")
    assert s.settle_seconds == 7.5  # environment overrides the file
    assert s.on_done == "keep" and s.extensions == (".flv", ".mp4") and s.encoder.crf == 23
    assert s.config_file == cfg


def test_default_config_env_in_cwd_is_read(tmp_path):
    (tmp_path / "config.env").write_text("HEYGEM_RETENTION_DAYS=0\n")
    s = load_settings(None, environ={}, cwd=tmp_path, isatty=False)
    assert s.retention_days == 0 and s.config_file == tmp_path / "config.env"


def test_relative_paths_resolve_against_cwd(tmp_path):
    s = load_settings(None, environ={"HEYGEM_VAR_DIR": "data", "HEYGEM_INCOMING_DIR": "../obs out"}, cwd=tmp_path,
                      isatty=False)
    assert s.var_dir == tmp_path / "data"
    assert s.incoming_dir == tmp_path.parent / "obs out"
    assert s.template_dir == tmp_path / "data" / "templates"


def test_model_found_in_model_dir(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "w2l.onnx").write_bytes(b"x")
    s = load_settings(None, environ={"HEYGEM_MODEL": "w2l.onnx"}, cwd=tmp_path, isatty=False)
    assert s.model == tmp_path / "models" / "w2l.onnx"


def test_every_bad_value_and_unknown_key_reported_by_name(tmp_path):
    env = {"HEYGEM_SETTLE_SECONDS": "soon", "HEYGEM_ON_DONE": "burn", "HEYGEM_X264_CRF": "99",
           "HEYGEM_POLLING": "maybe", "HEYGEM_WEB_PORT": "0", "HEYGEM_SETTEL_SECONDS": "5", "HEYGEM_ENGINE": "magic"}
    with pytest.raises(ConfigError) as ei:
        load_settings(None, environ=env, cwd=tmp_path, isatty=False)
    text = str(ei.value)
    for key in env:
        assert key in text, key
    assert len(ei.value.problems) == len(env)


def test_x264_params_checked_and_dash_clears_them(tmp_path):
    s = load_settings(None, environ={"HEYGEM_X264_PARAMS": "-", "HEYGEM_X264_PRESET": "medium"}, cwd=tmp_path,
                      isatty=False)
    assert (s.encoder.preset, s.encoder.params) == ("medium", "")
    s = load_settings(None, environ={"HEYGEM_X264_PARAMS": "aq-mode=2:bframes=0"}, cwd=tmp_path, isatty=False)
    assert s.encoder.params == "aq-mode=2:bframes=0"
    for bad in ("mbtree", "mbtree=1::ref=2", "ref=2 bframes=0", "ref=2,bframes=0"):
        with pytest.raises(ConfigError, match="HEYGEM_X264_PARAMS") as ei:
            load_settings(None, environ={"HEYGEM_X264_PARAMS": bad}, cwd=tmp_path, isatty=False)
        assert "key=value" in str(ei.value)


def test_onnx_engine_needs_a_model(tmp_path):
    with pytest.raises(ConfigError, match="HEYGEM_ENGINE"):
        load_settings(None, environ={"HEYGEM_ENGINE": "onnx"}, cwd=tmp_path, isatty=False)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.env", environ={}, cwd=tmp_path)


def test_example_config_documents_every_key_in_order():
    import re

    example = (Path(__file__).resolve().parents[1] / "config.env.example").read_text()
    assert re.findall(r"^(HEYGEM_[A-Z0-9_]+)=", example, re.M) == list(KEYS)


def test_readme_table_lists_every_key_in_order():
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert re.findall(r"^\| `(HEYGEM_[A-Z0-9_]+)` \|", readme, re.M) == list(KEYS)


def test_example_config_loads_cleanly(tmp_path):
    example = Path(__file__).resolve().parents[1] / "config.env.example"
    s = load_settings(example, environ={}, cwd=tmp_path, isatty=False)
    assert s.var_dir == tmp_path / "var" and s.engine == "auto"


def test_onnx_options_are_validated_and_reach_the_engine_factory(tmp_path):
    s = load_settings(None, environ={"HEYGEM_ONNX_PROVIDER": "CUDA", "HEYGEM_ONNX_BATCH": "16"}, cwd=tmp_path)
    assert s.onnx_options == {"provider": "cuda", "batch_size": 16, "threads": 0}
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={"HEYGEM_ONNX_PROVIDER": "rocm", "HEYGEM_ONNX_BATCH": "-1"}, cwd=tmp_path)
    text = str(err.value)
    assert "HEYGEM_ONNX_PROVIDER" in text and "HEYGEM_ONNX_BATCH" in text


def test_auto_engine_uses_the_only_model_in_the_model_dir(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    assert load_settings(None, environ={}, cwd=tmp_path).model is None
    (models / "scrfd_10g_bnkps.onnx").write_bytes(b"x")  # a face detector is not a lip-sync model
    assert load_settings(None, environ={}, cwd=tmp_path).model is None
    (models / "wav2lip_gan.onnx").write_bytes(b"x")
    assert load_settings(None, environ={}, cwd=tmp_path).model == models / "wav2lip_gan.onnx"
    (models / "wav2lip.onnx").write_bytes(b"x")  # two candidates: nothing is guessed
    assert load_settings(None, environ={}, cwd=tmp_path).model is None
    s = load_settings(None, environ={"HEYGEM_MODEL": "wav2lip.onnx"}, cwd=tmp_path)
    assert s.model == models / "wav2lip.onnx"


def test_farm_settings_are_validated_and_the_broker_password_is_never_logged(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={"HEYGEM_DISPATCH": "celery"}, cwd=tmp_path)
    assert "HEYGEM_BROKER_URL" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_settings(None, environ={"HEYGEM_BROKER_URL": "amqp://guest@x//", "HEYGEM_DISPATCH": "farm"}, cwd=tmp_path)
    assert "HEYGEM_BROKER_URL" in str(err.value) and "HEYGEM_DISPATCH" in str(err.value)
    s = load_settings(None, environ={"HEYGEM_DISPATCH": "celery", "HEYGEM_BROKER_URL": "rediss://:s3cret@head:6380/0",
                                     "HEYGEM_CACHE_DIR": "/srv/cache", "HEYGEM_VISIBILITY_TIMEOUT": "900"},
                      cwd=tmp_path)
    assert (s.dispatch, s.broker_url, s.visibility_timeout) == ("celery", "rediss://:s3cret@head:6380/0", 900.0)
    assert s.process_cache_dir == Path("/srv/cache") and s.cache_dir == tmp_path / "var" / "cache"
    assert "s3cret" not in str(s.as_dict()) and s.as_dict()["broker_url"] == "rediss://:***@head:6380/0"
    d = load_settings(None, environ={}, cwd=tmp_path)
    assert d.dispatch == "local"


def test_speech_detector_switch(tmp_path):
    assert load_settings(None, environ={}, cwd=tmp_path).speech_detector is True
    assert load_settings(None, environ={"HEYGEM_SPEECH_DETECTOR": "off"}, cwd=tmp_path).speech_detector is False
    with pytest.raises(ConfigError, match="HEYGEM_SPEECH_DETECTOR: expected true/false, got 'sometimes'"):
        load_settings(None, environ={"HEYGEM_SPEECH_DETECTOR": "sometimes"}, cwd=tmp_path)


def test_max_side(tmp_path):
    assert load_settings(None, environ={}, cwd=tmp_path).encoder.max_side == 1920
    assert load_settings(None, environ={"HEYGEM_MAX_SIDE": "0"}, cwd=tmp_path).encoder.max_side == 0
    for bad in ("100", "-1", "big"):
        with pytest.raises(ConfigError, match="HEYGEM_MAX_SIDE"):
            load_settings(None, environ={"HEYGEM_MAX_SIDE": bad}, cwd=tmp_path)
