"""`heygem-watch` command line: run | process | status | retry | rerun | check | export-model | web | worker.

Thin on purpose: argument parsing here, work in the modules. Heavy imports (numpy, PyAV, MediaPipe,
ONNX Runtime) happen inside the commands, so `--help` and `status` start fast.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from heygem_watch import __version__

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="heygem-watch", description="Recordings dropped into a folder become one "
                                "lip-synced video per avatar template.")
    p.add_argument("--version", action="version", version=f"heygem-watch {__version__}")
    p.add_argument("--config", metavar="PATH", help="config.env to read (default: ./config.env if present)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sub.add_parser("run", help="the daemon, in the foreground (systemd runs this)")
    pr = sub.add_parser("process", help="render one recording once, no daemon, no ledger")
    pr.add_argument("recording", type=Path)
    pr.add_argument("--template", "-t", dest="templates", type=Path, action="append", required=True,
                    help="avatar video or image (repeat for several)")
    out = pr.add_mutually_exclusive_group(required=True)
    out.add_argument("--output", "-o", type=Path, help="output MP4 (exactly one --template)")
    out.add_argument("--out-dir", type=Path, help="writes DIR/<template-stem>.mp4 per template")
    pr.add_argument("--engine", choices=("auto", "builtin", "onnx"), default=None,
                    help="default: HEYGEM_ENGINE (auto = onnx when a model is set, else builtin)")
    pr.add_argument("--model", type=Path, default=None, help="ONNX model (default: HEYGEM_MODEL)")
    pr.add_argument("--no-cache", action="store_true",
                    help="analyse the templates in a temporary folder, deleted afterwards (default: keep the "
                         "analysis in HEYGEM_CACHE_DIR for the next run)")
    st = sub.add_parser("status", help="ledger summary: counts, running task, last recordings")
    st.add_argument("--limit", type=int, default=20)
    rt = sub.add_parser("retry", help="queue the failed tasks of a recording again (done ones are kept)")
    rt.add_argument("recording", help="its id (see `status`) or file name")
    rr = sub.add_parser("rerun", help="render a known recording with more templates (same dated folder)")
    rr.add_argument("recording", help="its id (see `status`) or file name")
    rr.add_argument("--template", "-t", dest="templates", action="append", required=True,
                    help="a template file, or a name in the template folder (repeat for several)")
    sub.add_parser("check", help="validate config, folders, disk, templates and model; print fixes")
    ex = sub.add_parser("export-model", help="convert a Wav2Lip checkpoint to ONNX (needs the 'export' extra)")
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("output", type=Path)
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--fp16", action="store_true")
    ex.add_argument("--int8", action="store_true")
    ts = sub.add_parser("train-speech", help="fit the built-in engine's speech model on talking-face videos "
                        "(see docs/speech.md)")
    ts.add_argument("--corpus", nargs="+", required=True, type=Path, metavar="DIR",
                    help="folders of videos of people talking with their own voice (searched recursively)")
    ts.add_argument("--out", required=True, type=Path, metavar="FILE", help="the model to write (.npz)")
    ts.add_argument("--cache", type=Path, default=None, metavar="DIR",
                    help="keep each clip's features and measured mouth here (re-runs skip them)")
    ts.add_argument("--eval", nargs="*", type=Path, default=[], metavar="DIR",
                    help="also report the fitted model's correlation on these folders (never trained on)")
    ts.add_argument("--from", dest="from_head", default=None, metavar="HEAD",
                    help="start from this model ('shipped' or a .npz from train-speech): keep its features and "
                         "shrink toward its weights; for a presenter's own footage (default: fit from scratch)")
    web = sub.add_parser("web", help="the web dashboard (its own process, same ledger and folders)")
    web.add_argument("--host", default=None)
    web.add_argument("--port", type=int, default=None)
    wk = sub.add_parser("worker", help="render farm worker: renders tasks a head sends through HEYGEM_BROKER_URL")
    wk.add_argument("--name", default=None, help="worker name (default heygem@HOST; one worker per GPU: gpu0, gpu1)")
    wk.add_argument("--loglevel", default="INFO", help="Celery's own log level (default INFO)")
    return p


SERVICES = ("run", "web")  # the commands systemd runs: their every line may have to be JSON


def _settings(args):
    from heygem_watch.config import ConfigError, load_settings

    try:
        return load_settings(args.config)
    except ConfigError as exc:
        fmt = os.environ.get("HEYGEM_LOG_FORMAT", "").strip().lower()
        if args.command in SERVICES and (fmt == "json" or (fmt != "console" and not sys.stdout.isatty())):
            # the log format may be the broken setting, but under systemd the journal is read with jq
            from heygem_watch.logs import configure, get_logger

            configure("json", "error", stream=sys.stderr)
            get_logger().error("config_invalid", error=str(exc), fix="fix the key named in config.env")
        else:
            print(f"heygem-watch: {exc}", file=sys.stderr)
        return None


def cmd_run(args, settings) -> int:
    from heygem_watch import logrelay
    from heygem_watch.daemon import Daemon
    from heygem_watch.housekeeping import VarLocked
    from heygem_watch.logs import configure, get_logger

    configure(settings.log_format, settings.log_level)
    logrelay.start(settings.log_format, settings.log_level)  # what native libraries write to stderr: logged too
    try:
        daemon = Daemon(settings, config_path=args.config)
    except OSError as exc:
        get_logger().error("folders_unusable", error=str(exc), fix="check HEYGEM_VAR_DIR and its permissions")
        logrelay.stop()
        return EXIT_FAIL
    try:
        rc = daemon.run()
    except VarLocked as exc:
        daemon.log.error("var_in_use", error=str(exc))
        rc = EXIT_FAIL
    except Exception as exc:
        daemon.log.exception("fatal", error=str(exc))
        rc = EXIT_FAIL
    # Everything is filed and the ledger closed; skip the interpreter's slow teardown of native libraries
    # (MediaPipe, ONNX Runtime) so SIGTERM -> exit stays well within systemd's and the 10 s.
    sys.stdout.flush()
    logrelay.stop()
    os._exit(rc)


def cmd_process(args, settings) -> int:
    templates: list[Path] = list({t.resolve(): t for t in args.templates}.values())  # the same file once
    if args.output is not None:
        if len(templates) != 1:
            print("heygem-watch process: --output takes exactly one --template; use --out-dir for several",
                  file=sys.stderr)
            return EXIT_CONFIG
        outputs = [args.output]
    else:
        outputs, used = [], set()
        for t in templates:  # DIR/<template-stem>.mp4; a second template with the same stem gets -2, -3...
            stem, n = t.stem, 1
            while stem in used:
                n += 1
                stem = f"{t.stem}-{n}"
            used.add(stem)
            outputs.append(args.out_dir / f"{stem}.mp4")
    if not args.recording.is_file():
        print(f"heygem-watch process: {args.recording}: recording not found", file=sys.stderr)
        return EXIT_FAIL
    from heygem_watch import engines, pipeline
    from heygem_watch.logs import configure, get_logger

    configure(settings.log_format if os.environ.get("HEYGEM_LOG_FORMAT") else "console", settings.log_level,
              stream=sys.stderr)  # stdout carries only the summary lines
    cache_dir = None if args.no_cache else settings.process_cache_dir
    prefetch = None
    if cache_dir is not None:  # what a `process` killed mid-analysis left there (a whole frame cache: GBs at 1080p)
        from heygem_watch.template_cache import remove_stale_work

        remove_stale_work(cache_dir)
        # The templates' analysis (the longest step of a first run) starts before the engine is built, which imports
        # OpenCV and the engine's modules and starts the Whisper load: the analysis no longer waits for those.
        prefetch = pipeline.Prefetch(args.recording, templates, Path(cache_dir), get_logger(),
                                     max_side=settings.encoder.max_side)
    model = args.model if args.model is not None else settings.model
    try:
        engine = engines.engine_from_settings(settings, args.engine, model)
    except Exception as exc:
        print(f"heygem-watch process: engine: {exc}", file=sys.stderr)
        if prefetch is not None:  # no new template; the one being analysed finishes (a cache entry is whole)
            prefetch.stop()
            prefetch.join()
        return EXIT_FAIL

    def report(tpl: str, res) -> None:
        if isinstance(res, BaseException):
            print(f"FAIL {Path(tpl).name}: {res}", flush=True)
        else:
            print(f"OK   {Path(tpl).name} -> {res.output}  {res.frames} frames, {res.duration_s:.2f} s, "
                  f"{res.wall_s:.1f} s wall ({res.fps:.1f} fps)" + (f"  [{'; '.join(res.notes)}]" if res.notes else ""),
                  flush=True)

    from heygem_watch.media import MediaError

    try:
        results = pipeline.process_files(args.recording, templates, outputs, engine, cache_dir=cache_dir,
                                         encoder=settings.encoder, log=get_logger(), on_result=report,
                                         prefetch=prefetch)
    except MediaError as exc:
        print(f"FAIL {args.recording.name}: recording unusable: {exc.reason}", flush=True)
        return EXIT_FAIL
    except OSError as exc:  # the work folder cannot be written (a full disk): the reason, not a traceback
        print(f"FAIL {args.recording.name}: {exc}", flush=True)
        return EXIT_FAIL
    finally:
        engine.close()
    return EXIT_OK if results and all(not isinstance(r, BaseException) for r in results) else EXIT_FAIL


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_status(args, settings) -> int:
    from heygem_watch.ledger import Ledger

    if not settings.ledger_path.exists():
        print(f"no ledger yet at {settings.ledger_path} (the daemon has not run here)")
        return EXIT_OK
    with Ledger(settings.ledger_path) as led:
        c = led.counts()
        print("tasks: " + "  ".join(f"{k} {v}" for k, v in c.items()))
        running = led.running_tasks()
        for t in running:
            rec = led.recording(t.recording_id)
            pct = 100.0 * t.progress_done / t.progress_total if t.progress_total else 0.0
            eta = f"{t.eta_s:.0f} s" if t.eta_s is not None else "-"
            where = f" on {t.worker}" if t.worker else ""
            print(f"running: task {t.id} {rec.name} x {t.template_name}{where}: {t.progress_done}/{t.progress_total} "
                  f"frames ({pct:.0f}%), {t.fps:.1f} fps, ETA {eta}")
        if not running:
            print("running: none")
        rs = led.renderer_status()
        if rs["running"]:
            print(rs["message"])
        else:
            print(rs["message"] + (f"; {c['queued']} queued tasks wait for it" if c["queued"] else ""))
        _print_workers(led)
        recs = led.recent_recordings(args.limit)
        print(f"last {len(recs)} recordings:")
        for r in recs:
            tasks = led.tasks_for(r.id)
            done = sum(t.state == "done" for t in tasks)
            err = f"  error: {r.error}" if r.error else ""
            print(f"  #{r.id:<5} {r.state:<8} {done}/{len(tasks)} done  {_fmt_time(r.created_at)}  {r.name}{err}")
        for c in sorted(led.template_checks().values(), key=lambda c: c["name"]):
            if not c["usable"] and Path(c["path"]).exists():
                print(f"template {c['name']}: unusable, skipped: {c['reason']}")
    return EXIT_OK


def _requeue(args, settings, what) -> int:
    from heygem_watch import requeue
    from heygem_watch.ledger import Ledger

    if not settings.ledger_path.exists():
        print(f"heygem-watch {args.command}: no ledger at {settings.ledger_path}", file=sys.stderr)
        return EXIT_FAIL
    with Ledger(settings.ledger_path) as led:
        try:
            res = what(led)
        except requeue.RequeueError as exc:
            print(f"heygem-watch {args.command}: {exc}", file=sys.stderr)
            return EXIT_FAIL
    print(requeue.describe(res))
    return EXIT_OK


def cmd_retry(args, settings) -> int:
    from heygem_watch import requeue

    return _requeue(args, settings, lambda led: requeue.retry(led, args.recording))


def cmd_rerun(args, settings) -> int:
    from heygem_watch import requeue

    return _requeue(args, settings, lambda led: requeue.rerun(led, args.recording, args.templates,
                                                               settings.template_dir))


def _print_workers(led) -> None:
    """Farm workers seen by the head: host, state, last heartbeat, current task."""
    workers = led.workers_status()
    if not workers:
        return
    print(f"workers: {len(workers)}")
    for w in workers:
        t = w["task"]
        doing = f"task {t['id']} {t['template']} {t['done']}/{t['total']}" if t else "idle"
        print(f"  {w['hostname']:<30} {w['state']:<7} last heartbeat {_fmt_time(w['last_heartbeat'])} "
              f"({w['ago_s']:.0f} s ago)  {doing}  processed {w['processed']}")


def cmd_worker(args, settings) -> int:
    if not settings.broker_url:
        print("heygem-watch worker: set HEYGEM_BROKER_URL (the head's Redis, redis://:PASSWORD@HOST:6379/0)",
              file=sys.stderr)
        return EXIT_CONFIG
    from heygem_watch import logrelay
    from heygem_watch.farm import run_worker
    from heygem_watch.logs import configure

    configure(settings.log_format, settings.log_level)
    logrelay.start(settings.log_format, settings.log_level)  # MediaPipe's native chatter: JSON lines too
    try:
        return run_worker(settings, args.name, args.loglevel)
    finally:
        sys.stdout.flush()
        logrelay.stop()


def cmd_check(args, settings) -> int:
    from heygem_watch.check import run_checks

    return run_checks(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # a process of its own, numpy and cv2 not loaded yet (tests call main(argv) in theirs)
        _quiet_thread_pools(blas_one_thread=args.command != "train-speech")
    if args.command == "export-model":
        from heygem_watch.engines.onnx.export import cli_export

        return cli_export(args)
    if args.command == "train-speech":
        from heygem_watch.engines.builtin.speech_train import cli_train_speech

        return cli_train_speech(args)
    settings = _settings(args)
    if settings is None:
        return EXIT_CONFIG
    if args.command == "web":
        from heygem_watch.web.server import cli_web

        return cli_web(args, settings)
    command = {"run": cmd_run, "process": cmd_process, "status": cmd_status, "check": cmd_check,
               "retry": cmd_retry, "rerun": cmd_rerun, "worker": cmd_worker}[args.command]
    try:
        rc = command(args, settings)
    except BrokenPipeError:  # `heygem-watch status | head`: the reader left; not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        rc = 0
    if argv is None and args.command == "process":
        _exit_now(rc)
    return rc


def _quiet_thread_pools(blas_one_thread: bool) -> None:
    """Stop idle native thread pools from spinning. Must run before numpy and cv2 load (they read these at load);
    an operator's own values in the environment win.

    Between jobs, OpenBLAS's and OpenCV's workers wait in sched_yield loops; in a render, work reaches them every
    few milliseconds from several of our own busy threads, so on 2 cores they spun away ~10 % of a 1080p first
    run's CPU (perf: 3407 -> 3038 samples, every sched_yield gone). Rendering is already parallel across our
    threads and its matrices are small, so BLAS gets one thread; OpenCV keeps its pool (big frames on a big
    server) but its workers sleep when idle. train-speech keeps threaded BLAS: its regressions are large (427
    clips fitted in 9.9 s with 2 threads, 12.8 s with one)."""
    if blas_one_thread:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for name in ("OPENCV_THREAD_POOL_ACTIVE_WAIT_WORKER", "OPENCV_THREAD_POOL_ACTIVE_WAIT_MAIN"):
        os.environ.setdefault(name, "0")


def _exit_now(rc: int) -> None:
    """End a `process` run without the interpreter's teardown of MediaPipe, CTranslate2, OpenCV and PyAV (~0.07 CPU-s
    measured, on every one-shot run): by now the outputs are renamed into place, the work folder removed and the
    template cache entries installed (an entry is only ever whole). Only from the command line (argv None): tests
    and other callers of main() keep their interpreter."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can reach the reader anyway
            pass
    os._exit(rc)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
