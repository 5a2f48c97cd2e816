"""The local stack's process list, derived from docker-compose.yml.

`plan_stack` is pure (no processes, no network) so a test can check that the launcher and the
compose file describe the same services, ports and environment keys.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.stack.compose import (
    ComposeError,
    ComposeService,
    MissingVariable,
    interpolate,
    is_redis,
    load_compose,
    translate_value,
)

# Settings.from_env reads these; a host value would silently override the compose topology
# (e.g. a stray CASCADE_RETRIEVAL_URL turning an HTTP stage into an in-process one).
_STACK_OWNED_PREFIXES = ("CASCADE_", "REDIS_URL")


@dataclass(frozen=True)
class ProcessSpec:
    """One local process: what to run, where it listens, with which environment."""

    name: str
    argv: tuple[str, ...]
    env: dict[str, str]  # exactly the compose service's environment keys, host-side values
    port: int | None
    depends_on: tuple[str, ...]
    oneshot: bool = False
    readiness_path: str | None = "/readyz"
    service: str = ""  # the compose service it runs (several replicas share one)

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None


@dataclass
class StackPlan:
    """Everything `up` starts, in dependency order, plus the secrets it had to make up."""

    processes: list[ProcessSpec]
    redis_service: str | None
    generated: dict[str, str] = field(default_factory=dict)

    def by_name(self) -> dict[str, ProcessSpec]:
        return {p.name: p for p in self.processes}


REPLICA_PORT_STEP = 100  # replica i of a service listens on its compose port + 100 * i


def parse_replicas(spec: str) -> dict[str, int]:
    """`rank=2,gateway=2` -> {"rank": 2, "gateway": 2} (ValueError with a one-line reason)."""
    counts: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name.strip() or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"--replicas: bad item {item!r} (expected SERVICE=N, N >= 1, e.g. "
                             "rank=2,gateway=2)")
        counts[name.strip()] = int(count)
    return counts


def replica_names(service: str, count: int) -> list[str]:
    """Process names: the service's own name for one replica, `<service>-<i>` for several."""
    return [service] if count == 1 else [f"{service}-{i}" for i in range(1, count + 1)]


def cascade_argv(command: tuple[str, ...], python: str) -> tuple[str, ...]:
    """`cascade ...` in the image is `python -m cli.main ...` here: no reliance on PATH."""
    if command and command[0] == "cascade":
        return (python, "-m", "cli.main", *command[1:])
    return command


def _replace_option(argv: list[str], option: str, value: str) -> None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            argv[i + 1] = value
        elif arg.startswith(option + "="):
            argv[i] = f"{option}={value}"


def _order(services: list[ComposeService]) -> list[ComposeService]:
    """Dependencies first (Kahn), file order among equals; a cycle is a compose error."""
    names = {s.name for s in services}
    done: list[ComposeService] = []
    pending = list(services)
    while pending:
        ready = [s for s in pending
                 if all(d in {x.name for x in done} or d not in names for d in s.depends_on)]
        if not ready:
            raise ComposeError(f"depends_on cycle among {[s.name for s in pending]}")
        done.extend(ready)
        pending = [s for s in pending if s not in ready]
    return done


def _required_secrets(service: ComposeService, host_env: Mapping[str, str]) -> dict[str, str]:
    """Make up values for unset `${..._KEY:?}` / `${..._SECRET:?}` / `${..._PASSWORD:?}` so a
    dev stack starts.

    Docker refuses to start without them (the right call for a deployment); a local stack on
    loopback gets fresh random ones, recorded in the state file so clients can use them.
    """
    made: dict[str, str] = {}
    for value in service.environment.values():
        while True:
            try:
                interpolate(value, {**host_env, **made})
                break
            except MissingVariable as missing:
                if not missing.name.endswith(("_KEY", "_SECRET", "_PASSWORD")):
                    raise
                made[missing.name] = secrets.token_urlsafe(24)
    return made


