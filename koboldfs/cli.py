"""
The C{koboldfs} command: files in and out of a cluster, and its
administration.  See docs/cli.md.

File commands (C{put}, C{get}, C{ls}...) talk to servers over the binary
protocol through the blocking L{koboldfs.Client}, whose reactor runs in a
thread of its own; bodies stream in 1 MiB chunks between the servers and
files, pipes or the terminal, so a file of any size costs the same memory.
C{admin} commands talk to the metadata database directly, through
L{koboldfs.metadata.store_from_url}, under L{twisted.internet.task.react}.

Every command exits with one of L{EXIT_OK}, L{EXIT_NOT_FOUND},
L{EXIT_USAGE} or L{EXIT_UNAVAILABLE}, and says on stderr what went wrong
and what to do about it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import partial
from typing import Any, Callable, Iterator, Sequence

from koboldfs import __version__
from koboldfs.errors import ConnectionFailed, InvalidName, KoboldError
from koboldfs.interfaces import S3Grant, ServerState
from koboldfs import humanize
from koboldfs.names import check_key, check_namespace, is_bucket_name
from koboldfs.placement import missing_copies, wanted_copies

#: Exit statuses.  C{EXIT_NOT_FOUND} is also C{admin status}'s "degraded".
EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
#: Standard output was closed early (C{koboldfs cat k | head}): what a
#: shell reports for a command killed by SIGPIPE.
EXIT_BROKEN_PIPE = 128 + 13
EXIT_INTERRUPTED = 128 + 2

DEFAULT_SERVERS = "127.0.0.1:9876"
DEFAULT_NAMESPACE = "default"
#: The server's default database, seen from the directory it was started in.
DEFAULT_DB = "sqlite:///koboldfs-data/metadata.sqlite"
#: The server's default C{--down-after}.
DEFAULT_DOWN_AFTER = 30.0

#: Keys asked for per LIST request (the servers' own cap).
PAGE = 1000
#: STAT requests in flight at once for C{ls -l}.
STAT_CONCURRENCY = 8
#: Copies C{admin fsck} verifies at once, and files it reads per query.
FSCK_CONCURRENCY = 4
FSCK_PAGE = 500

SERVERS_HINT = "is `twistd koboldfs` running there? set --servers or KOBOLDFS_SERVERS"
DB_HINT = "set --db or KOBOLDFS_DB to the servers' --db"


class CommandError(Exception):
    """
    A command failed in a way the user can act on: C{message} says how,
    C{code} is the exit status.
    """

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


# -- the command line


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """
    The options every file command takes, before or after its name.  After
    it, they default to nothing (SUPPRESS), so as not to undo one given
    before it.
    """
    from koboldfs.connection import CONNECT_TIMEOUT, REPLY_TIMEOUT

    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "-s",
        "--servers",
        action="append",
        metavar="HOST:PORT[,...]",
        help="servers to talk to, comma-separated or repeated "
        f"[env KOBOLDFS_SERVERS, default {DEFAULT_SERVERS}]",
        **default,
    )
    parser.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help=f"namespace [env KOBOLDFS_NAMESPACE, default {DEFAULT_NAMESPACE}]",
        **default,
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (there is none unless stderr is a terminal)",
        **default,
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="seconds a server has to take a connection (TCP, TLS and handshake) before "
        f"the next is tried [default {CONNECT_TIMEOUT:g}]",
        **default,
    )
    parser.add_argument(
        "--reply-timeout",
        type=float,
        metavar="S",
        help="seconds a server has to begin its reply before the next is tried "
        f"[default {REPLY_TIMEOUT:g}]",
        **default,
    )
    credentials = parser.add_mutually_exclusive_group()
    credentials.add_argument(
        "-k",
        "--key",
        dest="client_key",  # not KEY, the file commands' argument
        metavar="KEY",
        help="the namespace's key, for servers that require one [env KOBOLDFS_KEY]",
        **default,
    )
    credentials.add_argument(
        "--key-file",
        metavar="FILE",
        help="a file holding the key [env KOBOLDFS_KEY_FILE]",
        **default,
    )
    _tls_options(parser, default)


def _tls_options(parser: argparse.ArgumentParser, default: dict[str, Any]) -> None:
    parser.add_argument(
        "--tls",
        action="store_true",
        help="speak TLS to the servers, checking their certificates",
        **default,
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        help="the certificates to trust for TLS (implies --tls) [env KOBOLDFS_CA, "
        "default: the system's]",
        **default,
    )


def _admin_common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument(
        "--db",
        metavar="URL",
        help=f"metadata database [env KOBOLDFS_DB, default {DEFAULT_DB}]",
        **default,
    )
    parser.add_argument(
        "--secret-file",
        metavar="FILE",
        help="the servers' cluster secret, to talk to them as a peer (fsck; status and "
        "servers without --db) [env KOBOLDFS_SECRET_FILE]",
        **default,
    )
    parser.add_argument(
        "-s",
        "--servers",
        action="append",
        metavar="HOST:PORT[,...]",
        help="servers to ask, for status and servers without --db [env KOBOLDFS_SERVERS]",
        **default,
    )
    _tls_options(parser, default)


def make_parser() -> argparse.ArgumentParser:
    """
    The parser of C{koboldfs}'s arguments.
    """
    parser = argparse.ArgumentParser(
        prog="koboldfs",
        description="Put, get and list files in a KoboldFS cluster, and administer it.",
        epilog="Exit status: 0 success, 1 not found, 2 usage error, "
        "3 cluster unreachable or server error.  See docs/cli.md.",
    )
    parser.add_argument("--version", action="version", version=f"koboldfs {__version__}")
    _common(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common(sub, suppress=True)
        sub.set_defaults(func=func)
        return sub

    p = command("put", "store FILE (or standard input) under KEY", cmd_put)
    p.add_argument("key", metavar="KEY")
    p.add_argument("file", metavar="FILE", nargs="?", default="-", help="a file, or - for stdin")
    p = command("get", "write KEY's bytes to FILE (or standard output)", cmd_get)
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "file", metavar="FILE", nargs="?", default="-", help="a file or directory, or - for stdout"
    )
    p = command("cat", "write KEY's bytes to standard output", cmd_cat)
    p.add_argument("key", metavar="KEY")
    p = command("rm", "delete keys", cmd_rm)
    p.add_argument("keys", metavar="KEY", nargs="+")
    p.add_argument("-f", "--force", action="store_true", help="a missing key is no error")
    p = command("ls", "list keys starting with PREFIX, in order", cmd_ls)
    p.add_argument("prefix", metavar="PREFIX", nargs="?", default="")
    p.add_argument(
        "-l",
        "--long",
        action="store_true",
        help="size, copies, creation time (UTC) and SHA-256 before each key",
    )
    p.add_argument(
        "--page-size",
        metavar="N",
        type=int,
        default=PAGE,
        help=f"keys asked for per request [default {PAGE}, the servers' cap]",
    )
    p = command("stat", "what the cluster knows of KEY", cmd_stat)
    p.add_argument("key", metavar="KEY")
    p = command("url", "an HTTP URL of KEY", cmd_url)
    p.add_argument("key", metavar="KEY")
    p.add_argument(
        "--expires",
        metavar="S",
        type=int,
        help="seconds a private namespace's signed URL is valid [default 3600]",
    )
    command("ping", "ask each server whether it answers", cmd_ping)

    admin = commands.add_parser(
        "admin",
        help="administer the cluster through its metadata database",
        description="Administer the cluster: these commands use the metadata "
        "database directly, not the servers.",
    )
    _admin_common(admin, suppress=False)
    admin.set_defaults(func=_admin_help(admin))
    sub = admin.add_subparsers(dest="admin_command", metavar="COMMAND")

    def admin_command(
        parent: Any, name: str, help: str, func: Callable[..., Any]
    ) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        _admin_common(p, suppress=True)
        p.set_defaults(func=_run_admin, admin_func=func)
        return p

    p = admin_command(sub, "servers", "the servers, their state, heartbeat and disk", admin_servers)
    p.add_argument(
        "--down-after",
        metavar="S",
        type=float,
        default=DEFAULT_DOWN_AFTER,
        help="seconds without a heartbeat after which a server is down "
        f"(the servers' --down-after) [default {DEFAULT_DOWN_AFTER:g}]",
    )
    p = sub.add_parser("server", help="change a server", description="Change a server.")
    server = p.add_subparsers(dest="server_command", metavar="COMMAND", required=True)
    p = admin_command(
        server, "set-state", "set a server's state: alive, readonly, drain or dead", admin_set_state
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("state", metavar="STATE", choices=list(ServerState))
    p = admin_command(
        server,
        "forget-copies",
        "after a server's disk was lost or replaced: mark every copy it held bad, so that "
        "it copies them all again when it starts (run it while the server is stopped)",
        admin_forget_copies,
    )
    p.add_argument("name", metavar="NAME")
    admin_command(sub, "namespaces", "the namespaces and their settings", admin_namespaces)
    p = sub.add_parser(
        "namespace",
        help="create or change a namespace",
        description="Create or change a namespace.",
    )
    namespace = p.add_subparsers(dest="namespace_command", metavar="COMMAND", required=True)
    for name, help, func in (
        ("create", "create a namespace", admin_namespace_create),
        ("set", "change a namespace's settings", admin_namespace_set),
    ):
        p = admin_command(namespace, name, help, func)
        p.add_argument("name", metavar="NAME")
        p.add_argument(
            "--replicas", metavar="N", type=int, help="copies to keep of each file [default: all]"
        )
        p.add_argument(
            "--min-copies",
            metavar="N",
            type=int,
            help="copies a put must have made before it is acknowledged [default 1]",
        )
        p.add_argument(
            "--all-servers",
            dest="replicas",
            action="store_const",
            const="all",
            help="a copy on every server (the default)",
        )
        privacy = p.add_mutually_exclusive_group()
        privacy.add_argument(
            "--private",
            dest="private",
            action="store_const",
            const=True,
            help="files served by signed URLs only; set before the first file",
        )
        privacy.add_argument(
            "--public", dest="private", action="store_const", const=False, help="the opposite"
        )
        public_read = p.add_mutually_exclusive_group()
        public_read.add_argument(
            "--public-read",
            dest="public_read",
            action="store_const",
            const=True,
            help="S3 serves its objects to anonymous GET and HEAD (docs/s3-store.md)",
        )
        public_read.add_argument(
            "--no-public-read",
            dest="public_read",
            action="store_const",
            const=False,
            help="S3 serves nothing anonymously (the default)",
        )
        template = p.add_mutually_exclusive_group()
        template.add_argument(
            "--url-template", metavar="T", help="how URLs are built (docs/http.md)"
        )
        template.add_argument(
            "--no-url-template",
            dest="url_template",
            action="store_const",
            const="",
            help="back to the servers' --public-url",
        )
    p = sub.add_parser("s3", help="the S3 front end", description="The S3 front end.")
    s3 = p.add_subparsers(dest="s3_command", metavar="COMMAND", required=True)
    p = s3.add_parser(
        "credential",
        help="make, list and revoke S3 credentials",
        description="Make, list and revoke S3 credentials (docs/security.md).",
    )
    credential = p.add_subparsers(dest="credential_command", metavar="COMMAND", required=True)
    p = admin_command(
        credential,
        "create",
        "make a credential; prints its access key id and secret, shown this once",
        admin_s3_create,
    )
    p.add_argument(
        "--ns",
        dest="grants",
        action="append",
        default=[],
        metavar="NS[:ro]",
        help="a namespace (bucket) it may use, read-write or with :ro read-only; repeat",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="every namespace, and bucket administration (create, delete, list all)",
    )
    admin_command(credential, "list", "the credentials, their grants and use", admin_s3_list)
    p = admin_command(
        credential, "revoke", "revoke a credential: refused from now on", admin_s3_revoke
    )
    p.add_argument("access_key", metavar="ACCESS_KEY_ID")
    p = sub.add_parser(
        "key",
        help="make, list and revoke namespace keys",
        description="Make, list and revoke the keys clients prove to servers that "
        "require them (docs/security.md).",
    )
    key = p.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    p = admin_command(
        key,
        "create",
        "make a key of namespace NS (created if missing) and print it: it is shown "
        "this once, and only a hash of it is stored",
        admin_key_create,
    )
    p.add_argument("namespace", metavar="NS")
    p.add_argument(
        "--readonly",
        action="store_true",
        help="a key that may get, stat, list and get URLs, but not put or delete",
    )
    p = admin_command(key, "list", "the keys of NS (of every namespace if none)", admin_key_list)
    p.add_argument("namespace", metavar="NS", nargs="?")
    p = admin_command(
        key,
        "revoke",
        "revoke key KEY_ID of NS: refused on new connections at once, and open "
        "connections with it are ended within the servers' --key-check-interval",
        admin_key_revoke,
    )
    p.add_argument("namespace", metavar="NS")
    p.add_argument("key_id", metavar="KEY_ID", help="the id `key list` shows, or the whole key")
    p = admin_command(
        sub,
        "status",
        "cluster health; exits 1 when degraded (a server down, files short of copies, "
        "copies quarantined)",
        admin_status,
    )
    p.add_argument(
        "--down-after",
        metavar="S",
        type=float,
        default=DEFAULT_DOWN_AFTER,
        help=f"as for `admin servers` [default {DEFAULT_DOWN_AFTER:g}]",
    )
    p.add_argument(
        "--db-only",
        action="store_true",
        help="do not ask the servers' status pages for their scrub and retry figures",
    )
    p = admin_command(
        sub,
        "fsck",
        "verify every copy of every live file (its server re-reads it against its size "
        "and SHA-256); bad copies are set aside and made again; exits 1 on problems",
        admin_fsck,
    )
    p.add_argument("--namespace", "-n", metavar="NS", help="check this namespace only")
    p.add_argument(
        "--down-after",
        metavar="S",
        type=float,
        default=DEFAULT_DOWN_AFTER,
        help=f"as for `admin servers` [default {DEFAULT_DOWN_AFTER:g}]",
    )
    p.add_argument(
        "--concurrency",
        metavar="N",
        type=int,
        default=FSCK_CONCURRENCY,
        help=f"copies checked at once [default {FSCK_CONCURRENCY}]",
    )
    return parser


def _admin_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    def show(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    return show


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run C{koboldfs} with C{argv} (C{sys.argv[1:]} when None); return the
    exit status.
    """
    parser = make_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        # --help, --version, or a usage error argparse has reported.
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except CommandError as e:
        _say(e.message)
        return e.code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _say("interrupted")
        return EXIT_INTERRUPTED


