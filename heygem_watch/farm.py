"""The render farm's Celery side: the app (broker + result backend = Redis), the one task, the worker process.

    head (dispatch.CeleryDispatcher)  --render(spec)-->  Redis  -->  `heygem-watch worker` (this module)
    worker: lease -> delivery count -> pipeline.run_task (temp name, atomic rename) -> result {output, timings}

A spec is JSON: ledger task id, the recording's extracted audio folder and the template (both on the shared var/),
the output path, the encoder settings. Delivery guarantees (docs/farm.md): acks_late + reject_on_worker_lost, one
task at a time per worker (prefetch 1), a broker visibility timeout longer than the longest render; the render is
idempotent (an existing output means done) and leased (a second delivery never renders beside a live first one).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown
from redis.exceptions import RedisError

TASK_NAME = "heygem_watch.render"
QUEUE = "heygem"
MAX_DELIVERIES = 3  # a task started this many times without finishing (or failing each time) ends failed
LEASE_TTL_MAX_S = 15.0  # a delivery holds the task this long past its last refresh (a dead worker's lease lapses)
REPORT_EVERY_S = 1.0  # lease refresh + progress into the result backend
RETRY_DELAY_S = 2.0  # a failed delivery is tried again this much later (another worker may take it)
KEY_PREFIX = "heygem:"  # our own keys beside Celery's in the same Redis
KEY_TTL_S = 7 * 86400
RESULT_EXPIRES_S = 7 * 86400  # a head down this long still finds its tasks' results when it comes back
FARM_TMP = "farm"  # var/tmp/farm/<celery id>/ holds a delivery's partial output

app = Celery("heygem_watch", set_as_current=False)
app.conf.update(
    task_default_queue=QUEUE,
    task_serializer="json", result_serializer="json", accept_content=["json"],
    task_acks_late=True,  # the message stays in the broker until the render is filed
    task_reject_on_worker_lost=True,  # a killed pool process: the message goes back at once, not lost
    worker_prefetch_multiplier=1,  # one task per worker process; the next one waits in Redis, not in a worker
    worker_concurrency=1,  # one render per GPU: start one worker (service instance) per GPU
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,  # our JSON log lines go to stdout as they are (journald), not re-wrapped
    worker_send_task_events=False,  # heartbeats (worker-* events) are sent anyway; the head listens to those
    result_expires=RESULT_EXPIRES_S,
    result_extended=True,
    result_backend_always_retry=True,  # a result finished during a Redis outage is stored when it returns
    result_backend_max_retries=1_000_000,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,  # a worker outlives any Redis outage
    task_publish_retry=False,  # the head retries sending itself (dispatch.py) and never blocks on a dead broker
)


class RenderFailed(Exception):
    """The task is finished as failed; the message says why (shown in the ledger and manifest)."""


def configure(settings) -> Celery:
    """Point the app at the farm's Redis (HEYGEM_BROKER_URL) with the delivery settings of docs/farm.md."""
    url = settings.broker_url
    vt = float(settings.visibility_timeout)
    # kombu sweeps for messages past the visibility timeout every interval x throttle seconds: keep that
    # small against the timeout, so a dead worker's task comes back soon after it.
    sweep = max(1, min(10, int(vt // 10)))
    transport = {"visibility_timeout": vt, "unacked_restore_interval": sweep, "unacked_restore_throttle": 1,
                 "socket_connect_timeout": 5, "socket_timeout": 30, "socket_keepalive": True,
                 "health_check_interval": 10}
    app.conf.update(broker_url=url, result_backend=url, broker_transport_options=transport,
                    result_backend_transport_options={"visibility_timeout": vt},
                    redis_socket_connect_timeout=5, redis_socket_timeout=30, redis_retry_on_timeout=True,
                    redis_backend_health_check_interval=10)
    if url.startswith("rediss://"):
        # TLS: certificates are checked against the system store (or the ?ssl_ca_certs= the URL names)
        import ssl

        app.conf.update(broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED},
                        redis_backend_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED})
    return app


def lease_key(celery_id: str) -> str:
    return f"{KEY_PREFIX}lease:{celery_id}"


def deliveries_key(celery_id: str) -> str:
    """How many deliveries of the task a worker started rendering (render counts, the head reads)."""
    return f"{KEY_PREFIX}deliveries:{celery_id}"


def lease_ttl(visibility_timeout: float) -> float:
    """Lease length: well under the visibility timeout (a redelivery after a crash finds it lapsed), at least a
    few report periods (a busy but live worker keeps it)."""
    return min(LEASE_TTL_MAX_S, max(3 * REPORT_EVERY_S, visibility_timeout / 2))


def redis_client():
    """The result backend's Redis client (same server, same credentials/TLS): leases and delivery counts."""
    return app.backend.client


# -- worker process state -------------------------------------------------------------------------------------
_settings = None
_engine = None
_jobs: dict[str, object] = {}  # audio folder -> pipeline.RecordingJob (speech analysed once per recording)
_log = None


@worker_process_init.connect
def _load_engine(**_kw) -> None:
    """In the pool process, once: the model stays loaded between tasks."""
    global _engine, _log
    from heygem_watch import engines
    from heygem_watch.logs import configure as configure_logs, get_logger

    s = _settings
    if s is None:  # a pool started by something other than run_worker (e.g. the celery command)
        return
    configure_logs(s.log_format, s.log_level)
    _log = get_logger()
    # an unusable engine's tasks fail naming the fix (and are retried elsewhere or later)
    _engine = engines.start_engine(s, _log, pid=os.getpid())


@worker_process_shutdown.connect
def _close_engine(**_kw) -> None:
    if _engine is not None:
        _engine.close()


def _recording_job(audio_dir: str):
    from heygem_watch.audio import AudioTrack
    from heygem_watch.pipeline import RecordingJob

    job = _jobs.get(audio_dir)
    if job is None:
        track = AudioTrack.open(audio_dir)
        if track is None:
            raise RuntimeError(f"the recording's audio is not in {audio_dir}: is the head's var/ mounted at the "
                               f"same path on {socket.gethostname()}?")
        job = RecordingJob(Path(audio_dir), Path(audio_dir), track)
        if len(_jobs) >= 4:
            _jobs.pop(next(iter(_jobs)))
        _jobs[audio_dir] = job
    return job


class Lease:
    """Redis SET NX with a TTL, refreshed while rendering: at most one live delivery renders a task."""

    def __init__(self, client, celery_id: str, owner: str, ttl_s: float):
        self.client, self.key, self.owner = client, lease_key(celery_id), owner
        self.ttl_ms = int(ttl_s * 1000)

    def acquire(self) -> bool:
        return bool(self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms))

    def refresh(self) -> None:
        # taken again when a Redis restart let it lapse (the head would take this render for dead), unless another
        # delivery holds it by now
        if not self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms) and \
                (self.client.get(self.key) or b"").decode() == self.owner:
            self.client.pexpire(self.key, self.ttl_ms)

    def release(self) -> None:
        try:
            if (self.client.get(self.key) or b"").decode() == self.owner:
                self.client.delete(self.key)
        except Exception:  # broker gone: the lease lapses on its own
            pass


