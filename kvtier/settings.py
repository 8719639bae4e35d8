"""Server settings: built once from flags > ``KVTIER_*`` environment > YAML file > defaults.

One table (``OPTIONS``) names every option with its flag, environment variable, default and
meaning; the CLI, the environment reader and the README table are all derived from it, so they
cannot drift. The YAML file may also set any ``CacheConfig`` field under ``cache:``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from kvtier.config import (
    Admission,
    CacheConfig,
    Durability,
    RemoteBackendName,
    check_codec,
    choice,
    parse_size,
)
from kvtier.errors import InvalidRequest

LogLevel = Literal["debug", "info", "warning", "error", "critical"]


@dataclass(slots=True)
class ServerSettings:
    """What the sidecar needs beyond the cache itself."""

    host: str = "127.0.0.1"
    port: int = 8400
    data_dir: str = "./kvtier-data"
    ssd: bool = True  # put the SSD tier under data_dir/ssd unless cache.ssd.path is set
    tokens: dict[str, str] = field(default_factory=dict)  # bearer token -> tenant; empty: no auth
    metrics_token: str = ""  # Prometheus scrape token for /metrics; empty: /metrics needs none
    max_body_bytes: int = 16 * 1024**2  # JSON control requests
    max_kv_bytes: int = 2 * 1024**3  # data-plane bodies and shared-memory transfers
    max_tokens: int = 1_048_576  # longest token list one request may carry
    shm: bool = True  # allow the shared-memory data path
    shm_socket: str = ""  # Unix socket clients hand regions over on; empty: a fresh private temp dir
    uds: str = ""  # also serve HTTP on this Unix socket (same-host clients: unix:///PATH); empty: TCP only
    graceful_timeout_s: float = 30.0
    log_level: LogLevel = "info"
    access_log: bool = False  # a line per request costs the event loop; /metrics has per-route latency

    def __post_init__(self) -> None:
        """Check every field (``build_settings`` re-runs this after assigning them)."""
        self.log_level = parse_log_level(self.log_level)
        for name in ("host", "data_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidRequest(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidRequest(f"port must be 0..65535, got {self.port!r}")
        for name in ("max_body_bytes", "max_kv_bytes", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidRequest(f"{name} must be a positive integer, got {value!r}")
        g = self.graceful_timeout_s
        if isinstance(g, bool) or not isinstance(g, (int, float)) or g < 0:
            raise InvalidRequest(f"graceful_timeout_s must be a number >= 0, got {g!r}")
        for name in ("ssd", "shm", "access_log"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tokens)


@dataclass(slots=True)
class Settings:
    cache: CacheConfig
    server: ServerSettings


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(f"expected a boolean (true/false/1/0/yes/no), got {value!r}")


def parse_log_level(value: Any) -> LogLevel:
    """``info``, ``DEBUG``... -> the lower-case level; else InvalidRequest naming the levels."""
    return choice(value.lower() if isinstance(value, str) else value, LogLevel, "log level")


def _one_of(allowed: Any, what: str) -> Callable[[Any], Any]:
    return lambda value: choice(value, allowed, what)


def parse_tokens(value: Any) -> dict[str, str]:
    """``"tokA=tenantA,tokB=tenantB"`` (or a list of such, or a mapping) -> {token: tenant}."""
    if isinstance(value, Mapping):
        items = [(str(k), str(v)) for k, v in value.items()]
    else:
        parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
        items = []
        for p in (str(p).strip() for p in parts):
            if not p:
                continue
            tok, sep, tenant = p.partition("=")
            if not sep or not tok or not tenant:
                raise InvalidRequest(f"malformed token binding {p!r}: expected TOKEN=TENANT")
            items.append((tok, tenant))
    for tok, tenant in items:
        if "/" in tenant or not tenant.strip():
            raise InvalidRequest(f"tenant name {tenant!r} must be non-empty and contain no '/'")
        if len(tok) < 8:
            raise InvalidRequest("bearer tokens must be at least 8 characters long")
    return dict(items)


def parse_metrics_token(value: Any) -> str:
    token = str(value).strip()
    if token and len(token) < 8:
        raise InvalidRequest("the metrics token must be at least 8 characters long")
    return token


def _int(v: Any) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        raise InvalidRequest(f"expected an integer, got {v!r}") from None


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise InvalidRequest(f"expected a number, got {v!r}") from None


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: dotted key (``server.port``, ``cache.host.capacity_bytes``) and its sources.

    ``metavar`` is how ``--help`` names the value (``SIZE``, ``true|false``, ``{sync,batch,none}``).
    """

    key: str
    flag: str
    env: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_METAVARS: dict[Callable[[Any], Any], str] = {
    parse_bool: "true|false", parse_size: "SIZE", _int: "N", _float: "SECONDS",
    parse_log_level: "LEVEL", check_codec: "CODEC", parse_tokens: "TOKEN=TENANT,...",
}


