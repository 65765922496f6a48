"""
The client side for Twisted applications, by its public names.

Each class lives in the module of its layer, and each layer imports only
those below it:

  - L{koboldfs.connection}: connections, addresses, TLS trust;
  - L{koboldfs.deferredclient}: L{DeferredClient} (server choice, failover,
    retries, checksums, and the request layer the others use) and L{Stat};
  - L{koboldfs.pool}: L{ClientPool}, its connections bounded per server;
  - L{koboldfs.blocking}: the blocking twins, C{Client} and C{ClientPool};
  - L{koboldfs.txnclient}: L{DeferredTransaction} and the blocking
    L{TransactionalClientPool} that joins the C{transaction} package.

This module only names them, where docs/clients.md and applications find
them: it is the top of the client side, which none of those layers imports.
"""

from koboldfs.deferredclient import DeferredClient, Stat
from koboldfs.pool import ClientPool
from koboldfs.txnclient import DeferredTransaction, TransactionalClientPool

__all__ = [
    "ClientPool",
    "DeferredClient",
    "DeferredTransaction",
    "Stat",
    "TransactionalClientPool",
]
