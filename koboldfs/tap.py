"""
C{twistd koboldfs}: the server's options and its service.

Every option can also be set, with underscores for dashes, in the
C{[koboldfs]} section of the ini file given by C{--config}; options given on
the command line win over the file.
"""

from __future__ import annotations

import configparser
import os
import re
import socket
from typing import Any

from twisted.python import usage

from koboldfs.auth import read_secret_file
from koboldfs.protocol import CHUNK_SIZE
from koboldfs.service import KoboldService, ServerConfig

DEFAULTS = {
    "data": "koboldfs-data",
    "listen": "tcp:9876:interface=127.0.0.1",
    "http": "tcp:9877:interface=127.0.0.1",
    "heartbeat": "5",
    "down_after": "30",
    "idle_timeout": "300",
    "peer_timeout": "30",
    "replicate_interval": "10",
    "scrub_rate": str(10 * 1024 * 1024),
    "auth": "auto",
    "max_frame_size": str(4 * 1024 * 1024),
    "max_connections": "1024",
    "max_connections_per_ip": "128",
    "max_uploads": "64",
    "handshake_timeout": "10",
    "frame_timeout": "30",
    "pending_timeout": "3600",
    "prepared_timeout": str(7 * 86400),
}


AUTH_MODES = ("auto", "keys", "open")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a KoboldFS server.  With no options: one server on the embedded default, "
        "SQLite metadata and files under ./koboldfs-data, the binary protocol on "
        "127.0.0.1:9876 and HTTP on 127.0.0.1:9877."
    )
    optParameters = [
        ["config", "c", None, "ini file whose [koboldfs] section sets any option below"],
        ["name", None, None, "this server's unique name in the cluster [default: HOSTNAME:PORT]"],
        ["host", None, None, "the machine (failure domain) this server is on [default: hostname]"],
        ["data", "d", None, f"storage root [default: {DEFAULTS['data']}]"],
        ["listen", "l", None, f"binary protocol endpoint [default: {DEFAULTS['listen']}]"],
        ["http", None, None, f"HTTP endpoint [default: {DEFAULTS['http']}]"],
        ["public-url", None, None, "base URL get_url hands out [default: the HTTP endpoint]"],
        ["db", None, None, "metadata database URL [default: sqlite:///DATA/metadata.sqlite]"],
        ["heartbeat", None, None, f"seconds between heartbeats [default: {DEFAULTS['heartbeat']}]"],
        [
            "down-after",
            None,
            None,
            "seconds of silence before a server is taken as down"
            f" [default: {DEFAULTS['down_after']}]",
        ],
        [
            "idle-timeout",
            None,
            None,
            f"seconds an idle client connection is kept [default: {DEFAULTS['idle_timeout']}]",
        ],
        [
            "peer-timeout",
            None,
            None,
            "seconds a request to another server may go without a frame before it is"
            f" dropped and another server is tried [default: {DEFAULTS['peer_timeout']}]",
        ],
        ["max-file-size", None, None, "largest file accepted, in bytes [default: no limit]"],
        [
            "replicate-interval",
            None,
            None,
            "seconds between replication passes when no change wakes them"
            f" [default: {DEFAULTS['replicate_interval']}]",
        ],
        [
            "scrub-rate",
            None,
            None,
            "bytes per second the background scrub re-reads stored copies at; 0 disables it"
            f" [default: {DEFAULTS['scrub_rate']}]",
        ],
        [
            "auth",
            None,
            None,
            "keys: clients prove a namespace key and peers the cluster secret; open: no"
            " authentication; auto: open if --listen is loopback or a Unix socket only,"
            " else keys [default: auto]",
        ],
        [
            "secret-file",
            None,
            None,
            "file holding the cluster secret servers prove to each other (one a line:"
            " the first is used, all are accepted, for rotation)",
        ],
        [
            "max-frame-size",
            None,
            None,
            "largest frame accepted once a client is authenticated, in bytes (at least 1 MiB)"
            f" [default: {DEFAULTS['max_frame_size']}]",
        ],
        [
            "max-connections",
            None,
            None,
            f"open connections at most [default: {DEFAULTS['max_connections']}]",
        ],
        [
            "max-connections-per-ip",
            None,
            None,
            "open connections at most from one client address"
            f" [default: {DEFAULTS['max_connections_per_ip']}]",
        ],
        [
            "max-uploads",
            None,
            None,
            f"PUTs received at once at most [default: {DEFAULTS['max_uploads']}]",
        ],
        [
            "handshake-timeout",
            None,
            None,
            "seconds a new connection has to say HELLO and authenticate"
            f" [default: {DEFAULTS['handshake_timeout']}]",
        ],
        [
            "frame-timeout",
            None,
            None,
            "seconds a begun frame has to arrive whole, and a PUT body between frames"
            f" [default: {DEFAULTS['frame_timeout']}]",
        ],
        [
            "tls-ca",
            None,
            None,
            "PEM file of the CA certificates peers' TLS certificates are checked against:"
            " with it, this server reaches its peers over TLS",
        ],
        [
            "pending-timeout",
            None,
            None,
            "seconds after its last request that an open client transaction is aborted and"
            f" its pending uploads collected [default: {DEFAULTS['pending_timeout']}]",
        ],
        [
            "prepared-timeout",
            None,
            None,
            "seconds a prepared client transaction waits for its commit before it is aborted"
            f" [default: {DEFAULTS['prepared_timeout']}]",
        ],
    ]
    optFlags = [["open", None, "run with no authentication: the same as --auth=open"]]

    def postOptions(self) -> None:
        values = {key.replace("-", "_"): value for key, value in self.items()}
        if values.pop("open"):
            if values["auth"] not in (None, "open"):
                raise usage.UsageError("--open contradicts --auth=" + values["auth"])
            values["auth"] = "open"
        if values["config"]:
            values = {**_read_ini(values["config"]), **{k: v for k, v in values.items() if v}}
        values = {**DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
        try:
            self.server_config = _server_config(values)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _read_ini(path: str) -> dict[str, str]:
    parser = configparser.ConfigParser()
    if not parser.read(path):
        raise usage.UsageError(f"cannot read config file {path}")
    if not parser.has_section("koboldfs"):
        raise usage.UsageError(f"{path} has no [koboldfs] section")
    known = {name.replace("-", "_") for name, *_ in Options.optParameters}
    if "open" in parser["koboldfs"]:
        raise usage.UsageError(f"{path}: write auth = open, not open")
    values = dict(parser.items("koboldfs"))
    unknown = set(values) - known
    if unknown:
        raise usage.UsageError(f"{path}: unknown option(s) {', '.join(sorted(unknown))}")
    return values


def _number(values: dict[str, str], name: str, kind: type = float) -> Any:
    try:
        value = kind(values[name])
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} must be a number") from None
    if value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be positive")
    return value