def _o(key: str, flag: str, parse: Callable[[Any], Any], help: str, metavar: str | None = None) -> Option:
    env = "KVTIER_" + flag.removeprefix("--").replace("-", "_").upper()
    return Option(key, flag, env, parse, help, metavar or _METAVARS.get(parse, flag.removeprefix("--").upper()))


def _choices(allowed: Any) -> str:
    return "{" + ",".join(get_args(allowed)) + "}"


OPTIONS: tuple[Option, ...] = (
    _o("server.host", "--host", str, "address to bind; a non-loopback address without --tokens logs a warning",
       "ADDRESS"),
    _o("server.port", "--port", _int, "TCP port to listen on", "PORT"),
    _o("server.data_dir", "--data-dir", str, "directory where persistent tiers keep their files", "DIR"),
    _o("server.ssd", "--ssd", parse_bool, "keep an SSD tier in DATA_DIR/ssd"),
    _o("server.tokens", "--tokens", parse_tokens,
       "bearer tokens, each bound to a tenant; empty: no authentication"),
    _o("server.metrics_token", "--metrics-token", parse_metrics_token,
       "bearer token Prometheus scrapes /metrics with; unset: /metrics is open, and without "
       "per-namespace metrics while --tokens is set"),
    _o("server.max_body_bytes", "--max-body-bytes", parse_size, "largest JSON request body"),
    _o("server.max_kv_bytes", "--max-kv-bytes", parse_size,
       "largest data-plane body or shared-memory transfer"),
    _o("server.max_tokens", "--max-tokens", _int, "most token ids one request may carry"),
    _o("server.shm", "--shm", parse_bool, "allow the shared-memory data path, for engines on the same host"),
    _o("server.shm_socket", "--shm-socket", str,
       "Unix socket same-host clients hand their shared memory over on (created 0600); "
       "unset: a fresh 0700 directory under the temp dir; clients learn it from GET /v1/kv/shm/socket"),
    _o("server.uds", "--uds", str,
       "also serve the HTTP API on this Unix socket (created 0600) beside the TCP port: same-host "
       "clients reach it as unix:///PATH, with less per-byte cost than loopback TCP", "PATH"),
    _o("server.graceful_timeout_s", "--graceful-timeout-s", _float,
       "seconds requests in flight get to finish on SIGTERM or SIGINT"),
    _o("server.log_level", "--log-level", parse_log_level, "debug, info, warning, error or critical"),
    _o("server.access_log", "--access-log", parse_bool,
       "log a line per HTTP request; per-route latency is in /metrics either way"),
    _o("cache.block_tokens", "--block-tokens", _int, "tokens per block of namespaces that do not set their own"),
    _o("cache.codec", "--codec", check_codec,
       "block codec: none, fp8 or int8, optionally +zstd (int8+zstd); zstd alone is none+zstd"),
    _o("cache.device.capacity_bytes", "--device-capacity", parse_size,
       "GPU tier capacity; 0 disables it"),
    _o("cache.host.capacity_bytes", "--host-capacity", parse_size, "host DRAM tier capacity"),
    _o("cache.ssd.capacity_bytes", "--ssd-capacity", parse_size, "SSD tier capacity"),
    _o("cache.ssd.durability", "--ssd-durability", _one_of(Durability, "ssd durability"),
       "when a put returns: sync (fsync'd), batch (fsync'd with others within ms) or none",
       _choices(Durability)),
    _o("cache.ssd.admission", "--ssd-admission", _one_of(Admission, "ssd admission policy"),
       "which blocks reach the SSD: write_through (all), write_back (on eviction) or selective "
       "(evicted blocks hit often)", _choices(Admission)),
    _o("cache.remote.backend", "--remote-backend", _one_of(RemoteBackendName, "remote backend"),
       "engine of the shared remote tier; unset: no remote tier", _choices(RemoteBackendName)),
    _o("cache.remote.url", "--remote-url", str, "remote tier address, e.g. redis://HOST:6379/0", "URL"),
)
CONFIG_OPTION = Option("config", "--config", "KVTIER_CONFIG", str, "YAML file with server: and cache: sections",
                       "FILE")