def _say(message: str) -> None:
    print(f"koboldfs: {message}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """
    After a broken pipe, point stdout at /dev/null, so that the
    interpreter's own flush at exit does not complain about it again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


# -- settings: options, then the environment, then the client config file

#: What the client config file may set, in its [koboldfs] section.
CONFIG_SETTINGS = ("servers", "namespace", "key", "key_file", "tls", "ca", "db", "secret_file")
#: Settings that name files: relative to the config file's directory.
_PATHS = ("key_file", "ca", "secret_file")


def config_path() -> str:
    """
    The client config file: C{KOBOLDFS_CONFIG}, or C{client.ini} in the
    user's config directory (C{$XDG_CONFIG_HOME/koboldfs}, by default
    C{~/.config/koboldfs}).
    """
    given = os.environ.get("KOBOLDFS_CONFIG")
    if given:
        return given
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "koboldfs", "client.ini")


def _config(args: argparse.Namespace) -> dict[str, str]:
    """
    The client config file's settings (read once per command).  A missing
    file is no error unless C{KOBOLDFS_CONFIG} names it.
    """
    cached: dict[str, str] | None = getattr(args, "_config", None)
    if cached is not None:
        return cached
    import configparser

    path = config_path()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except FileNotFoundError:
        if os.environ.get("KOBOLDFS_CONFIG"):
            raise CommandError(f"no config file {path} (KOBOLDFS_CONFIG)", EXIT_USAGE) from None
    except (OSError, configparser.Error) as e:
        raise CommandError(f"cannot read config file {path}: {e}", EXIT_USAGE) from None
    values: dict[str, str] = {}
    if parser.sections() or parser.defaults():
        if not parser.has_section("koboldfs") or len(parser.sections()) > 1:
            raise CommandError(f"{path}: settings go in one [koboldfs] section", EXIT_USAGE)
        values = dict(parser.items("koboldfs"))
        unknown = set(values) - set(CONFIG_SETTINGS)
        if unknown:
            raise CommandError(
                f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                f"{', '.join(CONFIG_SETTINGS)}",
                EXIT_USAGE,
            )
        directory = os.path.dirname(os.path.abspath(path))
        for name in _PATHS:
            if values.get(name):
                values[name] = os.path.join(directory, os.path.expanduser(values[name]))
    args._config = values
    return values


