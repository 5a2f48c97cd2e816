"""A private `redis-server` the fault tests and `cascade bench chaos` can kill, freeze and restart.

The faults worth testing are process faults: SIGKILL (Redis gone, then back empty or from its
append-only file), SIGSTOP (Redis frozen: connections open, no replies), SIGCONT. A mock cannot
show what a client library does when the socket stops answering, so this starts the real server
on a free loopback port (never 6379) in its own directory, with or without persistence.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from services.stack.launcher import free_port, redis_ping


class RedisProcess:
    """One redis-server: `start()`, `kill()`, `freeze()`, `thaw()`, `restart()`, `stop()`.

    `appendonly=True` writes every write to an AOF (fsync every second), so a restart after
    SIGKILL comes back with what was written up to a second before; `appendonly=False` comes
    back empty, like the old compose file's `--save "" --appendonly no`.
    """

    def __init__(self, *, appendonly: bool = False, password: str | None = None,
                 port: int | None = None, workdir: str | Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.binary = binary
        self.appendonly = appendonly
        self.password = password
        self.port = port or free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="cascade-redis-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        out = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
               str(self.workdir), "--save", "", "--appendonly",
               "yes" if self.appendonly else "no", "--appendfsync", "everysec"]
        if self.password:
            out += ["--requirepass", self.password]
        return out

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def _answers(self) -> bool:
        if not self.password:
            return redis_ping(f"redis://127.0.0.1:{self.port}", timeout=0.2)
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                time.sleep(0.01)
                return b"+PONG" in sock.recv(64)
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def restart(self, *, empty: bool = False) -> None:
        """Kill and start again on the same port; `empty` also deletes the AOF first."""
        self.kill()
        if empty:
            for name in ("appendonlydir", "appendonly.aof", "dump.rdb"):
                path = self.workdir / name
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)
