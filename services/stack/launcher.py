"""`cascade stack up|down|status`: the compose stack as local processes, for dev boxes and CI.

`up` records every process it starts (pid, the kernel's start time, argv) in a state file, so
`down` stops exactly those and never a process that merely reuses a recorded pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from services.common.config import redact_url
from services.stack.plan import ProcessSpec, StackPlan, plan_stack, process_environment

STATE_FILE = "state.json"
REDIS_DEFAULT_PORT = 6379  # never taken by our own redis-server: it may be someone else's


class StackError(ValueError):
    """A one-line, user-facing launcher failure (names the service and its log)."""


@dataclass
class Started:
    """A process `up` started, as recorded in the state file."""

    name: str
    pid: int
    start_ticks: int
    argv: list[str]
    port: int | None
    log: str
    ready_path: str | None = "/readyz"


def proc_start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime


def is_ours(proc: Started) -> bool:
    """True while `proc.pid` is still the very process `up` started.

    pid + kernel start time identify a process; the program name guards against a stale state
    file from before a reboot. (redis-server rewrites its title, so argv is compared by name.)
    """
    if proc_start_ticks(proc.pid) != proc.start_ticks:
        return False
    try:
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    program = Path(argv[0].decode(errors="replace").split(" ")[0]).name
    return bool(proc.argv) and program == Path(proc.argv[0]).name


def free_port(avoid: tuple[int, ...] = (REDIS_DEFAULT_PORT,)) -> int:
    """A currently free loopback port, never one of `avoid`."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in avoid:
            return port