def _setting(args: argparse.Namespace, name: str, env: str) -> str | None:
    """
    A setting from its option, else its environment variable, else the
    client config file.
    """
    given = getattr(args, name, None)
    if given:
        return given if isinstance(given, str) else ",".join(given)
    return os.environ.get(env) or _config(args).get(name) or None


def _servers(args: argparse.Namespace) -> list[str]:
    given = _setting(args, "servers", "KOBOLDFS_SERVERS") or ""
    servers = given.replace(",", " ").split()
    return servers or [DEFAULT_SERVERS]


def _namespace(args: argparse.Namespace) -> str:
    name = _setting(args, "namespace", "KOBOLDFS_NAMESPACE") or DEFAULT_NAMESPACE
    try:
        return check_namespace(name)
    except InvalidName as e:
        raise CommandError(
            f"{e} (--namespace, KOBOLDFS_NAMESPACE or namespace in {config_path()})", EXIT_USAGE
        ) from None


def _client_key(args: argparse.Namespace) -> str | None:
    """
    The namespace key to prove, if any: C{--key} or C{--key-file}, else
    C{KOBOLDFS_KEY} or C{KOBOLDFS_KEY_FILE}, else C{key} or C{key_file} in
    the config file.
    """
    from koboldfs.auth import parse_key

    config = _config(args)
    for what, value, is_file in (
        ("--key", getattr(args, "client_key", None), False),
        ("--key-file", getattr(args, "key_file", None), True),
        ("KOBOLDFS_KEY", os.environ.get("KOBOLDFS_KEY"), False),
        ("KOBOLDFS_KEY_FILE", os.environ.get("KOBOLDFS_KEY_FILE"), True),
        (f"key in {config_path()}", config.get("key"), False),
        (f"key_file in {config_path()}", config.get("key_file"), True),
    ):
        if not value:
            continue
        key = value.strip()
        if is_file:
            what = f"{what} {value}"
            key = _read_key_file(value, what)
        try:
            parse_key(key)
        except InvalidName as e:
            raise CommandError(f"{what}: {e}", EXIT_USAGE) from None
        return key
    return None


def _read_key_file(path: str, what: str) -> str:
    """
    The key in a key file: its first line that is not blank or a comment.
    """
    try:
        with open(path) as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise CommandError(f"cannot read {what}: {e.strerror}", EXIT_USAGE) from None
    for line in lines:
        if line and not line.startswith("#"):
            return line
    raise CommandError(f"{what} holds no key", EXIT_USAGE)


def _tls(args: argparse.Namespace) -> dict[str, Any]:
    """
    The TLS options of a client: C{--ca} (or C{KOBOLDFS_CA}, or C{ca} in
    the config file) implies TLS; C{--tls} (or C{tls = yes}) alone trusts
    the system's certificates.
    """
    ca = _setting(args, "ca", "KOBOLDFS_CA")
    tls = bool(getattr(args, "tls", False))
    if not tls and ca is None:
        value = _config(args).get("tls", "no").strip().lower()
        if value not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
            raise CommandError(f"{config_path()}: tls is yes or no, not {value!r}", EXIT_USAGE)
        tls = value in ("yes", "true", "on", "1")
    if ca is not None and not os.access(ca, os.R_OK):
        raise CommandError(f"cannot read the CA file {ca} (--ca, KOBOLDFS_CA or ca)", EXIT_USAGE)
    return {"tls": tls or ca is not None, "ca": ca}


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """
    The credentials and TLS settings of the file commands' clients.
    """
    return {"key": _client_key(args), **_tls(args)}


def _timeouts(args: argparse.Namespace) -> dict[str, float]:
    """
    The client's deadlines the options set (docs/clients.md).
    """
    options = {}
    for name in ("connect_timeout", "reply_timeout"):
        value = getattr(args, name, None)
        if value is not None:
            if value <= 0:
                raise CommandError(f"--{name.replace('_', '-')} must be positive", EXIT_USAGE)
            options[name] = value
    return options


def _key(key: str) -> str:
    try:
        return check_key(key)
    except InvalidName as e:
        raise CommandError(str(e), EXIT_USAGE) from None


class _Session:
    """
    A blocking client of the namespace and servers the settings name, with
    their key and TLS, that checks first that some server answers, so that
    an unreachable cluster or refused credentials are reported at once,
    and as such.
    """

    def __init__(self, args: argparse.Namespace, **options: Any) -> None:
        from koboldfs import Client

        self.servers = _servers(args)
        self.namespace = _namespace(args)
        settings = _client_options(args)
        self.tls = settings["tls"]
        try:
            self.client = Client(
                self.namespace, self.servers, **settings, **_timeouts(args), **options
            )
        except ValueError as e:
            raise CommandError(f"{e} (--servers or KOBOLDFS_SERVERS)", EXIT_USAGE) from None

    def __enter__(self) -> Any:
        from koboldfs.protocol import Op

        try:
            self.client.request(Op.PING, {}, retries=0)
        except KoboldError as e:
            self.client.close()
            raise CommandError(self.explain(e), EXIT_UNAVAILABLE) from None
        return self.client

    def __exit__(self, kind: type | None, error: BaseException | None, tb: Any) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        if isinstance(error, KoboldError) and not isinstance(error, InvalidName):
            raise CommandError(self.explain(error), EXIT_UNAVAILABLE) from error

    def explain(self, error: KoboldError) -> str:
        """
        What to tell the user of an error from the cluster.
        """
        return _explain(error, self.namespace, ", ".join(self.servers), self.tls)

    def missing(self, key: str) -> CommandError:
        return CommandError(f"no key {key!r} in namespace {self.namespace!r}", EXIT_NOT_FOUND)


