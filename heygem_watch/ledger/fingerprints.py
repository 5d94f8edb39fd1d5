"""Content fingerprints: the hash itself, and the ledger's memo of them (a file's fingerprint while its size,
mtime and inode are unchanged, so a restart does not hash every queued file again) and of each template's check."""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

FINGERPRINT_CHUNK = 1 << 20  # bytes read at a time while hashing


def fingerprint_file(path: os.PathLike | str) -> str:
    """blake2b (160 bit) of the whole content, hex; streamed, so a 2-hour recording costs no memory."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while True:
            b = f.read(FINGERPRINT_CHUNK)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class FingerprintMemo:
    """Ledger methods on the file_fingerprints and template_checks tables (needs Store's _query/_write)."""

    def known_fingerprint(self, path: os.PathLike | str, st: os.stat_result) -> str | None:
        """The fingerprint remembered for this path while its size, mtime and inode are unchanged."""
        rows = self._query("SELECT fingerprint FROM file_fingerprints WHERE path=? AND size=? AND mtime_ns=? AND"
                           " inode=?", (str(path), st.st_size, st.st_mtime_ns, st.st_ino))
        return rows[0][0] if rows else None

    def remember_fingerprint(self, path: os.PathLike | str, st: os.stat_result, fingerprint: str) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO file_fingerprints(path, size, mtime_ns, inode, fingerprint)"
                       " VALUES (?,?,?,?,?)", (str(path), st.st_size, st.st_mtime_ns, st.st_ino, fingerprint))

    def forget_fingerprints(self, keep) -> None:
        """Drop remembered fingerprints of paths for which keep(path) is False (files gone)."""
        gone = [r[0] for r in self._query("SELECT path FROM file_fingerprints") if not keep(r[0])]
        if gone:
            with self._write() as db:
                db.executemany("DELETE FROM file_fingerprints WHERE path=?", [(p,) for p in gone])

    def set_template_check(self, fingerprint: str, path: os.PathLike | str, usable: bool,
                           reason: str | None = None) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO template_checks(fingerprint, name, path, usable, reason, checked_at)"
                       " VALUES (?,?,?,?,?,?)", (fingerprint, Path(path).name, str(path), int(bool(usable)), reason,
                                                 time.time()))

    def template_checks(self) -> dict[str, dict]:
        """fingerprint -> {name, path, usable, reason, checked_at} of every template checked so far."""
        return {r["fingerprint"]: {k: r[k] for k in r.keys()} | {"usable": bool(r["usable"])}
                for r in self._query("SELECT * FROM template_checks")}
