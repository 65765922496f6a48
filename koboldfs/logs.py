"""
Log observers for C{twistd --logger}: JSON lines, one per event, with every
structured field (the per-request events of L{koboldfs.metrics} carry
C{operation}, C{namespace}, C{key}, C{size}, C{duration} and C{result}).

    twistd -n --logger koboldfs.logs.json_observer koboldfs ...

writes to standard output (for journald, a container's log, a pipe into a
log shipper), or to the file named by C{KOBOLDFS_LOG_FILE} if set (opened
for appending).  C{twistd --logger} takes precedence over C{--logfile}.
Read the lines back with C{twisted.logger.eventsFromJSONLogFile}.
"""

from __future__ import annotations

import io
import os
import sys
from typing import Any

from twisted.logger import jsonFileLogObserver

#: The environment variable naming the file L{json_observer} appends to.
LOG_FILE_ENV = "KOBOLDFS_LOG_FILE"


def json_observer() -> Any:
    """
    A C{twisted.logger} observer writing each event as a JSON line (the
    C{--logger} factory: it takes no argument, so the target comes from the
    environment).
    """
    path = os.environ.get(LOG_FILE_ENV)
    if path:
        out: Any = io.open(path, "a", encoding="utf-8", buffering=1)
    else:
        out = sys.stdout
    return jsonFileLogObserver(out, recordSeparator="")
