"""
C{twistd koboldfs}: the server's options and its service.

Every option can also be set, with underscores for dashes, in the
C{[koboldfs]} section of the ini file given by C{--config}; options given on
the command line win over the file.
"""

from __future__ import annotations

import configparser
from typing import TYPE_CHECKING

from twisted.python import usage

from koboldfs.config import DEFAULTS, server_config

if TYPE_CHECKING:
    from koboldfs.service import KoboldService


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a KoboldFS server.  With no options: one server on the embedded default, "
        "SQLite metadata and files under ./koboldfs-data, the binary protocol on "
        "127.0.0.1:9876 and HTTP on 127.0.0.1:9877, S3 on 127.0.0.1:9878."
    )
    optParameters = [
        ["config", "c", None, "ini file whose [koboldfs] section sets any option below"],
        ["name", None, None, "this server's unique name in the cluster [default: HOSTNAME:PORT]"],
        ["host", None, None, "the machine (failure domain) this server is on [default: hostname]"],
        ["data", "d", None, f"storage root [default: {DEFAULTS['data']}]"],
        ["listen", "l", None, f"binary protocol endpoint [default: {DEFAULTS['listen']}]"],
        ["http", None, None, f"HTTP endpoint [default: {DEFAULTS['http']}]"],
        [
            "s3",
            None,
            None,
            f"S3 endpoint, or none [default: {DEFAULTS['s3']}]",
        ],
        [
            "s3-region",
            None,
            None,
            f"the region S3 signatures are scoped to [default: {DEFAULTS['s3_region']}]",
        ],
        [
            "s3-domain",
            None,
            None,
            "domain for virtual-hosted style S3 (BUCKET.DOMAIN); path style is always taken",
        ],
        [
            "s3-credentials",
            None,
            None,
            "file of S3 credentials, one a line: ACCESS_KEY SECRET GRANT... (NAMESPACE:rw,"
            " NAMESPACE:ro, *:rw for every bucket)",
        ],
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
        [
            "peer-connect-timeout",
            None,
            None,
            "seconds a connection to another server has for its connect, TLS and handshake"
            f" [default: {DEFAULTS['peer_connect_timeout']}]",
        ],
        [
            "peer-reply-timeout",
            None,
            None,
            "seconds another server has to begin its reply to a request"
            f" [default: {DEFAULTS['peer_reply_timeout']}]",
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
            "key-check-interval",
            None,
            None,
            "seconds between checks that the keys of open connections are not revoked:"
            " a revoked key's connections end within this [default:"
            f" {DEFAULTS['key_check_interval']}]",
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
            "backlog",
            None,
            None,
            "listen queue of each port, capped by net.core.somaxconn"
            f" [default: {DEFAULTS['backlog']}]",
        ],
        [
            "reserve",
            None,
            None,
            "free space never filled: bytes (K, M, G, T) or a percentage of the disk"
            f" [default: {DEFAULTS['reserve']}]",
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
        [
            "s3-upload-timeout",
            None,
            None,
            "seconds after its start that an S3 multipart upload not completed is aborted and"
            f" its parts collected [default: {DEFAULTS['s3_upload_timeout']}]",
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
        try:
            self.server_config = server_config(values)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _read_ini(path: str) -> dict[str, str]:
    # No interpolation: a value may hold a % (reserve = 2%).
    parser = configparser.ConfigParser(interpolation=None)
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


def makeService(options: Options) -> KoboldService:
    """
    The server's service, on the global reactor: the one place, with
    C{koboldfs.tac}, that the server meets it.
    """
    from twisted.internet import reactor

    from koboldfs.service import KoboldService

    return KoboldService(options.server_config, reactor)
