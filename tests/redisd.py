"""A real redis-server (Debian's, installed by setup.sh) on a free loopback port, for the farm tests and bench.

Persistent like a production broker should be (append-only file, fsync on every write), so stop() + start() on
the same folder is a Redis restart that keeps its queues."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tls_certs(folder: Path) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 (openssl, Debian package openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = shutil.which("openssl")
    if exe is None:
        raise RuntimeError("openssl is not installed: run ./setup.sh as root (Debian package openssl)")
    files = {k: folder / n for k, n in (("ca", "ca.crt"), ("ca_key", "ca.key"), ("cert", "redis.crt"),
                                        ("key", "redis.key"), ("csr", "redis.csr"), ("ext", "ext.cnf"))}
    files["ext"].write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run = lambda *a: subprocess.run([exe, *map(str, a)], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", files["ca_key"], "-out", files["ca"],
        "-subj", "/CN=heygem-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", files["key"], "-out", files["csr"], "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca_key"], "-CAcreateserial",
        "-out", files["cert"], "-days", "2", "-extfile", files["ext"])
    return files


class RedisServer:
    def __init__(self, folder: Path, port: int | None = None, password: str = "farm-test-secret", tls: bool = False):
        self.folder, self.port, self.password = Path(folder), port or free_port(), password
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.certs = make_tls_certs(self.folder / "tls") if tls else None

    @property
    def url(self) -> str:
        if self.certs:  # TLS only (no plain port); the client checks the server against the test CA
            return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.certs['ca']}"
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _client_kw(self) -> dict:
        return {"ssl": True, "ssl_ca_certs": str(self.certs["ca"])} if self.certs else {}

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: run ./setup.sh as root (Debian package redis-server)")
        port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.certs["cert"]),
                "--tls-key-file", str(self.certs["key"]), "--tls-ca-cert-file", str(self.certs["ca"]),
                "--tls-auth-clients", "no"] if self.certs else ["--port", str(self.port)]
        self.proc = subprocess.Popen(
            [exe, *port, "--bind", "127.0.0.1", "--requirepass", self.password,
             "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no", "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.folder / 'redis.log').read_text()[-2000:]}")
            if self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer in time")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5,
                                    **self._client_kw()).ping())
        except redis.RedisError:
            return False

    def client(self):
        import redis

        return redis.Redis(port=self.port, password=self.password, **self._client_kw())

    def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits (a clean shutdown, as systemd does)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
