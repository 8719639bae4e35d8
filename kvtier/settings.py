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
from typing import Any

from kvtier.config import CacheConfig, parse_size
from kvtier.errors import InvalidRequest


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
    graceful_timeout_s: float = 30.0
    log_level: str = "info"
    access_log: bool = False  # a line per request costs the event loop; /metrics has per-route latency

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
    """One setting: dotted key (``server.port``, ``cache.host.capacity_bytes``) and its sources."""

    key: str
    flag: str
    env: str
    parse: Callable[[Any], Any]
    help: str

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


def _o(key: str, flag: str, parse: Callable[[Any], Any], help: str) -> Option:
    return Option(key, flag, "KVTIER_" + flag.removeprefix("--").replace("-", "_").upper(), parse, help)


OPTIONS: tuple[Option, ...] = (
    _o("server.host", "--host", str, "address to bind; non-loopback without a token warns"),
    _o("server.port", "--port", _int, "TCP port"),
    _o("server.data_dir", "--data-dir", str, "where persistent tiers keep their files"),
    _o("server.ssd", "--ssd", parse_bool, "enable the SSD tier under DATA_DIR/ssd"),
    _o("server.tokens", "--tokens", parse_tokens,
       "bearer tokens bound to tenants, TOKEN=TENANT[,...]; empty disables auth"),
    _o("server.metrics_token", "--metrics-token", parse_metrics_token,
       "bearer token Prometheus scrapes /metrics with; unset: /metrics is open, and without "
       "per-namespace metrics while --tokens is set"),
    _o("server.max_body_bytes", "--max-body-bytes", parse_size, "largest JSON request body"),
    _o("server.max_kv_bytes", "--max-kv-bytes", parse_size,
       "largest data-plane body or shared-memory transfer"),
    _o("server.max_tokens", "--max-tokens", _int, "longest token list in one request"),
    _o("server.shm", "--shm", parse_bool, "allow the shared-memory data path"),
    _o("server.shm_socket", "--shm-socket", str,
       "Unix socket same-host clients hand their shared memory over on (created 0600); "
       "unset: a fresh 0700 directory under the temp dir; clients learn it from GET /v1/kv/shm/socket"),
    _o("server.graceful_timeout_s", "--graceful-timeout-s", _float,
       "seconds in-flight requests get to finish on SIGTERM/SIGINT"),
    _o("server.log_level", "--log-level", str, "debug, info, warning, error"),
    _o("server.access_log", "--access-log", parse_bool,
       "log a line per HTTP request (per-route latency is in /metrics either way)"),
    _o("cache.block_tokens", "--block-tokens", _int, "tokens per block (default for namespaces)"),
    _o("cache.codec", "--codec", str, "block codec: none, fp8, int8, zstd"),
    _o("cache.device.capacity_bytes", "--device-capacity", parse_size,
       "GPU tier capacity (0 disables)"),
    _o("cache.host.capacity_bytes", "--host-capacity", parse_size, "host DRAM tier capacity"),
    _o("cache.ssd.capacity_bytes", "--ssd-capacity", parse_size, "SSD tier capacity"),
    _o("cache.ssd.durability", "--ssd-durability", str, "sync, batch or none"),
    _o("cache.ssd.admission", "--ssd-admission", str, "write_through, write_back or selective"),
    _o("cache.remote.backend", "--remote-backend", str, "redis or mooncake (unset: no remote tier)"),
    _o("cache.remote.url", "--remote-url", str, "remote tier address"),
)
CONFIG_OPTION = Option("config", "--config", "KVTIER_CONFIG", str, "YAML file with server: and cache: sections")


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


def options_markdown() -> str:
    """The README's configuration table."""
    rows = ["| flag | environment | YAML key | default | meaning |", "|---|---|---|---|---|"]
    for o in (CONFIG_OPTION, *OPTIONS):
        default = "" if o is CONFIG_OPTION else _shown(o, _default_of(o.key))
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