class Reporter(threading.Thread):
    """Keeps the lease alive and puts progress (frames, fps, ETA) into the result backend once a second, off the
    render thread: a slow or absent Redis never stalls the render."""

    def __init__(self, task, celery_id: str, lease: Lease, base: dict):
        super().__init__(name="farm-reporter", daemon=True)
        self.task, self.celery_id, self.lease, self.base = task, celery_id, lease, base
        self.latest = {"done": 0, "total": 0, "fps": 0.0, "eta_s": None}
        self.halt = threading.Event()
        self.errors = 0

    def progress(self, done: int, total: int, fps: float, eta: float) -> None:
        self.latest = {"done": int(done), "total": int(total), "fps": round(float(fps), 2), "eta_s": round(eta, 1)}

    def push(self) -> None:
        self.task.update_state(task_id=self.celery_id, state="PROGRESS", meta={**self.base, **self.latest})

    def run(self) -> None:
        while not self.halt.wait(REPORT_EVERY_S):
            try:
                self.lease.refresh()
                self.push()
            except Exception as exc:
                self.errors += 1
                if _log is not None and self.errors == 1:
                    _log.warning("farm_report_failed", error=str(exc), note="progress resumes when Redis is back")

    def stop(self) -> None:
        self.halt.set()
        self.join(5)


