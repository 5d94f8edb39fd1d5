"""Settings from config.env (python-dotenv) and the environment; real environment variables win.

Every key is HEYGEM_*; `load_settings` returns the Settings plus nothing else, raising ConfigError that lists
every bad or unknown key by name. Relative paths resolve against the current directory at load time.
Kept light (no numpy/av imports): `heygem-watch` imports it on every start.
"""
from __future__ import annotations

import fnmatch
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

DEFAULT_CONFIG = Path("config.env")  # read from the current directory when --config is not given
PREFIX = "HEYGEM_"
MIN_MAX_SIDE = 256  # HEYGEM_MAX_SIDE below this leaves too few pixels for a face
DEFAULT_EXTENSIONS = ".flv,.mp4,.mkv,.mov,.avi,.webm,.wav,.mp3,.m4a,.aac,.flac,.ogg"
ON_DONE_CHOICES = ("archive", "keep", "delete")
LOG_FORMATS = ("json", "console")
ENGINE_CHOICES = ("auto", "builtin", "onnx")
ONNX_PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
DISPATCH_CHOICES = ("local", "celery")
DETECTOR_PATTERNS = ("scrfd*.onnx", "det_*.onnx")  # insightface face detectors users may put in models/
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
# superfast leaves out veryfast's macroblock-tree rate control (and the lookahead it needs): these put it back, which
# halves superfast's files at the same crf. With a slower preset set "-" (its own lookahead is longer than 10).
X264_DEFAULT_PARAMS = "mbtree=1:rc-lookahead=10"
_X264_PARAM = re.compile(r"[a-z0-9][a-z0-9_-]*=[^:=\s]+")

# key -> (default as text, one-line description). The README's table and config.env.example follow this order.
KEYS: dict[str, tuple[str, str]] = {
    "HEYGEM_VAR_DIR": ("./var", "state, outputs, archive, logs, cache"),
    "HEYGEM_INCOMING_DIR": ("$HEYGEM_VAR_DIR/incoming", "folder watched for recordings"),
    "HEYGEM_TEMPLATE_DIR": ("$HEYGEM_VAR_DIR/templates", "every video or image in it is an avatar template"),
    "HEYGEM_CACHE_DIR": ("$XDG_CACHE_HOME/heygem-watch", "template analyses kept by `heygem-watch process` and "
                         "farm workers (else ~/.cache/heygem-watch); the daemon keeps its own in $HEYGEM_VAR_DIR/cache"),
    "HEYGEM_MODEL_DIR": ("./models", "where models live (relative HEYGEM_MODEL paths resolve here too)"),
    "HEYGEM_MODEL": ("", "ONNX lip-sync model; empty = the only .onnx in HEYGEM_MODEL_DIR, if exactly one"),
    "HEYGEM_ENGINE": ("auto", "auto | builtin | onnx (auto = onnx when a model is set)"),
    "HEYGEM_SPEECH_MODEL": ("", "built-in engine's speech model (`heygem-watch train-speech` output); empty = shipped"),
    "HEYGEM_SPEECH_DETECTOR": ("true", "the mouth moves only where a voice speaks (false: karaoke, music streams; "
                               "music alone then moves it too)"),
    "HEYGEM_EXTENSIONS": (DEFAULT_EXTENSIONS, "recording file types taken from incoming"),
    "HEYGEM_SETTLE_SECONDS": ("10", "a file must be unchanged (and closed) this long before it is taken"),
    "HEYGEM_POLLING": ("false", "poll the folder instead of inotify (network shares)"),
    "HEYGEM_RESCAN_SECONDS": ("60", "periodic rescan of incoming (catches missed events)"),
    "HEYGEM_ON_DONE": ("archive", "archive | keep | delete the source when finished"),
    "HEYGEM_RETENTION_DAYS": ("30", "delete dated folders older than this; 0 keeps forever"),
    "HEYGEM_MIN_FREE_MB": ("2048", "below this free space in var, new tasks wait"),
    "HEYGEM_LOG_FORMAT": ("", "json | console (default: console on a TTY, else json)"),
    "HEYGEM_LOG_LEVEL": ("info", "debug | info | warning | error"),
    "HEYGEM_X264_PRESET": ("superfast", "x264 preset for outputs"),
    "HEYGEM_X264_CRF": ("17", "x264 quality (0-51, lower is better)"),
    "HEYGEM_X264_PARAMS": (X264_DEFAULT_PARAMS, "extra x264 options, key=value:key=value (- for none)"),
    "HEYGEM_ENCODER_THREADS": ("0", "x264 threads, 0 = auto"),
    "HEYGEM_MAX_SIDE": ("1920", "outputs at most this many pixels on the long side: a larger template (a 4K phone "
                       "video) is scaled down once, when analysed; 0 keeps every template's size"),
    "HEYGEM_ONNX_PROVIDER": ("auto", "auto | cpu | cuda | tensorrt: where the ONNX engine runs"),
    "HEYGEM_ONNX_BATCH": ("0", "frames per ONNX inference call; 0 = auto (4 on CPU, up to 64 on GPU)"),
    "HEYGEM_ONNX_THREADS": ("0", "onnxruntime threads per inference run; 0 = auto"),
    "HEYGEM_DISPATCH": ("local", "local = render on this machine | celery = render farm (docs/farm.md)"),
    "HEYGEM_BROKER_URL": ("", "farm broker + result backend, redis://:PASSWORD@HOST:6379/0 or rediss://..."),
    "HEYGEM_VISIBILITY_TIMEOUT": ("7200", "farm: seconds before a task a dead worker held is delivered again"),
    "HEYGEM_WEB_HOST": ("127.0.0.1", "web dashboard address"),
    "HEYGEM_WEB_PORT": ("7860", "web dashboard port"),
    "HEYGEM_WEB_TOKEN": ("", "web dashboard access token; empty = no login (only safe on 127.0.0.1)"),
    "HEYGEM_WEB_MAX_UPLOAD_MB": ("4096", "largest upload accepted by the dashboard"),
}
# Settings fields the engine is built from (engines.engine_from_settings): a SIGHUP that changes one of them makes
# the daemon build a new engine before its next task (reload.py)
ENGINE_FIELDS = ("engine", "model", "onnx_options", "speech_model", "speech_detector")
# HEYGEM_* variables read by setup.sh, not by the service: present in an operator's shell, not a mistake
NON_RUNTIME_KEYS = ("HEYGEM_SKIP_APT", "HEYGEM_EXTRAS", "HEYGEM_GPU")