def _default_of(key: str) -> Any:
    section, _, rest = key.partition(".")
    obj: Any = ServerSettings() if section == "server" else CacheConfig()
    for part in rest.split("."):
        obj = getattr(obj, part)
    return obj


def _shown(o: Option, value: Any) -> str:
    if value is None or value == {}:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if o.parse is parse_size and value:
        for unit, n in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if value % n == 0:
                return f"{value // n}{unit}"
    return str(value)


def default_text(o: Option) -> str:
    """The default of ``o`` as ``--help`` and the README show it (``""`` when unset)."""
    return "" if o is CONFIG_OPTION else _shown(o, _default_of(o.key))


def options_markdown() -> str:
    """The README's configuration table."""
    rows = ["| flag | environment | YAML key | default | meaning |", "|---|---|---|---|---|"]
    for o in (CONFIG_OPTION, *OPTIONS):
        default = default_text(o)
        rows.append(f"| `{o.flag}` | `{o.env}` | `{o.key if o is not CONFIG_OPTION else ''}` "
                    f"| `{default}` | {o.help} |".replace("``", ""))
    return "\n".join(rows)


def _flatten(d: Mapping, prefix: str, out: dict[str, Any]) -> None:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and key != "server.tokens":
            _flatten(v, key, out)
        else:
            out[key] = v


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Flattened ``{dotted.key: value}`` from a YAML file with ``server:``/``cache:`` sections."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise InvalidRequest(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise InvalidRequest(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, Mapping) or set(data) - {"server", "cache"}:
        raise InvalidRequest(f"config file {str(path)!r} must be a mapping with only "
                             f"'server' and 'cache' sections, got {sorted(data) if isinstance(data, Mapping) else data!r}")
    out: dict[str, Any] = {}
    _flatten(data, "", out)
    return out


def build_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                   config_path: str | None = None) -> Settings:
    """Merge defaults < YAML < ``KVTIER_*`` env < flags (``None`` flag values mean unset)."""
    flags = dict(flags or {})
    env = dict(os.environ if env is None else env)
    by_key = {o.key: o for o in OPTIONS}
    config_path = flags.get("config") or config_path or env.get(CONFIG_OPTION.env)
    values: dict[str, Any] = {}
    if config_path:
        for key, v in load_yaml(config_path).items():
            values[key] = by_key[key].parse(v) if key in by_key else v
    for o in OPTIONS:
        for source, raw in (("env", env.get(o.env)), ("flag", flags.get(o.dest))):
            if raw is None:
                continue
            try:
                values[o.key] = o.parse(raw)
            except InvalidRequest as e:
                name = o.env if source == "env" else o.flag
                raise InvalidRequest(f"{name}: {e}") from None
    server = ServerSettings()
    cache_tree: dict[str, Any] = {}
    for key, v in values.items():
        section, _, rest = key.partition(".")
        if section == "server":
            if rest not in {f.name for f in fields(ServerSettings)}:
                raise InvalidRequest(f"unknown server setting {rest!r}")
            setattr(server, rest, v)
        else:
            node = cache_tree
            *parents, leaf = rest.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
    server.__post_init__()
    cache = _build_cache(cache_tree)
    if server.ssd and cache.ssd.path is None:
        cache.ssd.path = str(Path(server.data_dir) / "ssd")
    if server.port < 0 or server.port > 65535:
        raise InvalidRequest(f"port must be 0..65535, got {server.port}")
    if server.metrics_token and server.metrics_token in server.tokens:
        raise InvalidRequest("the metrics token must differ from every tenant's token")
    if server.max_tokens <= 0:
        raise InvalidRequest(f"max_tokens must be positive, got {server.max_tokens}")
    return Settings(cache, server)


def _build_cache(tree: Mapping[str, Any]) -> CacheConfig:
    """CacheConfig from a nested mapping; unknown keys are an error naming the key."""
    cfg = CacheConfig()
    _apply(cfg, tree, "cache")
    cfg.__post_init__()  # re-validate and normalize sizes after assignment
    return cfg


def _apply(obj: Any, tree: Mapping[str, Any], where: str) -> None:
    names = {f.name for f in fields(obj)}
    for k, v in tree.items():
        if k not in names:
            raise InvalidRequest(f"unknown setting {where}.{k}: expected one of {sorted(names)}")
        current = getattr(obj, k)
        if is_dataclass(current):
            if not isinstance(v, Mapping):
                raise InvalidRequest(f"{where}.{k} must be a mapping, got {v!r}")
            _apply(current, v, f"{where}.{k}")
        else:
            setattr(obj, k, v)
