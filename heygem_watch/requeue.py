"""Render a known recording again: `retry` (its failed tasks) and `rerun` (templates it never had).

Used by the CLI (`heygem-watch retry|rerun`) and the dashboard (POST /api/recordings/{id}/retry|rerun). Both only
write the ledger; the daemon's worker picks the tasks up. A finished recording renders from where its source was
filed (archive/ or failed/) and its outputs join the same dated folder and manifest; done tasks are never redone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from heygem_watch.ledger import Ledger, Recording, fingerprint_file


class RequeueError(ValueError):
    """Nothing can be queued; the message says why and what to do."""


@dataclass
class Requeued:
    recording_id: int
    name: str
    queued: list[str] = field(default_factory=list)  # template names queued now
    existing: list[str] = field(default_factory=list)  # template names the recording already had (any state)
    source: str = ""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def find(ledger: Ledger, ref: str | int) -> Recording:
    rec = ledger.find_recording(str(ref))
    if rec is None:
        raise RequeueError(f"no recording {ref!r} (give its id or file name; `heygem-watch status` lists them)")
    return rec


def source_file(rec: Recording) -> Path:
    """The file to render from: the source while it waits, else where it was filed."""
    for cand in (rec.source_path, rec.final_path):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise RequeueError(f"the source of recording {rec.id} ({rec.name}) is no longer kept (HEYGEM_ON_DONE=delete, "
                       "or retention removed it): drop the file into the incoming folder again")


def _source_arg(rec: Recording) -> str | None:
    """A source to switch to, or None to keep the one a still-pending recording has."""
    if rec.state in ("queued", "running"):
        return None
    return str(source_file(rec))


def retry(ledger: Ledger, ref: str | int) -> Requeued:
    """Re-queue exactly the failed tasks of a recording."""
    rec = find(ledger, ref)
    failed = [t.template_name for t in ledger.tasks_for(rec.id) if t.state == "failed"]
    if not failed:
        raise RequeueError(f"recording {rec.id} ({rec.name}) has no failed tasks")
    src = _source_arg(rec)
    ledger.retry_failed(rec.id, source_path=src)
    done = [t.template_name for t in ledger.tasks_for(rec.id) if t.template_name not in failed]
    return Requeued(rec.id, rec.name, failed, done, src or rec.source_path)


def template_pairs(templates, template_dir: Path) -> list[tuple[str, str]]:
    """(path, fingerprint) for each template given as a path or as a name in the template folder."""
    pairs = []
    for t in templates:
        p = Path(t)
        if not p.is_file() and (template_dir / str(t)).is_file():
            p = template_dir / str(t)
        if not p.is_file():
            raise RequeueError(f"template {t}: not found (a path, or a file name in {template_dir})")
        pairs.append((str(p.resolve()), fingerprint_file(p)))
    return pairs


def rerun(ledger: Ledger, ref: str | int, templates, template_dir: Path) -> Requeued:
    """Queue the (recording x template) tasks that do not exist yet; says which already existed."""
    rec = find(ledger, ref)
    pairs = template_pairs(templates, Path(template_dir))
    if not pairs:
        raise RequeueError("name at least one template (--template)")
    checks = ledger.template_checks()
    for path, fp in pairs:
        if fp in checks and not checks[fp]["usable"]:
            raise RequeueError(f"template {Path(path).name} is unusable: {checks[fp]['reason']}")
    have = {t.template_fingerprint for t in ledger.tasks_for(rec.id)}
    src = _source_arg(rec) if any(fp not in have for _, fp in pairs) else None
    ids, existing = ledger.extend_recording(rec.id, pairs, source_path=src)
    by_id = {t.id: t.template_name for t in ledger.tasks_for(rec.id)}
    return Requeued(rec.id, rec.name, [by_id[i] for i in ids], existing, src or rec.source_path)


def describe(res: Requeued) -> str:
    """One line for people: what was queued and what the recording already had."""
    parts = [f"recording {res.recording_id} ({res.name}):"]
    parts.append(f"queued {', '.join(res.queued)}" if res.queued else "nothing new to queue")
    if res.existing:
        parts.append(f"; already had {', '.join(res.existing)}")
    if res.queued:
        parts.append(f"; renders from {os.path.basename(res.source) or res.source} once the daemon runs")
    return " ".join(parts)