class ConfigError(ValueError):
    """One or more settings are wrong; .problems lists 'KEY: reason' strings."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


@dataclass
class EncoderSettings:
    """libx264 settings for outputs (media.VideoWriter reads them). superfast with veryfast's rate control, crf 17:
    on the judge's templates 0.2-0.6 dB PSNR under veryfast/crf 18 (both over 47 dB: visually lossless on faces),
    files 15-27 % larger, and 35-45 % less encoder CPU, which on 2 cores is most of a render's wall time."""

    preset: str = "superfast"
    crf: int = 17
    threads: int = 0  # 0 = let x264 choose (it uses all cores)
    params: str = X264_DEFAULT_PARAMS  # x264-params syntax, "" for none
    # long side of an output at most (px; 0: the template's size). A 4K template rendered at 0.7-0.8x real time
    # with 1.2-1.5 GB of RSS and cached 12 MB a frame on 2 cores; at 1920 it is a 1080p one
    max_side: int = 1920


@dataclass
class Settings:
    var_dir: Path
    incoming_dir: Path
    template_dir: Path
    model_dir: Path
    model: Path | None
    engine: str
    extensions: tuple[str, ...]
    settle_seconds: float
    polling: bool
    rescan_seconds: float
    on_done: str
    retention_days: int
    min_free_mb: int
    log_format: str  # json | console (resolved)
    log_level: str
    encoder: EncoderSettings
    web_host: str
    web_port: int
    web_token: str
    web_max_upload_mb: int
    onnx_options: dict = field(default_factory=dict)  # provider / batch_size / threads for the ONNX engine
    process_cache_dir: Path | None = None  # HEYGEM_CACHE_DIR: `process` and farm workers (not var/)
    dispatch: str = "local"  # local | celery (see dispatch.py)
    broker_url: str = ""  # secret (may hold the Redis password): never logged
    visibility_timeout: float = 7200.0
    speech_model: Path | None = None  # built-in engine's speech head; None = the one shipped in the package
    speech_detector: bool = True  # both engines: the mouth moves only where vad.py hears speech
    config_file: Path | None = None  # the file read, None when none

    # Folders under var/; the daemon creates them.
    @property
    def outputs_dir(self) -> Path:
        return self.var_dir / "outputs"

    @property
    def archive_dir(self) -> Path:
        return self.var_dir / "archive"

    @property
    def failed_dir(self) -> Path:
        return self.var_dir / "failed"

    @property
    def logs_dir(self) -> Path:
        return self.var_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        return self.var_dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        return self.var_dir / "tmp"

    @property
    def ledger_path(self) -> Path:
        return self.var_dir / "ledger.sqlite3"

    def as_dict(self) -> dict:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if k != "encoder"}
        d["encoder"] = dict(self.encoder.__dict__)
        d["extensions"] = list(self.extensions)
        d.pop("web_token", None)  # never logged
        if d.get("broker_url"):
            d["broker_url"] = redact_url(d["broker_url"])
        return d


