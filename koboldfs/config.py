"""
A server's configuration: L{ServerConfig}, its defaults, and the checks
that turn option values (strings, from the command line or the ini file)
into one.

This is the one place the defaults are written: C{twistd koboldfs}'s
options (L{koboldfs.tap}) show and apply L{DEFAULTS}, which are read off
L{ServerConfig}.  It imports nothing of the server, so that parsing
options does not load it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from koboldfs.auth import read_secret_file
from koboldfs.protocol import CHUNK_SIZE, MAX_PAYLOAD
from koboldfs.storage import DEFAULT_RESERVE, parse_reserve

#: The storage root when C{--data} is not given, relative to the directory
#: the server starts in.
DEFAULT_DATA = "koboldfs-data"

#: The values of C{--auth}.
AUTH_MODES = ("auto", "keys", "open")


@dataclass
class ServerConfig:
    """
    Everything a server is told at start; see docs/server.md.
    """

    name: str
    host: str
    data: str
    listen: str = "tcp:9876:interface=127.0.0.1"
    http: str = "tcp:9877:interface=127.0.0.1"
    #: The S3 endpoint (docs/s3.md), or "none" for no S3.
    s3: str = "tcp:9878:interface=127.0.0.1"
    s3_region: str = "us-east-1"
    #: The domain of virtual-hosted style (C{bucket.DOMAIN}); path-style
    #: requests are always taken.
    s3_domain: str | None = None
    #: A file of S3 credentials (C{ACCESS_KEY SECRET GRANT...} lines).
    s3_credentials: str | None = None
    public_url: str | None = None
    db: str | None = None
    heartbeat: float = 5.0
    down_after: float = 30.0
    idle_timeout: float = 300.0
    peer_timeout: float = 30.0
    #: Seconds a connection to a peer has for its connect, TLS and
    #: handshake; and for a peer's reply to begin.  Shorter than a
    #: client's (5 s by default), so that a put whose peer hangs is
    #: answered before its client gives up on this server.
    peer_connect_timeout: float = 3.0
    peer_reply_timeout: float = 3.0
    max_file_size: int | None = None
    replicate_interval: float = 10.0
    scrub_rate: float = 10 * 1024 * 1024
    #: "keys": every client proves a namespace key, every peer the cluster
    #: secret; "open": nobody does; "auto": open when C{listen} is local
    #: only (loopback or a Unix socket), else keys (docs/security.md).
    auth: str = "auto"
    #: Cluster secrets: the first is proved to peers, all are accepted.
    cluster_secrets: tuple[bytes, ...] = field(default=(), repr=False)
    #: Seconds between checks that the keys of open connections still
    #: exist: how long a revoked key's open connection may live on.
    key_check_interval: float = 10.0
    #: Peers speak TLS, trusting the certificates in this PEM file.
    tls_ca: str | None = None
    # Limits (docs/security.md); each refusal is an ERROR frame saying which.
    max_frame_size: int = MAX_PAYLOAD
    max_connections: int = 1024
    max_connections_per_ip: int = 128
    max_uploads: int = 64
    #: The listen queue of each port: connections the kernel holds until
    #: accepted (a flood of them must not overflow it: a dropped SYN costs
    #: its client a second).  The kernel caps it at net.core.somaxconn.
    backlog: int = 1024
    #: Free space never filled (bytes, K/M/G/T, or a percentage of the
    #: disk): puts and copies that would pass it are refused (NO_SPACE).
    reserve: str = DEFAULT_RESERVE
    #: Seconds from connecting to the end of HELLO (and AUTH).
    handshake_timeout: float = 10.0
    #: Seconds a frame may take to arrive once begun, and between the
    #: frames of a PUT body.
    frame_timeout: float = 30.0
    #: Seconds after its last request that an open transaction is aborted.
    pending_timeout: float = 3600.0
    #: Seconds a prepared transaction waits for its commit before abort.
    prepared_timeout: float = 7 * 86400.0
    #: Seconds after its start that an S3 multipart upload not completed
    #: is aborted and its parts collected.
    s3_upload_timeout: float = 7 * 86400.0


def _option_value(value: Any) -> str:
    """
    A default as an option would spell it: C{5}, not C{5.0}.
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


#: Every option's default, as the option's string: the defaults of
#: L{ServerConfig}'s fields that options set, and the storage root.
DEFAULTS: dict[str, str] = {
    "data": DEFAULT_DATA,
    **{
        f.name: _option_value(f.default)
        for f in dataclasses.fields(ServerConfig)
        if f.default is not dataclasses.MISSING and isinstance(f.default, (str, int, float))
    },
}


def server_config(values: dict[str, str]) -> ServerConfig:
    """
    The L{ServerConfig} that option values ask for, each given as a string
    by its name with underscores (C{down_after}), missing ones taken from
    L{DEFAULTS}.

    @raise ValueError: a value is wrong; the message names the option.
    """
    values = {**DEFAULTS, **{k: v for k, v in values.items() if v is not None}}
    hostname = socket.gethostname()
    port = re.search(r"^(?:tcp6?|ssl):(?:port=)?(\d+)|:port=(\d+)", values["listen"])
    default_name = f"{hostname}:{next(g for g in port.groups() if g)}" if port else hostname
    return ServerConfig(
        name=values.get("name") or default_name,
        host=values.get("host") or hostname,
        data=os.path.abspath(values["data"]),
        listen=values["listen"],
        http=values["http"],
        s3=values["s3"],
        s3_region=_region(values["s3_region"]),
        s3_domain=values.get("s3_domain") or None,
        s3_credentials=_readable(values.get("s3_credentials")),
        public_url=values.get("public_url"),
        db=values.get("db"),
        heartbeat=_number(values, "heartbeat"),
        down_after=_number(values, "down_after"),
        idle_timeout=_number(values, "idle_timeout"),
        peer_timeout=_number(values, "peer_timeout"),
        peer_connect_timeout=_number(values, "peer_connect_timeout"),
        peer_reply_timeout=_number(values, "peer_reply_timeout"),
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
        backlog=_number(values, "backlog", int),
        reserve=_reserve(values["reserve"]),
        handshake_timeout=_number(values, "handshake_timeout"),
        frame_timeout=_number(values, "frame_timeout"),
        key_check_interval=_number(values, "key_check_interval"),
        tls_ca=_readable(values.get("tls_ca")),
        cluster_secrets=read_secret_file(values["secret_file"])
        if values.get("secret_file")
        else (),
        pending_timeout=_number(values, "pending_timeout"),
        prepared_timeout=_number(values, "prepared_timeout"),
        s3_upload_timeout=_number(values, "s3_upload_timeout"),
    )


def _number(values: dict[str, str], name: str, kind: type = float) -> Any:
    try:
        value = kind(values[name])
    except ValueError:
        raise ValueError(f"--{name.replace('_', '-')} must be a number") from None
    if value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be positive")
    return value


def _reserve(value: str) -> str:
    parse_reserve(value)  # raises, naming the option
    return value


def _region(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9-]{1,64}", value):
        raise ValueError("--s3-region must be a region name such as us-east-1")
    return value


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
