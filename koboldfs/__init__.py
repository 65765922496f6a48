"""
KoboldFS: a distributed file store for write-once files.

Files are addressed by a key in a flat namespace, replicated automatically to
servers on other hosts, with their metadata in one shared SQL database.  For
scripts, C{from koboldfs import Client} gives the blocking client; Twisted
applications use L{koboldfs.client.DeferredClient}.  Importing this package
does not import Twisted: C{Client} is loaded on first use.
"""

from typing import TYPE_CHECKING, Any

from koboldfs.version import __version__

__all__ = ["Client", "__version__"]

if TYPE_CHECKING:
    from koboldfs.blocking import Client


def __getattr__(name: str) -> Any:
    if name == "Client":
        from koboldfs.blocking import Client

        globals()["Client"] = Client
        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