def redact_url(url: str) -> str:
    """redis://:secret@host:6379/0 -> redis://:***@host:6379/0 (for logs and status)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, _, host = rest.rpartition("@")
    user = cred.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _read_file(path: Path) -> dict[str, str]:
    from dotenv import dotenv_values

    return {k: (v if v is not None else "") for k, v in dotenv_values(path).items()}


def _bool(key: str, raw: str, problems: list[str]) -> bool:
    v = raw.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    problems.append(f"{key}: expected true/false, got {raw!r}")
    return False


def _number(key: str, raw: str, problems: list[str], kind=int, lo: float | None = None, hi: float | None = None):
    try:
        v = kind(raw.strip())
    except ValueError:
        problems.append(f"{key}: expected a{'n integer' if kind is int else ' number'}, got {raw!r}")
        return kind(KEYS[key][0])
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"{lo if lo is not None else '-inf'}..{hi if hi is not None else 'inf'}"
        problems.append(f"{key}: {v} is out of range {rng}")
        return kind(KEYS[key][0])
    return v


def _max_side(raw: str, problems: list[str]) -> int:
    v = _number("HEYGEM_MAX_SIDE", raw, problems, int, 0, 16384)
    if 0 < v < MIN_MAX_SIDE:
        problems.append(f"HEYGEM_MAX_SIDE: {v} is too small (0, or {MIN_MAX_SIDE} and more)")
        return int(KEYS["HEYGEM_MAX_SIDE"][0])
    return v


def _choice(key: str, raw: str, choices: tuple[str, ...], problems: list[str]) -> str:
    v = raw.strip().lower()
    if v not in choices:
        problems.append(f"{key}: {raw!r} is not one of {', '.join(choices)}")
        return KEYS[key][0] or choices[0]
    return v


def _x264_params(key: str, raw: str, problems: list[str]) -> str:
    """'key=value:key=value' as libx264's x264-params takes it ("-" = none). x264 itself only warns about a name it
    does not know, so at least the shape is checked here."""
    v = raw.strip()
    if v == "-":
        return ""
    bad = [item for item in v.split(":") if not _X264_PARAM.fullmatch(item)]
    if bad:
        problems.append(f"{key}: {bad[0]!r} is not key=value (expected e.g. {X264_DEFAULT_PARAMS!r}, or - for none)")
        return X264_DEFAULT_PARAMS
    return v


def sole_model(model_dir: Path) -> Path | None:
    """The one lip-sync .onnx in model_dir, or None when there is none or several (then HEYGEM_MODEL must say).
    Face-detector files (DETECTOR_PATTERNS) are not lip-sync models and do not count."""
    try:
        found = [p for p in sorted(model_dir.glob("*.onnx"))
                 if p.is_file() and not any(fnmatch.fnmatch(p.name.lower(), pat) for pat in DETECTOR_PATTERNS)]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def load_settings(config: os.PathLike | str | None = None, environ: Mapping[str, str] | None = None,
                  cwd: os.PathLike | str | None = None, isatty: bool | None = None) -> Settings:
    """Read config (default ./config.env if present), overlay the environment, validate everything.

    Raises ConfigError listing every problem (unknown HEYGEM_* keys included) by key name.
    """
    environ = os.environ if environ is None else environ
    base = Path(cwd) if cwd is not None else Path.cwd()
    problems: list[str] = []
    values: dict[str, str] = {}
    config_file: Path | None = None
    if config is not None:
        cp = Path(config)
        cp = cp if cp.is_absolute() else base / cp
        if not cp.is_file():
            raise ConfigError([f"--config: {cp} does not exist or is not a file"])
        config_file = cp
    elif (base / DEFAULT_CONFIG).is_file():
        config_file = base / DEFAULT_CONFIG
    if config_file is not None:
        try:
            values.update(_read_file(config_file))
        except OSError as exc:
            raise ConfigError([f"{config_file}: cannot read ({exc.strerror or exc})"]) from None
    values.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})
    for k in sorted(values):
        if k.startswith(PREFIX) and k not in KEYS and k not in NON_RUNTIME_KEYS:
            problems.append(f"{k}: unknown setting (known: see config.env.example)")

    def raw(key: str) -> str:
        v = values.get(key)
        return KEYS[key][0] if v is None or v.strip() == "" else v.strip()

    def path(p: str, rel: Path) -> Path:
        p = os.path.expanduser(p)
        return Path(os.path.normpath(p if os.path.isabs(p) else rel / p))

    var_dir = path(raw("HEYGEM_VAR_DIR"), base)
    incoming = path(values["HEYGEM_INCOMING_DIR"], base) if values.get("HEYGEM_INCOMING_DIR", "").strip() \
        else var_dir / "incoming"
    templates = path(values["HEYGEM_TEMPLATE_DIR"], base) if values.get("HEYGEM_TEMPLATE_DIR", "").strip() \
        else var_dir / "templates"
    model_dir = path(raw("HEYGEM_MODEL_DIR"), base)
    if values.get("HEYGEM_CACHE_DIR", "").strip():
        process_cache = path(values["HEYGEM_CACHE_DIR"].strip(), base)
    else:  # XDG base directories: a one-off run leaves nothing in the folder it ran in
        xdg = environ.get("XDG_CACHE_HOME", "").strip()
        process_cache = (Path(xdg) if os.path.isabs(xdg) else Path(os.path.expanduser("~/.cache"))) / "heygem-watch"
    model = None
    if values.get("HEYGEM_MODEL", "").strip():
        m = os.path.expanduser(values["HEYGEM_MODEL"].strip())
        # a bare name or models/-relative path is looked up in the model dir first, then the cwd
        model = Path(m) if os.path.isabs(m) else (model_dir / m if (model_dir / m).exists() else path(m, base))
    if model is None:
        model = sole_model(model_dir)  # "configured" also means: exactly one lip-sync model was put in models/
    engine = _choice("HEYGEM_ENGINE", raw("HEYGEM_ENGINE"), ENGINE_CHOICES, problems)
    if engine == "onnx" and model is None:
        problems.append("HEYGEM_ENGINE: 'onnx' needs HEYGEM_MODEL (path to an .onnx file)")
    speech_model = None
    if values.get("HEYGEM_SPEECH_MODEL", "").strip():
        m = os.path.expanduser(values["HEYGEM_SPEECH_MODEL"].strip())
        speech_model = Path(m) if os.path.isabs(m) else (model_dir / m if (model_dir / m).exists() else path(m, base))
        if not speech_model.is_file():
            problems.append(f"HEYGEM_SPEECH_MODEL: {speech_model} does not exist or is not a file")
    exts = []
    for e in raw("HEYGEM_EXTENSIONS").split(","):
        e = e.strip().lower()
        if e:
            exts.append(e if e.startswith(".") else "." + e)
    if not exts:
        problems.append("HEYGEM_EXTENSIONS: no extensions given")
    log_format = values.get("HEYGEM_LOG_FORMAT", "").strip().lower()
    if log_format:
        log_format = _choice("HEYGEM_LOG_FORMAT", log_format, LOG_FORMATS, problems)
    else:
        tty = sys.stdout.isatty() if isatty is None else isatty
        log_format = "console" if tty else "json"
    encoder = EncoderSettings(
        preset=_choice("HEYGEM_X264_PRESET", raw("HEYGEM_X264_PRESET"), X264_PRESETS, problems),
        crf=_number("HEYGEM_X264_CRF", raw("HEYGEM_X264_CRF"), problems, int, 0, 51),
        threads=_number("HEYGEM_ENCODER_THREADS", raw("HEYGEM_ENCODER_THREADS"), problems, int, 0, 256),
        params=_x264_params("HEYGEM_X264_PARAMS", raw("HEYGEM_X264_PARAMS"), problems),
        max_side=_max_side(raw("HEYGEM_MAX_SIDE"), problems))
    onnx = {"provider": _choice("HEYGEM_ONNX_PROVIDER", raw("HEYGEM_ONNX_PROVIDER").lower(), ONNX_PROVIDERS, problems),
            "batch_size": _number("HEYGEM_ONNX_BATCH", raw("HEYGEM_ONNX_BATCH"), problems, int, 0, 4096),
            "threads": _number("HEYGEM_ONNX_THREADS", raw("HEYGEM_ONNX_THREADS"), problems, int, 0, 256)}
    dispatch = _choice("HEYGEM_DISPATCH", raw("HEYGEM_DISPATCH"), DISPATCH_CHOICES, problems)
    broker_url = values.get("HEYGEM_BROKER_URL", "").strip()
    if broker_url and not broker_url.startswith(("redis://", "rediss://", "redis+socket://")):
        problems.append(f"HEYGEM_BROKER_URL: {redact_url(broker_url)!r} is not a redis://, rediss:// or "
                        "redis+socket:// URL")
    if dispatch == "celery" and not broker_url:
        problems.append("HEYGEM_DISPATCH: 'celery' needs HEYGEM_BROKER_URL (redis://:PASSWORD@HOST:6379/0)")
    s = Settings(
        dispatch=dispatch, broker_url=broker_url,
        visibility_timeout=_number("HEYGEM_VISIBILITY_TIMEOUT", raw("HEYGEM_VISIBILITY_TIMEOUT"), problems, float,
                                   1, 30 * 86400),
        var_dir=var_dir, incoming_dir=incoming, template_dir=templates, model_dir=model_dir, model=model,
        engine=engine, extensions=tuple(dict.fromkeys(exts)),
        settle_seconds=_number("HEYGEM_SETTLE_SECONDS", raw("HEYGEM_SETTLE_SECONDS"), problems, float, 0, 86400),
        polling=_bool("HEYGEM_POLLING", raw("HEYGEM_POLLING"), problems),
        rescan_seconds=_number("HEYGEM_RESCAN_SECONDS", raw("HEYGEM_RESCAN_SECONDS"), problems, float, 1, 86400),
        on_done=_choice("HEYGEM_ON_DONE", raw("HEYGEM_ON_DONE"), ON_DONE_CHOICES, problems),
        retention_days=_number("HEYGEM_RETENTION_DAYS", raw("HEYGEM_RETENTION_DAYS"), problems, int, 0, 36500),
        min_free_mb=_number("HEYGEM_MIN_FREE_MB", raw("HEYGEM_MIN_FREE_MB"), problems, int, 0),
        log_format=log_format,
        log_level=_choice("HEYGEM_LOG_LEVEL", raw("HEYGEM_LOG_LEVEL"), ("debug", "info", "warning", "error"), problems),
        encoder=encoder,
        onnx_options=onnx,
        process_cache_dir=process_cache,
        speech_model=speech_model,
        speech_detector=_bool("HEYGEM_SPEECH_DETECTOR", raw("HEYGEM_SPEECH_DETECTOR"), problems),
        web_host=raw("HEYGEM_WEB_HOST"),
        web_port=_number("HEYGEM_WEB_PORT", raw("HEYGEM_WEB_PORT"), problems, int, 1, 65535),
        web_token=values.get("HEYGEM_WEB_TOKEN", "").strip(),
        web_max_upload_mb=_number("HEYGEM_WEB_MAX_UPLOAD_MB", raw("HEYGEM_WEB_MAX_UPLOAD_MB"), problems, int, 1),
        config_file=config_file)
    if problems:
        raise ConfigError(problems)
    return s