def plan_stack(compose_file: str | Path, *, redis_url: str, host_env: Mapping[str, str],
               bundle: str | None = None, data: str | None = None,
               ports: Mapping[str, int] | None = None, load_store: bool = True,
               replicas: Mapping[str, int] | None = None,
               python: str = sys.executable) -> StackPlan:
    """The processes `cascade stack up` runs for `compose_file`.

    - services under a profile (locust) are not part of the stack;
    - the Redis service is replaced by `redis_url`;
    - one-shot tasks that fill Redis (depend on it) run only when `load_store`;
    - `replicas` runs a service as N processes (`rank-1`, `rank-2`, ...) on ports N x 100
      apart, and a URL naming it becomes the comma-separated list of the replicas' URLs;
    - `ports` overrides a process's listening port, by process name (default: the compose
      file's, + 100 per replica);
    - `bundle` / `data` override CASCADE_BUNDLE / CASCADE_DATA and `--bundle` / `--data`.
    """
    compose_file = Path(compose_file).resolve()
    services = load_compose(compose_file)
    redis_names = [s.name for s in services.values() if is_redis(s)]
    redis_service = redis_names[0] if redis_names else None
    chosen = [s for s in services.values()
              if not s.profiles and not is_redis(s)
              and (load_store or not (s.oneshot and redis_service in s.depends_on))]
    for service in chosen:
        if not service.command:
            raise ComposeError(f"service {service.name}: no `command:` to run locally")
        if not service.oneshot and service.port is None:
            raise ComposeError(f"service {service.name}: its command has no --port")
    counts = dict(replicas or {})
    servers = [s.name for s in chosen if not s.oneshot]
    unknown = sorted(set(counts) - set(servers))
    if unknown:
        raise ComposeError(f"--replicas: no service {', '.join(unknown)} to replicate "
                           f"(choose from {', '.join(servers)})")
    names = {s.name: replica_names(s.name, counts.get(s.name, 1)) for s in chosen}
    local_ports = {s.name: [(ports or {}).get(n, s.port + REPLICA_PORT_STEP * i)
                            for i, n in enumerate(names[s.name])]
                   for s in chosen if s.port}
    env_in: dict[str, str] = dict(host_env)
    generated: dict[str, str] = {}
    for service in chosen:
        try:
            generated.update(_required_secrets(service, {**env_in, **generated}))
        except MissingVariable as missing:
            raise ComposeError(f"service {service.name}: {missing}") from None
    env_in.update(generated)
    overrides = {"CASCADE_BUNDLE": bundle, "CASCADE_DATA": data}
    processes = []
    for service in _order(chosen):
        def local(value: str, service: ComposeService = service) -> str:
            return translate_value(value, mounts=service.mounts, local_ports=local_ports,
                                   redis_service=redis_service, redis_url=redis_url,
                                   host_env=env_in, base_dir=compose_file.parent)

        try:
            env = {key: local(value) for key, value in service.environment.items()}
            argv = [local(arg) for arg in cascade_argv(service.command, python)]
        except MissingVariable as missing:
            raise ComposeError(f"service {service.name}: {missing}") from None
        for key, value in overrides.items():
            if value is not None and key in env:
                env[key] = str(Path(value).resolve())
        if bundle is not None:
            _replace_option(argv, "--bundle", str(Path(bundle).resolve()))
        if data is not None:
            _replace_option(argv, "--data", str(Path(data).resolve()))
        _replace_option(argv, "--host", "127.0.0.1")
        depends = tuple(n for d in service.depends_on if d in names for n in names[d])
        for i, name in enumerate(names[service.name]):
            port = local_ports[service.name][i] if service.name in local_ports else None
            if port is not None:
                _replace_option(argv, "--port", str(port))
            processes.append(ProcessSpec(
                name=name, argv=tuple(argv), env=dict(env), port=port, depends_on=depends,
                oneshot=service.oneshot, readiness_path=service.readiness_path,
                service=service.name,
            ))
    return StackPlan(processes=processes, redis_service=redis_service, generated=generated)


def process_environment(spec: ProcessSpec, host_env: Mapping[str, str]) -> dict[str, str]:
    """The host environment minus stack-owned settings, plus the service's compose environment."""
    env = {k: v for k, v in host_env.items() if not k.startswith(_STACK_OWNED_PREFIXES)}
    env.update(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
