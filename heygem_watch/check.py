"""`heygem-watch check`: config, folders, free disk, onnxruntime, templates, engine and model, the built-in
speech model and the farm broker, each printed as ok or PROBLEM with its fix (exit 1 on any problem).

Its own module so cli.py stays wiring only; like the CLI, heavy imports happen inside the checks.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from heygem_watch.cli import EXIT_FAIL, EXIT_OK

MIN_FACE_FRACTION = 0.5  # `check` wants a face in most template frames


def _writable_dir(path: Path) -> str | None:
    """None if path is (or can be created as) a writable folder, else the problem in words."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        return f"{p} is not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable by {_user()}"
    return None


def _user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, KeyError):
        return "this user"


@contextmanager
def _native_quiet():
    """Native libraries' stderr during the block: known chatter dropped, anything else shown after it."""
    from heygem_watch import logrelay

    lines: list[str] = []
    try:
        with logrelay.quiet() as lines:
            yield
    finally:
        for line in lines:
            if logrelay.classify(line)["level"] != "debug":
                print(line, file=sys.stderr)


def _check_broker(settings, ok, bad) -> None:
    """Render farm: the broker answers with these credentials (and, for rediss://, this certificate)."""
    from heygem_watch import farm
    from heygem_watch.config import redact_url

    url = redact_url(settings.broker_url)
    try:
        farm.configure(settings).backend.client.ping()
    except Exception as exc:  # noqa: BLE001 - refused, timeout, wrong password, certificate: all the same problem
        bad(f"broker {url}: {type(exc).__name__}: {exc}",
            "start Redis there / fix HEYGEM_BROKER_URL (host, port, password; rediss:// for TLS), see docs/farm.md")
        return
    ok(f"broker {url} answers (dispatch: {settings.dispatch})")


def run_checks(settings) -> int:
    """Print OK/PROBLEM lines (each problem with its fix); exit 1 if there is any problem."""
    import shutil

    problems: list[tuple[str, str]] = []
    ok = lambda msg: print(f"ok       {msg}")  # noqa: E731

    def bad(msg: str, fix: str) -> None:
        problems.append((msg, fix))
        print(f"PROBLEM  {msg}\n         fix: {fix}")

    ok(f"config {settings.config_file or '(defaults + environment)'}")
    for name, d in (("var", settings.var_dir), ("incoming", settings.incoming_dir),
                    ("templates", settings.template_dir), ("outputs", settings.outputs_dir),
                    ("archive", settings.archive_dir), ("failed", settings.failed_dir), ("logs", settings.logs_dir),
                    ("cache", settings.cache_dir)):
        why = _writable_dir(d)
        if why:
            bad(f"{name} folder {d}: {why}", f"sudo install -d -o {_user()} {d}  (or set the HEYGEM_* path)")
        else:
            ok(f"{name} folder {d}" + ("" if d.exists() else " (created on start)"))
    p = settings.var_dir
    while not p.exists() and p.parent != p:
        p = p.parent
    free_mb = shutil.disk_usage(p).free / 2**20
    if free_mb < settings.min_free_mb:
        bad(f"only {free_mb:.0f} MB free in {p} (HEYGEM_MIN_FREE_MB={settings.min_free_mb})",
            "free disk space or lower HEYGEM_MIN_FREE_MB; new tasks wait until then")
    else:
        ok(f"free disk {free_mb:.0f} MB (minimum {settings.min_free_mb} MB)")
    try:
        import onnxruntime as ort

        ok(f"onnxruntime {ort.__version__}, providers: {', '.join(ort.get_available_providers())}")
    except Exception as exc:  # noqa: BLE001 - any import failure is the same problem
        bad(f"onnxruntime cannot be imported ({exc})", "run ./setup.sh again (pip install -e .)")
    from heygem_watch.housekeeping import list_templates, unused_in_template_dir

    tpls = list_templates(settings.template_dir)
    for name in unused_in_template_dir(settings.template_dir):  # said, not a problem: notes sit there too
        print(f"note     {name} in the templates folder is not used: not a video or image type heygem-watch reads "
              f"(an iPhone's HEIC photo: save it as JPEG; a GIF: as MP4)")
    if not tpls:
        bad(f"no templates in {settings.template_dir}",
            "copy at least one avatar video (a talking head, face visible) or photo there")
    if tpls:
        from heygem_watch.media import MediaError
        from heygem_watch.template import load_template

        for t in tpls:
            try:
                with _native_quiet():  # MediaPipe's start-up chatter would cut through the table
                    tpl = load_template(t, settings.cache_dir, max_side=settings.encoder.max_side)
            except MediaError as exc:
                bad(f"template {t.name}: unusable, recordings skip it: {exc.reason}",
                    f"replace {t} with a video or image showing a face")
                continue
            except Exception as exc:  # noqa: BLE001
                bad(f"template {t.name}: {type(exc).__name__}: {exc}", f"replace or remove {t}")
                continue
            desc = f"template {t.name}: {tpl.width}x{tpl.height}, {tpl.n_frames} frames, face in {tpl.face_fraction:.0%}"
            if tpl.notes:  # turned upright, HDR made SDR, scaled down, cut...: what outputs will differ in
                desc += f" ({'; '.join(tpl.notes)})"
            if tpl.face_fraction < MIN_FACE_FRACTION:
                bad(desc, "use a clip where the face is visible in most frames (face-less frames pass through "
                          "without lip-sync)")
            else:
                ok(desc)
    from heygem_watch import engines

    name = None
    try:
        name = engines.resolve_engine_name(settings.engine, settings.model)
        if settings.model is not None and not settings.model.is_file():
            bad(f"model {settings.model} does not exist", "fix HEYGEM_MODEL or put the .onnx file there "
                "(see README: Using your own Wav2Lip model)")
        elif name == "onnx" or settings.model is not None:
            t0 = time.monotonic()
            with _native_quiet():
                eng = engines.engine_from_settings(settings)
            ok(f"engine {name}: loaded in {time.monotonic() - t0:.1f} s {eng.describe()}")
            eng.close()
        else:
            import fnmatch

            from heygem_watch.config import DETECTOR_PATTERNS

            several = sorted(p.name for p in settings.model_dir.glob("*.onnx")
                             if not any(fnmatch.fnmatch(p.name.lower(), d) for d in DETECTOR_PATTERNS)) \
                if settings.model_dir.is_dir() else []
            if len(several) > 1 and settings.engine == "auto":
                bad(f"engine {name}: {len(several)} .onnx files in {settings.model_dir} ({', '.join(several)}), "
                    "none chosen", "set HEYGEM_MODEL to the one to use (or HEYGEM_ENGINE=builtin to silence this)")
            else:
                ok(f"engine {name} (no model configured)")
    except Exception as exc:  # noqa: BLE001
        bad(f"engine {settings.engine}: {exc}", "check HEYGEM_ENGINE / HEYGEM_MODEL")
    if name == "builtin":
        _check_speech(settings, ok, bad)
    elif settings.speech_detector:
        _check_detector(ok, bad)
    if settings.broker_url:
        _check_broker(settings, ok, bad)
    print(f"{len(problems)} problem(s)" if problems else "all checks passed")
    return EXIT_FAIL if problems else EXIT_OK


