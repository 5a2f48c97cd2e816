"""Read docker-compose.yml into typed service descriptions, and translate them to local processes.

`cascade stack up` must start exactly what `docker compose up` starts, so the compose file is the
one description of the stack: commands, ports, environment keys, dependencies and bind mounts.
This module reads it (without Docker) and turns a container's view of the world into the host's:
`http://retrieval:8001` becomes `http://127.0.0.1:<port>`, `/bundles/current` becomes the bind
mount's host directory, `${CASCADE_API_KEY:?...}` is looked up in the host environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ is a literal $.
_VAR = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_URL = re.compile(
    r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?:[^@/]*@)?(?P<host>[A-Za-z0-9._-]+):(?P<port>\d+)"
    r"(?P<rest>.*)$")


class ComposeError(ValueError):
    """docker-compose.yml cannot describe a local stack (names the service and the problem)."""


class MissingVariable(ComposeError):
    """A `${NAME:?message}` variable is unset in the host environment."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name} is not set: {message or 'required by docker-compose.yml'}")
        self.name = name


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Expand compose-style variables in `value` from `env` (Compose's own rules, minus nesting)."""

    def expand(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, arg = match.group(2), match.group(3) or ""
        current = env.get(name)
        colon = op is not None and op.startswith(":")
        unset_or_empty = current is None or (colon and current == "")
        if op in (":-", "-"):
            return arg if unset_or_empty else str(current)
        if op in (":?", "?"):
            if unset_or_empty:
                raise MissingVariable(name, arg)
            return str(current)
        return "" if current is None else str(current)

    return _VAR.sub(expand, value)


@dataclass(frozen=True)
class Mount:
    """A bind mount: `source` on the host (uninterpolated), `target` inside the container."""

    source: str
    target: str


@dataclass(frozen=True)
class ComposeService:
    """One service of docker-compose.yml, as the launcher needs it."""

    name: str
    command: tuple[str, ...]
    environment: dict[str, str]  # uninterpolated values
    depends_on: tuple[str, ...]
    mounts: tuple[Mount, ...] = ()
    published_ports: tuple[int, ...] = ()  # container-side ports of `ports:`
    healthcheck: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()
    image: str | None = None
    build: bool = False
    restart: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def port(self) -> int | None:
        """The port the service listens on: its command's `--port` value."""
        return option_value(self.command, "--port", int)

    @property
    def oneshot(self) -> bool:
        """A task that runs to completion (e.g. load-store), not a server: no port, no restart."""
        return self.port is None and self.restart == "no"

    @property
    def readiness_path(self) -> str | None:
        """The HTTP path its healthcheck probes (e.g. /readyz), if it probes one."""
        for part in self.healthcheck:
            found = re.search(r"https?://[^/'\"]+(/[A-Za-z0-9_/-]*)", part)
            if found:
                return found.group(1)
        return None


def option_value(argv: tuple[str, ...] | list[str], option: str, kind: type = str) -> Any:
    """The value after `option` (or in `option=value`) in an argv, or None."""
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return kind(argv[i + 1])
        if arg.startswith(option + "="):
            return kind(arg.split("=", 1)[1])
    return None


def _as_list(value: Any, service: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise ComposeError(f"service {service}: `{key}` must be a list, not a shell string")
    return tuple(str(v) for v in value)


def _environment(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, list):
        out: dict[str, str] = {}
        for item in value:
            key, _, val = str(item).partition("=")
            out[key] = val
        return out
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _mounts(value: Any, service: str) -> tuple[Mount, ...]:
    mounts = []
    for item in value or []:
        if isinstance(item, str):
            source, _, rest = item.partition(":")
            target = rest.split(":", 1)[0]
        elif item.get("type") == "bind":
            source, target = str(item["source"]), str(item["target"])
        else:
            continue  # named volumes have no host path to translate to
        if not target:
            raise ComposeError(f"service {service}: volume {item!r} has no target")
        mounts.append(Mount(source=source, target=target))
    return tuple(mounts)


def _published(value: Any) -> tuple[int, ...]:
    ports = []
    for item in value or []:
        if isinstance(item, dict):
            ports.append(int(item["target"]))
        else:
            ports.append(int(str(item).split("/")[0].rsplit(":", 1)[-1]))
    return tuple(ports)


def load_compose(path: str | Path) -> dict[str, ComposeService]:
    """Parse a compose file into services, in file order (YAML anchors and merges resolved)."""
    path = Path(path)
    if not path.is_file():
        raise ComposeError(f"compose file not found: {path}")
    doc = yaml.safe_load(path.read_text()) or {}
    services: dict[str, ComposeService] = {}
    for name, spec in (doc.get("services") or {}).items():
        depends = spec.get("depends_on") or []
        health = spec.get("healthcheck") or {}
        test = health.get("test", [])
        services[name] = ComposeService(
            name=name,
            command=_as_list(spec.get("command"), name, "command"),
            environment=_environment(spec.get("environment")),
            depends_on=tuple(depends if isinstance(depends, list) else depends.keys()),
            mounts=_mounts(spec.get("volumes"), name),
            published_ports=_published(spec.get("ports")),
            healthcheck=(test,) if isinstance(test, str) else tuple(test),
            profiles=tuple(spec.get("profiles") or ()),
            image=spec.get("image"),
            build="build" in spec,
            restart=spec.get("restart"),
            extra={k: v for k, v in spec.items() if k.startswith("x-")},
        )
    return services


def is_redis(service: ComposeService) -> bool:
    """The Redis container, which the launcher replaces by its own redis-server (or REDIS_URL)."""
    return not service.build and (service.image or "").split(":")[0].split("/")[-1] == "redis"


def translate_value(value: str, *, mounts: tuple[Mount, ...],
                    local_ports: Mapping[str, int | Sequence[int]], redis_service: str | None,
                    redis_url: str, host_env: Mapping[str, str], base_dir: Path) -> str:
    """Turn a container-side value (URL, path) into the host-side value a local process needs.

    A service run as several replicas (`local_ports` lists their ports) becomes the
    comma-separated list of their URLs, which the gateway spreads its calls over.
    """
    value = interpolate(value, host_env)
    url = _URL.match(value)
    if url:
        host = url.group("host")
        if host == redis_service:
            return redis_url
        if host in local_ports:
            ports = local_ports[host]
            ports = [ports] if isinstance(ports, int) else list(ports)
            return ",".join(f"{url.group('scheme')}://127.0.0.1:{port}{url.group('rest')}"
                            for port in ports)
    for mount in sorted(mounts, key=lambda m: len(m.target), reverse=True):
        if value == mount.target or value.startswith(mount.target.rstrip("/") + "/"):
            source = Path(interpolate(mount.source, host_env))
            if not source.is_absolute():
                source = base_dir / source
            return str(source.resolve()) + value[len(mount.target.rstrip("/")):]
    return value