def _explain(error: KoboldError, namespace: str, servers: str, tls: bool) -> str:
    """
    What to tell the user of an error from the cluster at C{servers}.
    """
    from koboldfs.errors import AuthRequired, Forbidden

    message = str(error)
    where = f"--key, --key-file, KOBOLDFS_KEY or key_file in {config_path()}"
    if isinstance(error, AuthRequired):
        return (
            f"the servers at {servers} require a key of namespace {namespace!r}: give {where} "
            f"(`koboldfs admin key create {namespace}` makes one)"
        )
    if isinstance(error, Forbidden) and "read-only" not in message:
        return (
            f"the servers at {servers} refused the key ({message}): it is wrong, revoked, or not "
            "a key of "
            f"namespace {namespace!r}; check {where} and `koboldfs admin key list {namespace}`"
        )
    if isinstance(error, ConnectionFailed) and "cannot be re-read" in message:
        return (
            f"{message}: standard input cannot be sent twice; put from a file "
            "(or redirect one with <) to let the client retry on another server"
        )
    if isinstance(error, ConnectionFailed) and "cannot be rewound" in message:
        return (
            f"{message}: standard output cannot be taken back; get to a file "
            "to let the client retry on another server"
        )
    if "ping failed on every server" in message:
        hint = SERVERS_HINT
        if tls and any(w in message for w in ("certificate", "SSL", "Verification", "Mismatch")):
            hint = _tls_hint(message)
        elif not tls and ("before its WELCOME" in message or "lost" in message):
            hint = "if the servers listen with TLS (ssl:), give --tls and --ca; else " + hint
        return f"no server answered at {servers} ({message}): {hint}"
    return f"{message} (the servers' twistd.log may say more)"


def _tls_hint(message: str) -> str:
    if "Mismatch" in message or "VerificationError" in message:
        return (
            "a server's certificate does not name the host given in --servers: give the "
            "name or IP address its certificate was made for"
        )
    if "certificate verify failed" in message or "unable to get" in message:
        return "a server's certificate is not signed by a CA you trust: give --ca CA.pem"
    if "wrong version number" in message or "packet length" in message:
        return "the servers do not speak TLS there: drop --tls and --ca"
    return "TLS failed: check --ca, and that the servers listen with ssl:"


def _progress(args: argparse.Namespace, total: int | None, what: str) -> Any:
    """
    A tqdm progress bar on stderr, or None when stderr is not a terminal
    or C{--quiet} was given.
    """
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=what if len(what) <= 30 else what[:27] + "...",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class _Counted:
    """
    A binary file whose reads or writes move a progress bar.  The client
    calls these from its thread pool; tqdm's updates are thread-safe.  A
    retry seeks back to the start, and the bar with it.
    """

    def __init__(self, f: Any, bar: Any) -> None:
        self._f = f
        self._bar = bar

    def read(self, n: int = -1) -> bytes:
        chunk: bytes = self._f.read(n)
        self._bar.update(len(chunk))
        return chunk

    def write(self, chunk: bytes) -> int:
        written: int = self._f.write(chunk)
        self._bar.update(len(chunk))
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        position: int = self._f.seek(offset, whence)
        self._bar.reset(total=self._bar.total)
        return position

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _counted(f: Any, bar: Any) -> Any:
    return f if bar is None else _Counted(f, bar)


def cmd_put(args: argparse.Namespace) -> int:
    key = _key(args.key)
    if args.file == "-":
        source = sys.stdin.buffer
        if source.isatty():
            raise CommandError(
                "standard input is a terminal: give a FILE, or pipe the bytes in "
                f"(... | koboldfs put {args.key} -)",
                EXIT_USAGE,
            )
        own = False
    else:
        try:
            source = open(args.file, "rb")
        except OSError as e:
            raise CommandError(f"cannot read {args.file}: {e.strerror}", EXIT_USAGE) from None
        own = True
    try:
        try:
            size: int | None = os.fstat(source.fileno()).st_size if source.seekable() else None
        except OSError:
            size = None
        session = _Session(args)
        with session as client:
            bar = _progress(args, size, key)
            try:
                client.put(key, _counted(source, bar))
            finally:
                if bar is not None:
                    bar.close()
    finally:
        if own:
            source.close()
    return EXIT_OK


