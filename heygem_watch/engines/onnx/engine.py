"""The ONNX engine: a user's Wav2Lip-format model (exported by `heygem-watch export-model`) on onnxruntime.

    analyse_speech(track)      -> mel.MelSource: the Wav2Lip mel, computed lazily in chunks (engines/onnx/mel.py),
                                  silent where the speech detector hears no voice (HEYGEM_SPEECH_DETECTOR)
    prepare_template(template) -> OnnxState: per template frame a face box from the face tracker, padded
                                  (0, 10, 0, 0) and smoothed over 5 frames (the conventions of the weights).
                                  Tracker: MediaPipe (the template's landmark track) by default; SCRFD
                                  (engines/onnx/scrfd.py) when an scrfd*.onnx / det_*.onnx lies beside the model
                                  or detector=PATH is given, its boxes cached per template and detector file.
                                  The boxes, crops and paste live in engines/onnx/crop.py
    render(...)                -> three stages overlap: [prep thread] frames + BGR 96x96 crops (lower half masked,
                                  reference) + 16-column mel windows, batched -> [infer thread] session.run ->
                                  [caller] feathered, colour-matched paste of mouth and chin, then the pipeline
                                  encodes. Bounded queues keep memory flat however long the recording.
Model inputs: audio (B, 1, 80, 16) mel window, face (B, 6, 96, 96) BGR/255; output (B, 3, 96, 96) BGR in [0, 1].
The session is created once per engine (the daemon keeps it for its lifetime). Providers: TensorRT when present,
CUDA when onnxruntime-gpu is installed and its libraries load, else CPU; which one runs and why is logged.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from heygem_watch.engines.base import Engine, EngineError, FrameJob
from heygem_watch.engines.onnx import crop, mel
from heygem_watch.engines.onnx.wav2lip import BOX_PADS, BOX_SMOOTH, FACE_SIZE

MEDIAPIPE_WORDS = ("mediapipe", "none", "off")  # detector=... values that force the landmark boxes
DEFAULT_BATCH = {"cpu": 4, "gpu": 64}  # CPU gains nothing from larger batches (measured); GPU wants them
MAX_BATCH = 256
TRT_MAX_BATCH = 128  # TensorRT builds its engine for batches 1..this (optimised for the GPU default)
SAMPLE_BYTES = {"cpu": 48 << 20, "gpu": 40 << 20}  # generous activation memory per sample (fp32 workspace)
MEMORY_SHARE = 0.4  # of free RAM / VRAM the batch may take
FRAME_BUDGET = 1536 << 20  # bytes of full-size frames in flight across the stages
CPU_WORKERS_MAX = 4  # concurrent inference runs on CPU (one per core, up to this many)
GPU_WORKERS = 2  # two runs in flight: one copies inputs/outputs while the other computes
OOM_MARKERS = ("out of memory", "failed to allocate", "alloc_failed", "bad_alloc", "cudaerrormemoryallocation",
               "cudnn_status_alloc_failed", "cublas_status_alloc_failed")


@dataclass
class OnnxState:
    boxes: np.ndarray  # (n_frames, 4) int32 x1, y1, x2, y2 (padded, smoothed, clipped)
    valid: np.ndarray  # (n_frames,) bool: a usable face box


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower().replace(" ", "")
    return any(k.replace(" ", "") in text for k in OOM_MARKERS)


def _free_gpu_bytes() -> int | None:
    """Free memory of GPU 0 from nvidia-smi, or None."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip().splitlines()[0]) << 20
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