@app.task(bind=True, name=TASK_NAME, max_retries=None)
def render(self, spec: dict) -> dict:
    """Render one (recording x template) into spec['output']; see the module docstring for the guarantees."""
    from heygem_watch.logs import log_context

    cid, host = self.request.id, self.request.hostname or socket.gethostname()
    out = Path(spec["output"])
    if out.exists():  # finished by an earlier delivery: a second delivery does nothing
        return {"output": str(out), "already_done": True, "worker": host}
    client = redis_client()
    ttl = lease_ttl(_settings.visibility_timeout if _settings is not None else 7200)
    lease = Lease(client, cid, f"{host}:{os.getpid()}:{time.time()}", ttl)
    try:
        taken = lease.acquire()
    except RedisError:  # Redis went away just now: back into the queue, not a failure (no FAILURE state stored)
        raise Reject("Redis unavailable while starting the task", requeue=True) from None
    if not taken:  # a live delivery renders it now: look again once its lease would have lapsed
        raise self.retry(countdown=ttl / 2)
    tmp = Path(spec["tmp_dir"]) / FARM_TMP / cid
    try:
        if out.exists():
            return {"output": str(out), "already_done": True, "worker": host}
        key = deliveries_key(cid)
        try:
            delivery = int(client.incr(key))
            client.expire(key, KEY_TTL_S)
        except RedisError:
            raise Reject("Redis unavailable while starting the task", requeue=True) from None
        if delivery > MAX_DELIVERIES:
            raise RenderFailed(f"started {MAX_DELIVERIES} times without finishing (the worker rendering it died "
                               "each time)")
        shutil.rmtree(tmp, ignore_errors=True)  # what a dead delivery left half-written
        reporter = Reporter(self, cid, lease, {"worker": host, "delivery": delivery, "task": spec["task"]})
        try:
            reporter.push()
        except Exception:
            pass
        reporter.start()
        try:
            with log_context(task_id=spec["task"], celery_id=cid, template=Path(spec["template"]).name):
                res = _render(spec, tmp, reporter.progress)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}" if not str(exc) else str(exc)
            if _log is not None:
                _log.error("task_failed", celery_id=cid, delivery=delivery, error=reason)
            if delivery >= MAX_DELIVERIES:
                raise RenderFailed(f"failed on {delivery} deliveries: {reason}") from None
            raise self.retry(exc=RenderFailed(reason), countdown=RETRY_DELAY_S)
        finally:
            reporter.stop()
        return {**res, "worker": host, "delivery": delivery}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lease.release()


def _render(spec: dict, tmp: Path, progress) -> dict:
    from heygem_watch import pipeline
    from heygem_watch.config import EncoderSettings

    if _engine is None:
        raise RuntimeError("no engine in this worker process (start it with `heygem-watch worker`)")
    s = _settings
    job = _recording_job(spec["audio_dir"])
    enc = spec.get("encoder") or {}
    encoder = EncoderSettings(preset=enc.get("preset", s.encoder.preset), crf=int(enc.get("crf", s.encoder.crf)),
                              threads=s.encoder.threads, params=enc.get("params", s.encoder.params),
                              max_side=int(enc.get("max_side", s.encoder.max_side)))
    t0 = time.monotonic()
    res = pipeline.run_task(job, spec["template"], _engine, spec["output"], tmp, s.process_cache_dir,
                            progress=progress, encoder=encoder, log=_log)
    timings = res.as_dict()
    timings["worker_wall_s"] = round(time.monotonic() - t0, 3)
    if _log is not None:
        _log.info("task_done", output=spec["output"], frames=res.frames, seconds=round(res.wall_s, 2),
                  fps=round(res.fps, 1))
    timings["worker_finished_at"] = time.time()  # bench/farm.py: how long the head takes to file it
    return {"output": spec["output"], "timings": timings, "engine": _engine.describe(), "already_done": False}


def run_worker(settings, name: str | None = None, loglevel: str = "INFO") -> int:
    """`heygem-watch worker`: a Celery worker (prefork, one process) rendering from the farm's queue."""
    global _settings
    _settings = settings
    settings.process_cache_dir.mkdir(parents=True, exist_ok=True)  # HEYGEM_CACHE_DIR: local disk, GBs
    configure(settings)
    hostname = name if name and "@" in name else f"{name or 'heygem'}@{socket.gethostname()}"
    argv = ["--quiet", "worker", "--pool=prefork", "--concurrency=1", f"--hostname={hostname}",
            f"--loglevel={loglevel}", "--queues", QUEUE, "-O", "fair", "--without-mingle", "--without-gossip"]
    app.worker_main(argv=argv)
    return 0