def probe(url: str, timeout: float = 1.0) -> bool:
    """GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """A raw PING, so readiness of our redis-server needs no client library."""
    hostport = url.split("://", 1)[1].split("/", 1)[0].rsplit("@", 1)[-1]
    host, _, port = hostport.partition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Stack:
    """The state of one local stack under `run_dir` (state file + logs/)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.state_path = self.run_dir / STATE_FILE
        self.log_dir = self.run_dir / "logs"

    def read_state(self) -> dict | None:
        if not self.state_path.is_file():
            return None
        return json.loads(self.state_path.read_text())

    def _write_state(self, state: dict) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.chmod(0o600)  # it may hold generated API keys
        tmp.replace(self.state_path)

    def processes(self, state: dict | None = None) -> list[Started]:
        state = state if state is not None else self.read_state()
        return [Started(**p) for p in (state or {}).get("processes", [])]

    # ----- up -------------------------------------------------------------------------------
    def up(self, compose_file: str | Path, *, bundle: str | None = None, data: str | None = None,
           redis_url: str | None = None, free_ports: bool = False, timeout_s: float = 180.0,
           host_env: Mapping[str, str] | None = None, replicas: Mapping[str, int] | None = None,
           say: Callable[[str], None] = lambda line: None) -> dict:
        """Start the stack and return its state once every service answers its readiness probe.

        `replicas` ({"rank": 2, "gateway": 2}) runs those services as several processes; every
        gateway shares the one Redis, and `state["gateways"]` lists their URLs.
        """
        host_env = dict(os.environ if host_env is None else host_env)
        alive = [p.name for p in self.processes() if is_ours(p)]
        if alive:
            raise StackError(f"a stack is already running from {self.state_path} "
                             f"({', '.join(alive)}); run 'cascade stack down' first")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        state: dict = {"compose": str(Path(compose_file).resolve()), "started_at": time.time(),
                       "processes": [], "own_redis": redis_url is None}
        # Check the plan (paths, ports) before starting anything, then plan for the real Redis.
        self._plan(compose_file, redis_url or "redis://127.0.0.1:1/0", host_env, bundle, data,
                   free_ports, load_store=state["own_redis"], replicas=replicas)
        try:
            if redis_url is None:
                redis_url = self._start_redis(state, say)
            state["redis_url"] = redis_url
            plan = self._plan(compose_file, redis_url, host_env, bundle, data, free_ports,
                              load_store=state["own_redis"], replicas=replicas)
            state["secrets"] = plan.generated
            state["urls"] = {p.name: p.url for p in plan.processes if p.url}
            state["gateways"] = [p.url for p in plan.processes if p.service == "gateway"]
            state["replicas"] = dict(replicas or {})
            self._write_state(state)
            self._start_all(plan, state, host_env, timeout_s, say)
        except BaseException:
            self.down(say=lambda line: None, state=state)
            raise
        return state

    def _plan(self, compose_file: str | Path, redis_url: str, host_env: dict[str, str],
              bundle: str | None, data: str | None, free_ports: bool,
              load_store: bool, replicas: Mapping[str, int] | None = None) -> StackPlan:
        plan = plan_stack(compose_file, redis_url=redis_url, host_env=host_env, bundle=bundle,
                          data=data, load_store=load_store, replicas=replicas)
        if free_ports:
            ports = {p.name: free_port() for p in plan.processes if p.port}
            plan = plan_stack(compose_file, redis_url=redis_url, host_env=host_env,
                              bundle=bundle, data=data, ports=ports, load_store=load_store,
                              replicas=replicas)
        for spec in plan.processes:
            bundle_path = spec.env.get("CASCADE_BUNDLE")
            if bundle_path and not Path(bundle_path).exists():
                raise StackError(f"{spec.name}: bundle not found at {bundle_path} "
                                 "(pass --bundle, or train one with 'cascade train')")
            if spec.oneshot and "--data" in spec.argv:
                data_dir = spec.argv[spec.argv.index("--data") + 1]
                if not Path(data_dir).is_dir():
                    raise StackError(f"{spec.name}: marketplace not found at {data_dir} "
                                     "(pass --data DIR, or run 'cascade simulate' first)")
            if spec.port and not free_ports and probe(f"{spec.url}/healthz", 0.3):
                raise StackError(f"{spec.name}: port {spec.port} already answers; "
                                 "stop that server or use --free-ports")
        return plan

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> tuple:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        return proc, log

    def _record(self, state: dict, name: str, proc: subprocess.Popen, argv: list[str],
                port: int | None, log: Path, ready_path: str | None) -> None:
        ticks = proc_start_ticks(proc.pid) or 0
        state["processes"].append(asdict(Started(name, proc.pid, ticks, list(argv), port,
                                                 str(log), ready_path)))
        self._write_state(state)

    def _start_redis(self, state: dict, say: Callable[[str], None]) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server not found: install it (apt-get install redis-server) "
                             "or pass --redis-url / set REDIS_URL")
        port = free_port()
        data_dir = self.run_dir / "redis"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(data_dir)]
        proc, log = self._spawn("redis", argv, dict(os.environ), self.run_dir)
        self._record(state, "redis", proc, argv, port, log, None)
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 15
        while not redis_ping(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"redis: redis-server did not answer PING (see {log})")
            time.sleep(0.05)
        say(f"redis      ready  {redact_url(url)}")
        return url

    def _start_all(self, plan: StackPlan, state: dict, host_env: dict[str, str],
                   timeout_s: float, say: Callable[[str], None]) -> None:
        """Start each process once its dependencies are ready (or, for tasks, finished)."""
        cwd = Path(state["compose"]).parent
        done: set[str] = set()
        running: dict[str, tuple[ProcessSpec, subprocess.Popen, Path, float]] = {}
        pending = list(plan.processes)
        while pending or running:
            for spec in [s for s in pending if set(s.depends_on) <= done]:
                pending.remove(spec)
                proc, log = self._spawn(spec.name, list(spec.argv),
                                        process_environment(spec, host_env), cwd)
                if not spec.oneshot:
                    self._record(state, spec.name, proc, list(spec.argv), spec.port, log,
                                 spec.readiness_path)
                running[spec.name] = (spec, proc, log, time.monotonic())
            if not running:
                raise StackError(f"cannot start {[s.name for s in pending]}: unmet depends_on")
            for name, (spec, proc, log, since) in list(running.items()):
                code = proc.poll()
                if spec.oneshot and code == 0:
                    say(f"{name:<10} done")
                elif code is not None:
                    raise StackError(f"{name} exited with code {code} during start-up (see {log})")
                elif spec.oneshot or not probe(f"{spec.url}{spec.readiness_path or '/readyz'}"):
                    if time.monotonic() - since > timeout_s:
                        what = "did not finish" if spec.oneshot else "not ready"
                        raise StackError(f"{name} {what} after {timeout_s:.0f}s (see {log})")
                    continue
                else:
                    say(f"{name:<10} ready  {spec.url}")
                done.add(name)
                del running[name]
            time.sleep(0.1)

    # ----- down / status --------------------------------------------------------------------
    def down(self, say: Callable[[str], None] = print, state: dict | None = None,
             grace_s: float = 10.0) -> list[str]:
        """Stop the processes `up` recorded (newest first); return the names stopped."""
        state = state if state is not None else self.read_state()
        if state is None:
            say(f"no stack state at {self.state_path}: nothing to stop")
            return []
        ours = [p for p in reversed(self.processes(state)) if is_ours(p)]
        for proc in ours:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(is_ours(p) for p in ours) and time.monotonic() < deadline:
            time.sleep(0.1)
        for proc in ours:
            if is_ours(proc):
                self._signal(proc, signal.SIGKILL)
            say(f"stopped {proc.name} (pid {proc.pid})")
        self.state_path.unlink(missing_ok=True)
        return [p.name for p in ours]

    @staticmethod
    def _signal(proc: Started, sig: int) -> None:
        """Signal the process group `up` created (start_new_session: pgid == pid)."""
        try:
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, sig)
            else:
                os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass

    def status(self) -> list[dict]:
        """Each recorded process: pid, port, whether it still runs and answers readiness."""
        rows = []
        state = self.read_state() or {}
        for proc in self.processes(state):
            alive = is_ours(proc)
            if proc.name == "redis":
                ready = alive and redis_ping(state.get("redis_url", ""))
            else:
                path = proc.ready_path or "/readyz"
                ready = alive and probe(f"http://127.0.0.1:{proc.port}{path}")
            rows.append({"name": proc.name, "pid": proc.pid, "port": proc.port,
                         "alive": alive, "ready": ready, "log": proc.log})
        return rows


def default_compose_file() -> Path:
    """docker-compose.yml in the working directory, else the one beside this package."""
    here = Path.cwd() / "docker-compose.yml"
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / "docker-compose.yml"