class OnnxEngine(Engine):
    name = "onnx"

    def __init__(self, model_path: Path, **options):
        import onnxruntime as ort

        from heygem_watch.logs import get_logger

        self.log = options.pop("log", None) or get_logger(engine="onnx")
        self.speech_detector = bool(options.pop("speech_detector", True))
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise EngineError(f"{self.model_path}: model file not found")
        self.meta = self._read_sidecar()
        pads = self.meta.get("box_pads") or {}
        self.pads = tuple(int(pads.get(k, d)) for k, d in zip(("top", "bottom", "left", "right"), BOX_PADS))
        self.smooth = int(self.meta.get("box_smooth_frames", BOX_SMOOTH))
        threads = int(options.pop("threads", 0) or os.environ.get("HEYGEM_ONNX_THREADS", 0) or 0)
        want = str(options.pop("provider", None) or os.environ.get("HEYGEM_ONNX_PROVIDER", "auto")).lower()
        batch = options.pop("batch_size", None) or os.environ.get("HEYGEM_ONNX_BATCH")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        cores = os.cpu_count() or 1
        self.cpu_workers = max(1, min(cores, CPU_WORKERS_MAX))
        # CPU: several single-threaded runs side by side (one per core) scale better than one run split across
        # cores, which waits on its slowest thread whenever x264 or decoding takes a core away
        so.intra_op_num_threads = threads or max(1, cores // self.cpu_workers)
        # no busy-waiting between runs: on a small CPU the spinning pool would steal the cores x264 and the frame
        # preparation need (the GPU path is unaffected: its CPU pool is idle anyway)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session, self.provider, self.provider_reason = self._create_session(ort, so, want)
        self._check_io()
        self.device = "cpu" if self.provider == "CPUExecutionProvider" else "gpu"
        self.workers = self.cpu_workers if self.device == "cpu" else GPU_WORKERS
        self.batch_size = self._auto_batch(int(batch) if batch else None)
        self.oom_halvings = 0
        self._pick_face_tracker(ort, options.pop("detector", None))
        self.log.info("onnx_engine_ready", model=str(self.model_path), precision=self.meta.get("precision", "?"),
                      provider=self.provider, reason=self.provider_reason, batch=self.batch_size,
                      face_tracker=self.face_tracker)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _read_sidecar(self) -> dict:
        side = self.model_path.with_suffix(".json")
        if not side.is_file():
            return {}
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError) as exc:
            raise EngineError(f"{side}: unreadable model sidecar ({exc})") from None
        if meta.get("format", "wav2lip") != "wav2lip" or int(meta.get("face_size", FACE_SIZE)) != FACE_SIZE:
            raise EngineError(f"{side}: not a 96x96 Wav2Lip model (format {meta.get('format')!r}, "
                              f"face_size {meta.get('face_size')}); only Wav2Lip-format models are supported")
        return meta

    def _pick_face_tracker(self, ort, detector) -> None:
        """SCRFD when detector=PATH is given or an scrfd*.onnx / det_*.onnx lies beside the model, else MediaPipe
        (also when detector is 'mediapipe'); the choice and the reason are logged. A detector file that does not
        fit the SCRFD layout stops the engine with an error naming it."""
        from heygem_watch.engines.onnx import scrfd
        from heygem_watch.ledger import fingerprint_file

        self.detector, self.detector_fp, path = None, "", None
        if str(detector or "").lower() in MEDIAPIPE_WORDS:
            reason = "MediaPipe requested (detector option)"
        elif detector not in (None, "", "auto"):
            path, reason = Path(detector), "detector option"
        else:
            found = scrfd.find_detectors(self.model_path.parent, exclude=self.model_path)
            if found:
                path = found[0]
                reason = f"{path.name} found beside the model" + (
                    f" (first of {', '.join(p.name for p in found)})" if len(found) > 1 else "")
            else:
                reason = f"no {' or '.join(scrfd.DETECTOR_PATTERNS)} in {self.model_path.parent}"
        if path is not None:
            gpu = self.device == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers()
            try:
                self.detector = scrfd.Scrfd(path, (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"])
                self.detector_fp = fingerprint_file(path)[:16]
            except (scrfd.ScrfdError, OSError) as exc:
                raise EngineError(str(exc)) from None
        self.face_tracker = "scrfd" if self.detector else "mediapipe"
        self.log.info("face_tracker", face_tracker=self.face_tracker, reason=reason,
                      detector=str(path) if path else None)

    def _create_session(self, ort, so, want: str):
        avail = ort.get_available_providers()
        plan: list = []
        reason = ""
        if want in ("auto", "tensorrt") and "TensorrtExecutionProvider" in avail:
            cache = self.model_path.parent / ".trt-cache"
            big = TRT_MAX_BATCH
            shape = lambda b: f"audio:{b}x1x80x16,face:{b}x6x96x96"  # noqa: E731
            plan.append(("TensorrtExecutionProvider", {
                "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                "trt_fp16_enable": self.meta.get("precision") == "fp16",
                "trt_profile_min_shapes": shape(1), "trt_profile_opt_shapes": shape(DEFAULT_BATCH["gpu"]),
                "trt_profile_max_shapes": shape(big)}))
        if want in ("auto", "cuda", "tensorrt"):
            if "CUDAExecutionProvider" in avail:
                plan.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}))
            else:
                reason = ("CUDA provider not available (install onnxruntime-gpu instead of onnxruntime for GPUs); "
                          f"providers: {', '.join(avail)}")
        elif want != "cpu":
            raise EngineError(f"unknown onnx provider {want!r}: use auto, cpu, cuda or tensorrt")
        else:
            reason = "CPU requested"
        tries = [plan, plan[1:] if len(plan) > 1 else None, []]  # with TensorRT, then without it, then CPU only
        last_exc = None
        for p in tries:
            if p is None:
                continue
            try:
                sess = ort.InferenceSession(str(self.model_path), so, providers=p + ["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own pybind types
                last_exc = exc
                if not p:
                    raise EngineError(f"{self.model_path}: onnxruntime cannot load the model "
                                      f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc})") from None
                reason = f"{p[0][0]} failed to start ({str(exc).splitlines()[0][:200]})"
                continue
            active = sess.get_providers()[0]
            if plan and active == "CPUExecutionProvider" and not reason:
                reason = (f"{plan[-1][0]} is installed but did not load (CUDA/cuDNN libraries missing or no GPU); "
                          "running on CPU")
            elif active != "CPUExecutionProvider":
                reason = reason or f"{active} available"
            if active == "CPUExecutionProvider" and want in ("cuda", "tensorrt"):
                self.log.warning("onnx_gpu_unavailable", requested=want, reason=reason)
            return sess, active, reason or "no GPU provider"
        raise EngineError(f"{self.model_path}: cannot create a session ({last_exc})")

    def _check_io(self) -> None:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = self.session.get_outputs()
        shapes = {n: list(i.shape) for n, i in ins.items()}
        if set(ins) != {"audio", "face"} or len(outs) != 1:
            raise EngineError(f"{self.model_path}: not a model from `heygem-watch export-model` (inputs "
                              f"{shapes}, want audio (B,1,80,16) and face (B,6,96,96)); export it with that command")
        if shapes["audio"][1:] != [1, mel.N_MELS, mel.WINDOW] or shapes["face"][1:] != [6, FACE_SIZE, FACE_SIZE]:
            raise EngineError(f"{self.model_path}: unexpected input shapes {shapes}")
        self.in_types = {n: np.float16 if "float16" in i.type else np.float32 for n, i in ins.items()}
        self.out_name = outs[0].name

    def _auto_batch(self, requested: int | None) -> int:
        """Batch size: requested, else the device default, capped by free memory and by the frames in flight."""
        import psutil

        dev = self.device
        b = requested or DEFAULT_BATCH[dev]
        free = psutil.virtual_memory().available if dev == "cpu" else _free_gpu_bytes()
        if free:
            b = min(b, max(1, int(free * MEMORY_SHARE / SAMPLE_BYTES[dev])))
        b = min(b, MAX_BATCH, TRT_MAX_BATCH if self.provider == "TensorrtExecutionProvider" else MAX_BATCH)
        return max(1, int(b))

    # ---- Engine interface ---------------------------------------------------------------------------------
    def describe(self) -> dict:
        return {"engine": self.name, "model": self.model_path.name, "precision": self.meta.get("precision", "?"),
                "provider": self.provider, "provider_reason": self.provider_reason, "batch_size": self.batch_size,
                "workers": self.workers, "oom_halvings": self.oom_halvings, "face_tracker": self.face_tracker,
                "detector": self.detector.path.name if self.detector else None,
                "speech_detector": self.speech_detector}

    def ready(self) -> None:
        """The speech detector's model, when it is on (the ONNX model itself loaded in __init__)."""
        if self.speech_detector:
            self._detector()

    def _detector(self):
        from heygem_watch import vad

        try:
            return vad.load_detector()
        except vad.VadModelError as exc:
            raise EngineError(str(exc)) from None

    def analyse_speech(self, audio) -> mel.MelSource:
        if getattr(audio, "sample_rate", mel.SAMPLE_RATE) != mel.SAMPLE_RATE:
            raise EngineError(f"the onnx engine needs {mel.SAMPLE_RATE} Hz audio, got {audio.sample_rate}")
        if not self.speech_detector:
            return mel.MelSource(audio)
        return mel.MelSource(audio, mel.speech_columns(audio, self._detector()))

    def prepare_template(self, template) -> OnnxState:
        return OnnxState(*crop.template_boxes(template, self.pads, self.smooth, self.detector, self.detector_fp,
                                              self.log))

    def infer(self, audio: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """(n, 1, 80, 16), (n, 6, 96, 96) float32 -> (n, 96, 96, 3) float32 BGR [0, 1]; halves the batch on OOM."""
        outs, i = [], 0
        n = len(audio)
        while i < n:
            b = min(self.batch_size, n - i)
            a_in, f_in = audio[i:i + b], faces[i:i + b]
            if self.device == "gpu" and b < self.batch_size:
                # one input shape on the GPU: cuDNN/TensorRT tune per shape, a new size would stall to re-tune
                pad = ((0, self.batch_size - b),) + ((0, 0),) * 3
                a_in, f_in = np.pad(a_in, pad), np.pad(f_in, pad)
            feeds = {"audio": a_in.astype(self.in_types["audio"], copy=False),
                     "face": f_in.astype(self.in_types["face"], copy=False)}
            try:
                out = self.session.run([self.out_name], feeds)[0][:b]
            except Exception as exc:  # noqa: BLE001
                if not _is_oom(exc):
                    raise EngineError(f"{self.model_path.name}: inference failed ({str(exc)[:300]})") from exc
                if b <= 1:
                    raise EngineError(f"{self.model_path.name}: out of memory even at batch size 1 on "
                                      f"{self.provider}") from exc
                self.batch_size = max(1, b // 2)
                self.oom_halvings += 1
                self.log.warning("onnx_oom_batch_halved", provider=self.provider, batch=self.batch_size,
                                 error=str(exc)[:200])
                continue
            outs.append(np.asarray(out, np.float32).transpose(0, 2, 3, 1))
            i += b
        return np.concatenate(outs) if outs else np.zeros((0, FACE_SIZE, FACE_SIZE, 3), np.float32)

    def render(self, template, state: OnnxState, speech: Any, jobs: Iterable[FrameJob]) -> Iterator[np.ndarray]:
        if not isinstance(speech, mel.MelSource):
            speech = self.analyse_speech(speech)
        mels = speech.cursor()
        fps = template.fps
        workers = self.workers
        # full-size frames in flight stay under FRAME_BUDGET whatever the batch size (4K templates on a GPU)
        in_flight = 2 * workers + 3  # preparing, queued, in inference (one per worker), queued, being pasted
        batch = max(1, min(self.batch_size, FRAME_BUDGET // (in_flight * template.width * template.height * 3)))
        stop = threading.Event()
        # batches handed on and not yet yielded: the bound holds however the workers' finishing order scatters them
        # (one stalled worker used to let the others' later batches pile up in `pending`)
        slots = threading.Semaphore(in_flight - 1)  # the one more: the batch prep is filling
        prepped: queue.Queue = queue.Queue(maxsize=workers)
        done: queue.Queue = queue.Queue(maxsize=workers)
        end = object()

        def put(q: queue.Queue, item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def take_slot() -> bool:
            while not stop.is_set():
                if slots.acquire(timeout=0.1):
                    return True
            return False

        def get(q: queue.Queue):
            while not stop.is_set():
                try:
                    return q.get(timeout=0.1)
                except queue.Empty:
                    continue
            return end

        def prep():  # decode (the jobs iterator reads template frames) + crops + mel windows, numbered batches
            seq = 0
            try:
                group: list = []
                for job in jobs:
                    k = job.template_index
                    if state.valid[k]:
                        # only the face box is converted when the job is yuv420p (FrameJob.region)
                        x1, y1, x2, y2 = (int(v) for v in state.boxes[k])
                        r = job.region((x1, y1, x2 - x1, y2 - y1))
                        ox, oy = r.origin
                        box = (x1 - ox, y1 - oy, x2 - ox, y2 - oy)
                        group.append((job, crop.crop_input(r.image, box), mels.window(job.index, fps), (r, box)))
                    else:
                        group.append((job, None, None, None))
                    if len(group) >= batch:
                        if not (take_slot() and put(prepped, (seq, group))):
                            return
                        seq, group = seq + 1, []
                if group and not (take_slot() and put(prepped, (seq, group))):
                    return
                for _ in range(workers):
                    put(prepped, end)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread (Cancelled included)
                put(done, exc)

        def infer():  # one per worker: on CPU each runs single-threaded inference on its own core
            try:
                while True:
                    item = get(prepped)
                    if item is end:
                        put(done, end)
                        return
                    seq, group = item
                    idx = [j for j, g in enumerate(group) if g[1] is not None]
                    preds = None
                    if idx:
                        faces = np.stack([group[j][1] for j in idx])
                        audio = np.stack([group[j][2] for j in idx])[:, None]
                        preds = self.infer(audio, faces)
                    if not put(done, (seq, group, idx, preds)):
                        return
            except BaseException as exc:  # noqa: BLE001
                put(done, exc)

        threads = [threading.Thread(target=prep, daemon=True, name="onnx-prep")]
        threads += [threading.Thread(target=infer, daemon=True, name=f"onnx-infer{i}") for i in range(workers)]
        for t in threads:
            t.start()
        pending: dict[int, tuple] = {}
        next_seq, ended = 0, 0
        try:
            while True:
                while next_seq in pending:  # batches finish out of order across workers; frames go out in order
                    group, idx, preds = pending.pop(next_seq)
                    next_seq += 1
                    for p, j in enumerate(idx):
                        job, (r, box) = group[j][0], group[j][3]
                        crop.paste(r.image, box, preds[p], template.landmarks[job.template_index] - r.origin)
                    for job, _, _, drawn in group:
                        yield job.put_back(drawn[0]) if drawn is not None else job.as_given
                    slots.release()
                if ended == workers:
                    break
                item = done.get()
                if item is end:
                    ended += 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    pending[item[0]] = item[1:]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=5)

    def close(self) -> None:
        self.session = None
