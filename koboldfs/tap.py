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

from koboldfs.service import KoboldService, ServerConfig

DEFAULTS = {
    "data": "koboldfs-data",
    "listen": "tcp:9876:interface=127.0.0.1",
    "http": "tcp:9877:interface=127.0.0.1",
    "heartbeat": "5",
    "down_after": "30",
    "idle_timeout": "300",
    "replicate_interval": "10",
    "scrub_rate": str(10 * 1024 * 1024),
    "pending_timeout": "3600",
    "prepared_timeout": str(7 * 86400),
}


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

    def postOptions(self) -> None:
        values = {key.replace("-", "_"): value for key, value in self.items()}
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
        max_file_size=_number(values, "max_file_size", int)
        if values.get("max_file_size")
        else None,
        replicate_interval=_number(values, "replicate_interval"),
        scrub_rate=_rate(values["scrub_rate"]),
        pending_timeout=_number(values, "pending_timeout"),
        prepared_timeout=_number(values, "prepared_timeout"),
    )


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