def _check_speech(settings, ok, bad) -> None:
    """The built-in engine's speech model: the head file, the Whisper model joined from its wheels and, unless
    HEYGEM_SPEECH_DETECTOR is off, the speech detector's model (hashes)."""
    from heygem_watch import vad
    from heygem_watch.engines.builtin.head import HeadError, load_head
    from heygem_watch.engines.builtin.whisper import WhisperModelError, verify_installed

    try:
        head = load_head(settings.speech_model)
    except HeadError as exc:
        bad(f"speech model: {exc}", "fix HEYGEM_SPEECH_MODEL (empty = the shipped one)")
        return
    try:
        verify_installed()
        if settings.speech_detector:
            vad.model_bytes()
    except (WhisperModelError, vad.VadModelError) as exc:
        bad(f"speech model: {exc}", "reinstall heygem-watch's dependencies (./setup.sh)")
        return
    where = settings.speech_model or "shipped"
    detector = (f"{vad.DIST} {vad.VERSION} verified" if settings.speech_detector
                else "speech detector off (HEYGEM_SPEECH_DETECTOR=false: music moves the mouth too)")
    ok(f"speech model {where} ({head.meta.get('clips', '?')} clips, {head.meta.get('speakers', '?')} speakers); "
       f"Whisper base verified; {detector}")


def _check_detector(ok, bad) -> None:
    """The speech detector's model alone (the ONNX engine gates its mel with it)."""
    from heygem_watch import vad

    try:
        vad.model_bytes()
    except vad.VadModelError as exc:
        bad(f"speech detector: {exc}", "reinstall heygem-watch's dependencies (./setup.sh), or set "
            "HEYGEM_SPEECH_DETECTOR=false")
        return
    ok(f"speech detector {vad.DIST} {vad.VERSION} verified")