def cmd_get(args: argparse.Namespace) -> int:
    key = _key(args.key)
    session = _Session(args)
    with session as client:
        if args.file == "-":
            _get(args, session, client, key, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return EXIT_OK
        path = args.file
        if os.path.isdir(path):
            path = os.path.join(path, key.rstrip("/").rpartition("/")[2] or key)
        if os.path.exists(path) and not os.path.isfile(path):
            # A device or a fifo: written in place, not replaced.
            try:
                with open(path, "wb") as out:
                    _get(args, session, client, key, out)
            except OSError as e:
                raise CommandError(f"cannot write {path}: {e.strerror}", EXIT_USAGE) from None
            return EXIT_OK
        _get_to_file(args, session, client, key, path)
    return EXIT_OK


def _get_to_file(
    args: argparse.Namespace, session: _Session, client: Any, key: str, path: str
) -> None:
    """
    Download into a temporary file beside C{path}, renamed into place once
    complete and verified: C{path} never holds a partial file, and is left
    alone when the key is missing.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, partial = tempfile.mkstemp(dir=directory, prefix=".koboldfs-", suffix=".part")
    except OSError as e:
        raise CommandError(f"cannot write in {directory}: {e.strerror}", EXIT_USAGE) from None
    try:
        with os.fdopen(fd, "wb") as out:
            _get(args, session, client, key, out)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(partial, 0o666 & ~umask)
        os.replace(partial, path)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}", EXIT_USAGE) from None
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _get(args: argparse.Namespace, session: _Session, client: Any, key: str, out: Any) -> None:
    bar = None
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        # The size, for the bar; one more request, on a terminal only.
        stat = client.stat(key)
        if stat is None:
            raise session.missing(key)
        bar = _progress(args, stat.size, key)
    try:
        if not client.get(key, _counted(out, bar)):
            raise session.missing(key)
    finally:
        if bar is not None:
            bar.close()


def cmd_cat(args: argparse.Namespace) -> int:
    args.file = "-"
    return cmd_get(args)


def cmd_rm(args: argparse.Namespace) -> int:
    keys = [_key(key) for key in args.keys]
    missing = 0
    session = _Session(args)
    with session as client:
        for key in keys:
            if not client.delete(key) and not args.force:
                _say(session.missing(key).message)
                missing += 1
    return EXIT_NOT_FOUND if missing else EXIT_OK


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _keys(client: Any, prefix: str, size: int = PAGE) -> Iterator[list[str]]:
    """
    Every key starting with C{prefix}, C{size} at a time, until a page comes
    back empty (a short page does not mean the end: a server may cap pages
    below what was asked).
    """
    after = None
    while True:
        page = client.list(prefix, after, size)
        if not page:
            return
        yield page
        after = page[-1]


def cmd_ls(args: argparse.Namespace) -> int:
    if args.page_size < 1:
        raise CommandError("--page-size is a number of keys, 1 or more", EXIT_USAGE)
    out = sys.stdout
    session = _Session(args)
    with session as client, ThreadPoolExecutor(STAT_CONCURRENCY) as pool:
        for page in _keys(client, args.prefix, args.page_size):
            if not args.long:
                out.write("".join(f"{key}\n" for key in page))
            else:
                # A key deleted since the LIST has no stat: it is skipped.
                for stat in pool.map(client.stat, page):
                    if stat is not None:
                        out.write(
                            f"{stat.size:>12} {len(stat.servers):>2} {_utc(stat.created)} "
                            f"{stat.sha256} {stat.key}\n"
                        )
            out.flush()
    return EXIT_OK


def cmd_stat(args: argparse.Namespace) -> int:
    key = _key(args.key)
    session = _Session(args)
    with session as client:
        stat = client.stat(key)
    if stat is None:
        raise session.missing(key)
    print(f"key:       {stat.key}")
    print(f"namespace: {session.namespace}")
    print(f"size:      {stat.size}")
    print(f"sha256:    {stat.sha256}")
    if stat.content_type is not None:
        print(f"type:      {stat.content_type}")
    print(f"created:   {_utc(stat.created)}")
    print(f"copies:    {len(stat.servers)} ({', '.join(stat.servers) or 'none'})")
    return EXIT_OK


def cmd_url(args: argparse.Namespace) -> int:
    key = _key(args.key)
    if args.expires is not None and args.expires <= 0:
        raise CommandError("--expires is a number of seconds above 0", EXIT_USAGE)
    session = _Session(args)
    with session as client:
        url = client.get_url(key, args.expires)
    if url is None:
        raise session.missing(key)
    print(url)
    return EXIT_OK


def cmd_ping(args: argparse.Namespace) -> int:
    from koboldfs import Client

    servers = _servers(args)
    namespace = _namespace(args)
    options = _client_options(args)
    answered = 0
    for address in servers:
        try:
            client = Client(namespace, [address], retries=0, **options, **_timeouts(args))
        except ValueError as e:
            raise CommandError(f"{e} (--servers or KOBOLDFS_SERVERS)", EXIT_USAGE) from None
        from koboldfs.protocol import Op

        try:
            start = time.monotonic()
            client.request(Op.PING, {}, retries=0)
            took = (time.monotonic() - start) * 1000
            answered += 1
            print(f"{address}: answered in {took:.1f} ms")
        except KoboldError as e:
            print(f"{address}: no answer: {_explain(e, namespace, address, options['tls'])}")
        finally:
            client.close()
    if not answered:
        raise CommandError(f"no server answered: {SERVERS_HINT}", EXIT_UNAVAILABLE)
    return EXIT_OK


# -- admin: the metadata database


def _db(args: argparse.Namespace) -> str:
    return _setting(args, "db", "KOBOLDFS_DB") or DEFAULT_DB


def _peer_options(args: argparse.Namespace, needed: bool = False) -> dict[str, Any]:
    """
    How an admin command talks to servers: as a peer, proving the cluster
    secret of C{--secret-file} (or C{KOBOLDFS_SECRET_FILE}, or
    C{secret_file} in the config file) if one is given, with the TLS
    settings of the file commands.
    """
    import socket

    from koboldfs.auth import Credentials, read_secret_file

    path = _setting(args, "secret_file", "KOBOLDFS_SECRET_FILE")
    credentials = None
    if path is not None:
        try:
            secret = read_secret_file(path)[0]
        except ValueError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        credentials = Credentials(cluster_secret=secret, name=f"admin@{socket.gethostname()}")
    elif needed:
        raise CommandError(
            "give the servers' cluster secret: --secret-file, KOBOLDFS_SECRET_FILE or "
            f"secret_file in {config_path()}",
            EXIT_USAGE,
        )
    return {"credentials": credentials, **_tls(args)}


def _run_admin(args: argparse.Namespace) -> int:
    """
    Run an admin command's coroutine under C{task.react}, with the store
    started around it; return its exit status.
    """
    from twisted.internet import defer, task

    status: list[int] = []

    async def run(reactor: Any) -> None:
        status.append(await _admin(reactor, args))

    try:
        task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    except SystemExit:
        pass
    return status[0] if status else EXIT_UNAVAILABLE


async def admin(reactor: Any, argv: Sequence[str]) -> int:
    """
    Run C{koboldfs admin ARGV...} on a running C{reactor} (a Twisted
    application's, or a test's); return its exit status.
    """
    parser = make_parser()
    try:
        args = parser.parse_args(["admin", *argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "admin_func", None) is None:
        return int(args.func(args))
    return await _admin(reactor, args)


async def _admin(reactor: Any, args: argparse.Namespace) -> int:
    try:
        if args.admin_func in (admin_status, admin_servers) and _through_servers(args):
            view = await _ask_servers(reactor, args, held=args.admin_func is admin_servers)
            result: int = await args.admin_func(view, args, reactor)
            return result
        return await _with_store(reactor, args)
    except CommandError as e:
        _say(e.message)
        return e.code
    except Exception as e:  # reported here: react would only log it
        _say(f"{type(e).__name__}: {e}")
        return EXIT_UNAVAILABLE


async def _with_store(reactor: Any, args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from koboldfs.metadata import store_from_url

    url = _db(args)
    if url.startswith("sqlite"):
        # An admin command must not make an empty database where the
        # servers' is not.
        try:
            database = make_url(url).database
        except ArgumentError as e:
            raise CommandError(f"bad --db {url!r}: {e}", EXIT_USAGE) from None
        if database and not database.startswith("file:") and not os.path.exists(database):
            raise CommandError(
                f"no metadata database at {os.path.abspath(database)}: run this in the "
                f"directory the server was started in, or {DB_HINT}",
                EXIT_UNAVAILABLE,
            )
    try:
        store = store_from_url(url, reactor)
    except Exception as e:
        raise CommandError(f"bad --db {url!r}: {e}", EXIT_USAGE) from None
    try:
        await store.start()
    except Exception as e:
        try:
            await store.stop()
        except Exception:
            pass
        raise CommandError(
            f"cannot use the metadata database {store.url}: {e}; {DB_HINT}", EXIT_UNAVAILABLE
        ) from None
    try:
        result: int = await args.admin_func(store, args, reactor)
        return result
    except KoboldError as e:
        raise CommandError(f"{store.url}: {e}", EXIT_UNAVAILABLE) from None
    except ValueError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    finally:
        await store.stop()


def _through_servers(args: argparse.Namespace) -> bool:
    """
    Whether C{admin status} and C{servers} ask a server rather than the
    database: when no database is named (C{--db}, C{KOBOLDFS_DB}, C{db} in
    the config file) and a cluster secret or servers are.
    """
    return _setting(args, "db", "KOBOLDFS_DB") is None and (
        _setting(args, "secret_file", "KOBOLDFS_SECRET_FILE") is not None
        or _setting(args, "servers", "KOBOLDFS_SERVERS") is not None
    )


class _ServerView:
    """
    What C{admin status} and C{admin servers} read of the metadata, as a
    server answered CLUSTER_STATUS: the same methods as the store's.
    Heartbeats are moved onto our clock, so that a workstation whose
    clock is off still sees who is down as the servers do.
    """

    def __init__(self, reply: Any, address: str, now: float) -> None:
        from koboldfs.interfaces import ServerInfo
        from koboldfs.metadata.health import Health

        skew = now - reply["now"]
        self.url = f"server {reply.get('server', address)} at {address}"
        self._servers = [
            _known(ServerInfo, {**s, "heartbeat": s["heartbeat"] + skew if s["heartbeat"] else 0.0})
            for s in reply["servers"]
        ]
        self._health = _known(Health, reply["health"])
        self._held = reply["held"] or {}

    async def servers(self) -> list[Any]:
        return self._servers

    async def health(self) -> Any:
        return self._health

    async def files_held(self) -> dict[str, int]:
        return dict(self._held)


def _known(cls: Any, fields: dict[str, Any]) -> Any:
    """
    A C{cls} dataclass of the C{fields} it has: a newer server may send more.
    """
    import dataclasses

    return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields})


async def _ask_servers(reactor: Any, args: argparse.Namespace, held: bool) -> _ServerView:
    """
    Ask the listed servers, in turn, for CLUSTER_STATUS, as a peer.
    """
    from koboldfs.connection import ConnectionCache
    from koboldfs.errors import AuthRequired, Forbidden
    from koboldfs.protocol import Op

    servers = _servers(args)
    pool = ConnectionCache(reactor, 30.0, 5.0, **_peer_options(args, needed=True))
    errors = []
    try:
        for address in servers:
            try:
                conn = await pool.acquire(address)
                try:
                    reply = await conn.request(Op.CLUSTER_STATUS, {"held": held})
                finally:
                    pool.release(address, conn)
            except (AuthRequired, Forbidden) as e:
                raise CommandError(
                    f"{address} refused the cluster secret: {e}; give the servers' own "
                    "--secret-file",
                    EXIT_UNAVAILABLE,
                ) from None
            except KoboldError as e:
                errors.append(f"{address}: {e}")
                continue
            fields = {**reply.fields, "server": conn.server}
            return _ServerView(fields, address, reactor.seconds())
    finally:
        await pool.close()
    raise CommandError(
        f"no server answered CLUSTER_STATUS ({'; '.join(errors)}): {SERVERS_HINT} "
        "(or give --db to read the metadata database directly)",
        EXIT_UNAVAILABLE,
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: str = "") -> str:
    """
    Columns padded to their widest cell; those whose names are in C{right}
    aligned right (numbers).
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            str(cell).rjust(width) if name in right.split() else str(cell).ljust(width)
            for cell, width, name in zip(row, widths, header, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _down(server: Any, now: float, down_after: float) -> bool:
    """
    Not dead, but not heard from within C{down_after}.
    """
    return server.state != ServerState.DEAD and not server.is_up(now, down_after)


async def admin_servers(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    servers = await store.servers()
    held = await store.files_held()
    now = reactor.seconds()
    rows = []
    for s in servers:
        state = s.state
        if _down(s, now, args.down_after):
            state = "down" if state == ServerState.ALIVE else f"{state}, down"
        rows.append(
            (
                s.name,
                s.host,
                s.address,
                state,
                humanize.age(now - s.heartbeat) if s.heartbeat else "never",
                humanize.size(s.disk_total - s.disk_free),
                humanize.size(s.disk_free),
                str(held.get(s.name, 0)),
            )
        )
    if not rows:
        _say(f"no server has registered in {store.url}")
        return EXIT_OK
    header = ("NAME", "HOST", "ADDRESS", "STATE", "HEARTBEAT", "USED", "FREE", "FILES")
    print(_table(header, rows, right="USED FREE FILES"))
    return EXIT_OK


async def admin_set_state(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    if not await store.set_server_state(args.name, args.state):
        raise CommandError(
            f"no server named {args.name!r}: see `koboldfs admin servers`", EXIT_NOT_FOUND
        )
    print(f"{args.name}: {args.state}")
    return EXIT_OK


async def admin_forget_copies(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    if args.name not in {s.name for s in await store.servers()}:
        raise CommandError(
            f"no server named {args.name!r}: see `koboldfs admin servers`", EXIT_NOT_FOUND
        )
    n = await store.quarantine_server(args.name)
    print(f"{args.name}: {n} copies marked quarantined; it copies them again once started")
    return EXIT_OK


async def admin_namespaces(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    rows = [
        (
            ns.name,
            "all" if ns.replicas is None else str(ns.replicas),
            str(ns.min_copies or 1),
            "private" if ns.private else "public",
            _s3_access(ns),
            _utc(ns.created),
            ns.url_template or "-",
        )
        for ns in await store.namespaces()
    ]
    if not rows:
        _say("no namespace yet: the first put to one creates it")
        return EXIT_OK
    print(_table(("NAME", "REPLICAS", "MIN", "ACCESS", "S3", "CREATED", "URL TEMPLATE"), rows))
    return EXIT_OK


def _s3_access(ns: Any) -> str:
    """
    How S3 shows namespace C{ns}: not at all (its name is no bucket name),
    to anonymous readers too, or to credentials only.
    """
    if not is_bucket_name(ns.name):
        return "-"
    return "public-read" if ns.public_read else "bucket"


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if args.replicas == "all":
        settings["replicas"] = None
    elif args.replicas is not None:
        if args.replicas < 1:
            raise CommandError("--replicas is a number of copies, 1 or more", EXIT_USAGE)
        settings["replicas"] = args.replicas
    if args.min_copies is not None:
        if args.min_copies < 1:
            raise CommandError("--min-copies is a number of copies, 1 or more", EXIT_USAGE)
        settings["min_copies"] = args.min_copies
    if args.private is not None:
        settings["private"] = args.private
    if args.url_template is not None:
        settings["url_template"] = args.url_template or None
    if args.public_read is not None:
        settings["public_read"] = args.public_read
    return settings


def _show_namespace(ns: Any) -> None:
    replicas = "all servers" if ns.replicas is None else str(ns.replicas)
    print(
        f"{ns.name}: replicas {replicas}, min copies {ns.min_copies or 1}, "
        f"{'private' if ns.private else 'public'}, "
        f"url template {ns.url_template or '(the servers --public-url)'}, "
        f"S3 {_s3_access(ns)}"
    )


async def admin_namespace_create(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    name = _admin_namespace(args.name)
    settings = _settings(args)
    if await store.namespace(name) is not None:
        raise CommandError(
            f"namespace {name!r} exists: change it with `koboldfs admin namespace set`",
            EXIT_NOT_FOUND,
        )
    ns = await store.namespace(name, create=True)
    if settings:
        ns = await store.set_namespace(name, **settings)
    _show_namespace(ns)
    return EXIT_OK


async def admin_namespace_set(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    name = _admin_namespace(args.name)
    settings = _settings(args)
    if not settings:
        raise CommandError(
            "nothing to change: give --replicas, --min-copies, --private/--public, "
            "--public-read/--no-public-read or --url-template",
            EXIT_USAGE,
        )
    if await store.namespace(name) is None:
        raise CommandError(
            f"no namespace {name!r}: create it with `koboldfs admin namespace create`",
            EXIT_NOT_FOUND,
        )
    _show_namespace(await store.set_namespace(name, **settings))
    return EXIT_OK


def _s3_grants(args: argparse.Namespace) -> list[S3Grant]:
    grants = [S3Grant(None, True)] if args.cluster else []
    for given in args.grants:
        name, _, mode = given.partition(":")
        if mode not in ("", "ro", "rw"):
            raise CommandError(f"--ns {given!r}: NS, NS:ro or NS:rw", EXIT_USAGE)
        grants.append(S3Grant(_admin_namespace(name), mode != "ro"))
    if not grants:
        raise CommandError("give --ns NS[:ro] (repeatable) or --cluster", EXIT_USAGE)
    return grants


async def admin_s3_create(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    # Imported here: it brings the cryptography package, which the file
    # commands do not need.
    from koboldfs.auth import read_secret_file

    grants = _s3_grants(args)
    # The admin commands' --secret-file: its first secret seals the
    # credential's.
    path = _setting(args, "secret_file", "KOBOLDFS_SECRET_FILE")
    if not path:
        raise CommandError(
            "give --secret-file (or KOBOLDFS_SECRET_FILE): the servers' secret file, "
            "whose first secret seals the credential's",
            EXIT_USAGE,
        )
    secret_file = read_secret_file(path)
    access_key, secret = await store.create_s3_credential(grants, secret_file[0])
    print(f"access key id:     {access_key}")
    print(f"secret access key: {secret}")
    print(f"grants:            {_grants_text(grants)}")
    _say("the secret is shown this once: keep it now")
    return EXIT_OK


def _grants_text(grants: Sequence[S3Grant]) -> str:
    return ", ".join(
        "cluster" if g.namespace is None else f"{g.namespace}{'' if g.write else ':ro'}"
        for g in grants
    )


async def admin_s3_list(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    rows = [
        (
            info.access_key,
            _utc(info.created),
            "never" if info.last_used is None else _utc(info.last_used),
            _grants_text(info.grants),
        )
        for info in await store.s3_credentials()
    ]
    if not rows:
        _say("no S3 credential yet: make one with `koboldfs admin s3 credential create`")
        return EXIT_OK
    print(_table(("ACCESS KEY ID", "CREATED", "LAST USED", "GRANTS"), rows))
    return EXIT_OK


async def admin_s3_revoke(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    if not await store.revoke_s3_credential(args.access_key):
        raise CommandError(
            f"no S3 credential {args.access_key!r}: see `koboldfs admin s3 credential list`",
            EXIT_NOT_FOUND,
        )
    print(f"revoked {args.access_key}")
    return EXIT_OK


def _admin_namespace(name: str) -> str:
    try:
        return check_namespace(name)
    except InvalidName as e:
        raise CommandError(str(e), EXIT_USAGE) from None


async def admin_key_create(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    name = _admin_namespace(args.namespace)
    created = await store.namespace(name) is None
    key = await store.create_key(name, readonly=args.readonly)
    if created:
        _say(f"namespace {name!r} did not exist: created with the default settings")
    _say(
        f"a {'read-only' if args.readonly else 'read-write'} key of namespace {name!r}; "
        "store it now, it is not shown again:"
    )
    print(key)
    return EXIT_OK


async def admin_key_list(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    if args.namespace is None:
        names = [ns.name for ns in await store.namespaces()]
    else:
        names = [_admin_namespace(args.namespace)]
        if await store.namespace(names[0]) is None:
            raise CommandError(
                f"no namespace {names[0]!r}: see `koboldfs admin namespaces`", EXIT_NOT_FOUND
            )
    rows = [
        (
            key.key_id,
            key.namespace,
            "read-only" if key.readonly else "read-write",
            _utc(key.created),
        )
        for name in names
        for key in await store.keys(name)
    ]
    if not rows:
        _say("no key yet: make one with `koboldfs admin key create NS`")
        return EXIT_OK
    print(_table(("KEY ID", "NAMESPACE", "ACCESS", "CREATED"), rows))
    return EXIT_OK


async def admin_key_revoke(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    from koboldfs.auth import parse_key

    name = _admin_namespace(args.namespace)
    key_id = args.key_id
    if key_id.startswith("kfs1."):
        try:
            key_id = parse_key(key_id)[0]
        except InvalidName as e:
            raise CommandError(str(e), EXIT_USAGE) from None
    if not await store.revoke_key(name, key_id):
        raise CommandError(
            f"no key {key_id!r} in namespace {name!r}: see `koboldfs admin key list {name}`",
            EXIT_NOT_FOUND,
        )
    print(
        f"{name}/{key_id}: revoked; new connections with it are refused, open ones end "
        "within the servers' --key-check-interval (10 s by default)"
    )
    return EXIT_OK


async def admin_status(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    """
    The cluster's health as the metadata tells it: exit 1 (degraded) when a
    server is down or none is registered, files are short of their copies,
    or copies are quarantined; they are what a monitor should page on.
    """
    servers = [s for s in await store.servers() if s.state != ServerState.DEAD]
    health = await store.health()
    now = reactor.seconds()
    down = [s for s in servers if _down(s, now, args.down_after)]
    by_state: dict[str, int] = {}
    for s in servers:
        by_state[s.state] = by_state.get(s.state, 0) + 1
    states = ", ".join(f"{n} {state}" for state, n in sorted(by_state.items()))
    print(f"servers: {len(servers)}" + (f" ({states})" if states else ""))
    for s in down:
        print(f"  DOWN: {s.name} ({s.address}): last heartbeat {humanize.age(now - s.heartbeat)}")
    print(f"files: {health.files} ({humanize.size(health.bytes)})")
    print(
        f"under-replicated: {health.under_replicated} files, "
        f"{health.missing_copies} copies to make"
        + (f"; {health.lost} files with no good copy" if health.lost else "")
    )
    print(f"quarantined copies: {health.quarantined}")
    print(f"deleted files to reclaim: {health.deleted}")
    if not args.db_only:
        from twisted.internet import defer

        up = [s for s in servers if not _down(s, now, args.down_after)]
        ca = _tls(args)["ca"]
        pages = await defer.gatherResults(
            [defer.ensureDeferred(_status_page(reactor, s, ca)) for s in up]
        )
        for s, page in zip(up, pages, strict=True):
            print(f"  {s.name}: {page}")
    problems = []
    if not servers:
        problems.append(f"no server has registered in {store.url}")
    if down:
        problems.append(f"{len(down)} of {len(servers)} servers down")
    if health.lost:
        problems.append(f"{health.lost} files have no good copy")
    if health.under_replicated:
        problems.append(f"{health.under_replicated} files short of their copies")
    if health.quarantined:
        problems.append(f"{health.quarantined} copies quarantined")
    if problems:
        print("DEGRADED: " + "; ".join(problems))
        return EXIT_NOT_FOUND
    print("OK")
    return EXIT_OK


async def _status_page(
    reactor: Any, server: Any, ca: str | None = None, timeout: float = 5.0
) -> str:
    """
    A server's own figures from its status page (C{/status.json} under its
    public URL; over HTTPS trusting C{ca}, or the system's certificates),
    in a line: its scrub's progress and its copies waiting for a retry.
    Never fails: a server whose public URL is another web server (nginx,
    a CDN) has no status page there.
    """
    import json

    from twisted.internet import defer
    from twisted.internet.protocol import Protocol
    from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone

    class Body(Protocol):
        def __init__(self, done: defer.Deferred[bytes]) -> None:
            self.done, self.chunks, self.size = done, [], 0

        def dataReceived(self, data: bytes) -> None:
            self.size += len(data)
            if self.size > 1 << 20:  # not our status page
                self.transport.stopProducing()
            self.chunks.append(data)

        def connectionLost(self, reason: Any = None) -> None:
            if reason.check(ResponseDone):
                self.done.callback(b"".join(self.chunks))
            else:
                self.done.errback(reason)

    url = server.public_url.rstrip("/") + "/status.json"
    pool = HTTPConnectionPool(reactor, persistent=False)
    options: dict[str, Any] = {}
    if ca is not None:
        from twisted.web.client import BrowserLikePolicyForHTTPS

        from koboldfs.connection import trust_root

        options["contextFactory"] = BrowserLikePolicyForHTTPS(trustRoot=trust_root(ca))
    agent = Agent(reactor, connectTimeout=timeout, pool=pool, **options)
    try:
        d = agent.request(b"GET", url.encode())
        d.addTimeout(timeout, reactor)
        response = await d
        d = defer.Deferred()
        response.deliverBody(Body(d))
        d.addTimeout(timeout, reactor)
        body = await d
        if response.code != 200:
            return f"no status page at {url} (HTTP {response.code})"
        page = json.loads(body)
        scrub, retries = page["scrub"], page["replication"]["retries"]
    except Exception as e:
        return f"no status page at {url} ({type(e).__name__}: {e})"
    finally:
        await pool.closeCachedConnections()
    if scrub["running"]:
        state = (
            f"scrub: {scrub['rounds']} rounds done, at file {scrub['cursor']}, "
            f"{scrub['files_checked']} copies ({humanize.size(scrub['bytes_checked'])}) checked, "
            f"{scrub['bad']} bad"
        )
    else:
        state = "scrub: off"
    return f"{state}; {retries} copies to retry"


async def _can_check(pool: Any, servers: list[Any]) -> None:
    """
    Connect once to each server: one that refuses fsck's credentials
    would refuse every copy, so say it once, and how to fix it.
    """
    from koboldfs.errors import AuthRequired, Forbidden

    for server in servers:
        try:
            conn = await pool.acquire(server.address)
        except (AuthRequired, Forbidden) as e:
            raise CommandError(
                f"server {server.name} ({server.address}) refused fsck: {e}; fsck connects "
                "as a peer: give the servers' cluster secret with --secret-file",
                EXIT_UNAVAILABLE,
            ) from None
        except KoboldError:
            continue  # its copies are reported unchecked
        pool.release(server.address, conn)


async def admin_fsck(store: Any, args: argparse.Namespace, reactor: Any) -> int:
    """
    Ask each server holding a copy of each live file for it (a GET of its
    own copy only): the server re-reads it against the file's size and
    SHA-256 as it sends it, and one found missing or bad is set aside and
    made again from a good copy by that server's replicator, at once.  The
    bytes are checked here too.  Files short of their copies are listed:
    the replicators make those.
    """
    from twisted.internet import defer

    from koboldfs.connection import ConnectionCache
    from koboldfs.errors import ErrorCode, NotFound

    namespace = None if args.namespace is None else _admin_namespace(args.namespace)
    if args.concurrency < 1:
        raise CommandError("--concurrency is 1 or more", EXIT_USAGE)
    servers = {s.name: s for s in await store.servers()}
    namespaces = {ns.name: ns for ns in await store.namespaces()}
    if namespace is not None and namespace not in namespaces:
        raise CommandError(f"no namespace {namespace!r}: see `koboldfs admin namespaces`", 1)
    now = reactor.seconds()
    pool = ConnectionCache(reactor, 60.0, 5.0, **_peer_options(args))
    try:
        await _can_check(pool, [s for s in servers.values() if s.is_up(now, args.down_after)])
    except BaseException:
        await pool.close()
        raise
    limit = defer.DeferredSemaphore(args.concurrency)
    problems: list[str] = []
    counts = dict.fromkeys(
        ("files", "copies", "good", "bad", "unchecked", "short", "lost", "gone"), 0
    )
    #: Per file id: copies found bad in this run, and files deleted meanwhile.
    found_bad: dict[int, int] = {}
    gone: set[int] = set()

    def problem(text: str) -> None:
        problems.append(text)
        print(f"PROBLEM: {text}", flush=True)

    async def check(info: Any, name: str) -> None:
        server = servers.get(name)
        where = f"{info.namespace}/{info.key} (file {info.id}, fid {info.fid}) on {name}"
        if server is None or not server.is_up(now, args.down_after):
            counts["unchecked"] += 1
            problem(f"{where}: not checked, the server is down")
            return
        hasher, size = hashlib.sha256(), 0

        def sink(chunk: bytes) -> None:
            nonlocal size
            hasher.update(chunk)
            size += len(chunk)

        try:
            conn = await pool.acquire(server.address)
        except KoboldError as e:
            counts["unchecked"] += 1
            problem(f"{where}: not checked, cannot connect: {e}")
            return
        error: KoboldError | None = None
        try:
            await conn.get({"ns": info.namespace, "key": info.key, "local": True}, sink)
        except KoboldError as e:
            error = e
        finally:
            pool.release(server.address, conn)
        bad = error is None and (size != info.size or hasher.hexdigest() != info.sha256)
        if (error is not None or bad) and not await still_live(info):
            counts["gone"] += 1  # deleted or overwritten meanwhile
            gone.add(info.id)
            return
        if isinstance(error, NotFound) or getattr(error, "code", None) is ErrorCode.CORRUPT:
            # The server has set its copy aside already, and makes it again.
            counts["bad"] += 1
            found_bad[info.id] = found_bad.get(info.id, 0) + 1
            problem(f"{where}: bad copy ({error}); set aside, to be copied again")
        elif error is not None:
            counts["unchecked"] += 1
            problem(f"{where}: not checked: {error}")
        elif bad:
            counts["bad"] += 1
            found_bad[info.id] = found_bad.get(info.id, 0) + 1
            problem(
                f"{where}: sent {size} bytes with SHA-256 {hasher.hexdigest()}, not the "
                "file's; marked quarantined, to be copied again"
            )
            await store.quarantine_replica(info.id, name)
        else:
            counts["good"] += 1

    async def still_live(info: Any) -> bool:
        found = await store.lookup_fid(info.fid)
        return found is not None

    try:
        after = 0
        while True:
            page = await store.live_files(namespace, after, FSCK_PAGE)
            if not page:
                break
            checks = []
            missing_before: dict[int, int] = {}
            for info in page:
                counts["files"] += 1
                ns = namespaces.get(info.namespace)
                wanted = wanted_copies(None if ns is None else ns.replicas, servers)
                missing = missing_copies(info, servers, wanted)
                if missing:
                    # Short, as the status page and the replicators count it:
                    # a file with no good copy left is short too.
                    counts["short"] += 1
                missing_before[info.id] = missing
                if not info.replicas:
                    counts["lost"] += 1
                    problem(f"{info.namespace}/{info.key} (file {info.id}): no good copy left")
                elif missing:
                    problem(
                        f"{info.namespace}/{info.key} (file {info.id}): {wanted - missing} of "
                        f"{wanted} copies ({', '.join(info.replicas)}); the replicators make "
                        "the rest"
                    )
                for name in info.replicas:
                    counts["copies"] += 1
                    run = partial(check, info, name)
                    checks.append(limit.run(lambda run=run: defer.ensureDeferred(run())))
            await defer.gatherResults(checks, consumeErrors=True)
            for info in page:
                if not info.replicas or info.id in gone:
                    continue
                if found_bad.get(info.id, 0) >= len(info.replicas):
                    # Every copy it had was found bad just now.
                    counts["lost"] += 1
                    counts["short"] += 1 if not missing_before[info.id] else 0
                    problem(f"{info.namespace}/{info.key} (file {info.id}): no good copy left")
            after = page[-1].id
    finally:
        await pool.close()
    print(
        f"{counts['files']} files, {counts['copies']} copies: {counts['good']} good, "
        f"{counts['bad']} bad, {counts['unchecked']} not checked, "
        f"{counts['gone']} deleted meanwhile; "
        f"{counts['short']} files short of copies, {counts['lost']} with no good copy"
    )
    if problems:
        print(f"DEGRADED: {len(problems)} problems")
        return EXIT_NOT_FOUND
    print("OK")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