def _server_config(values: dict[str, str]) -> ServerConfig:
    hostname = socket.gethostname()
    port = re.search(r"^(?:tcp6?|ssl):(?:port=)?(\d+)|:port=(\d+)", values["listen"])
    default_name = f"{hostname}:{next(g for g in port.groups() if g)}" if port else hostname
    return ServerConfig(
        name=values.get("name") or default_name,
        host=values.get("host") or hostname,
        data=os.path.abspath(values["data"]),
        listen=values["listen"],
        http=values["http"],
        public_url=values.get("public_url"),
        db=values.get("db"),
        heartbeat=_number(values, "heartbeat"),
        down_after=_number(values, "down_after"),
        idle_timeout=_number(values, "idle_timeout"),
        peer_timeout=_number(values, "peer_timeout"),
        max_file_size=_number(values, "max_file_size", int)
        if values.get("max_file_size")
        else None,
        replicate_interval=_number(values, "replicate_interval"),
        scrub_rate=_rate(values["scrub_rate"]),
        auth=_choice(values, "auth", AUTH_MODES),
        max_frame_size=_at_least(values, "max_frame_size", CHUNK_SIZE),
        max_connections=_number(values, "max_connections", int),
        max_connections_per_ip=_number(values, "max_connections_per_ip", int),
        max_uploads=_number(values, "max_uploads", int),
        handshake_timeout=_number(values, "handshake_timeout"),
        frame_timeout=_number(values, "frame_timeout"),
        tls_ca=_readable(values.get("tls_ca")),
        cluster_secrets=read_secret_file(values["secret_file"])
        if values.get("secret_file")
        else (),
        pending_timeout=_number(values, "pending_timeout"),
        prepared_timeout=_number(values, "prepared_timeout"),
    )


def _readable(path: str | None) -> str | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ValueError(f"cannot read {path}")
    return None if path is None else os.path.abspath(path)


def _at_least(values: dict[str, str], name: str, least: int) -> int:
    value: int = _number(values, name, int)
    if value < least:
        raise ValueError(f"--{name.replace('_', '-')} must be at least {least}")
    return value


def _choice(values: dict[str, str], name: str, choices: tuple[str, ...]) -> str:
    if values[name] not in choices:
        raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}")
    return values[name]


def _rate(value: str) -> float:
    try:
        rate = float(value)
    except ValueError:
        raise ValueError("--scrub-rate must be a number of bytes per second") from None
    if not rate >= 0 or rate == float("inf"):
        raise ValueError("--scrub-rate must be 0 (off) or a positive number of bytes per second")
    return rate


def makeService(options: Options) -> KoboldService:
    from twisted.internet import reactor

    return KoboldService(options.server_config, reactor)
