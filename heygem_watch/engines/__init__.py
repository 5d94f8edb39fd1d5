"""Engine factory: pick a lip-sync engine by name (rembg-style: one module per backend)."""
from __future__ import annotations

from pathlib import Path

from heygem_watch.engines.base import Engine, EngineError, FrameJob

ENGINE_NAMES = ("auto", "builtin", "onnx")

__all__ = ["Engine", "EngineError", "FrameJob", "ENGINE_NAMES", "resolve_engine_name", "create_engine",
           "engine_from_settings", "start_engine"]


def resolve_engine_name(name: str, model: Path | None) -> str:
    """auto -> onnx when a model is configured, else builtin."""
    if name not in ENGINE_NAMES:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_NAMES)}")
    if name == "auto":
        return "onnx" if model else "builtin"
    return name


def create_engine(name: str = "auto", model: Path | None = None, onnx_options: dict | None = None,
                  speech_model: Path | None = None, speech_detector: bool = True, **options) -> Engine:
    """Build the engine; heavy models load here, once. onnx_options (Settings.onnx_options: provider, batch_size,
    threads; 0/auto = decide) apply to the ONNX engine only, speech_model (HEYGEM_SPEECH_MODEL, None = the shipped
    one) to the built-in engine only; speech_detector (HEYGEM_SPEECH_DETECTOR) to both."""
    name = resolve_engine_name(name, model)
    if name == "builtin":
        from heygem_watch.engines.builtin.engine import BuiltinEngine

        return BuiltinEngine(speech_model=speech_model, speech_detector=speech_detector, **options)
    if model is None:
        raise EngineError("engine 'onnx' needs a model: pass --model PATH or set HEYGEM_MODEL")
    from heygem_watch.engines.onnx.engine import OnnxEngine

    extra = {k: v for k, v in (onnx_options or {}).items() if v not in (None, 0, "", "auto")}
    return OnnxEngine(Path(model), **extra, speech_detector=speech_detector, **options)


def engine_from_settings(settings, name: str | None = None, model: Path | None = None) -> Engine:
    """create_engine with what config.Settings says of engines (config.ENGINE_FIELDS; the daemon, `process`, `check`
    and farm workers build theirs alike); name and model override HEYGEM_ENGINE and HEYGEM_MODEL."""
    return create_engine(name or settings.engine, settings.model if model is None else model,
                         onnx_options=settings.onnx_options, speech_model=settings.speech_model,
                         speech_detector=settings.speech_detector)


def start_engine(settings, log, **fields) -> Engine:
    """engine_from_settings, then wait until its models are loaded and log engine_ready, or engine_unusable with the
    reason when one cannot be: the engine is returned either way (its tasks then fail naming the fix, and the
    operator sees why at start-up rather than at the first recording). fields: added to both log lines."""
    import time

    t0 = time.monotonic()
    engine = engine_from_settings(settings)
    try:
        engine.ready()
    except EngineError as exc:
        log.error("engine_unusable", **engine.describe(), error=str(exc), **fields)
    else:
        log.info("engine_ready", **engine.describe(), seconds=round(time.monotonic() - t0, 2), **fields)
    return engine
