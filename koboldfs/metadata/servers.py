"""
The servers of the cluster: the units that register them, record their
heartbeats, set and list their states.
"""

from __future__ import annotations

from dataclasses import fields, replace

from sqlalchemy import bindparam, insert, literal_column, select, update

from koboldfs.interfaces import ServerInfo, ServerState
from koboldfs.metadata.schema import QUEUE_SERVER_FILES, servers
from koboldfs.metadata.units import Query, Unit, reader, record, writer
from koboldfs.placement import UNCOUNTED_STATES

_SERVER_COLUMNS = tuple(servers.c[f.name] for f in fields(ServerInfo))
# The server columns that a registration sets, from parameters b_<column>.
_SERVER_VALUES = ("host", "address", "public_url", "heartbeat", "disk_free", "disk_total")

_SERVER_NAMED = servers.c.name == bindparam("b_name")
_SERVER_STATE = select(servers.c.state).where(_SERVER_NAMED)
_UPDATE_SERVER = (
    update(servers)
    .where(_SERVER_NAMED)
    .values(state=bindparam("b_state"), **{c: bindparam(f"b_{c}") for c in _SERVER_VALUES})
)
_INSERT_SERVER = insert(servers).values(
    name=bindparam("b_name"),
    state=bindparam("b_state"),
    **{c: bindparam(f"b_{c}") for c in _SERVER_VALUES},
)
_HEARTBEAT = (
    update(servers)
    .where(_SERVER_NAMED)
    .values(
        heartbeat=bindparam("b_now"),
        disk_free=bindparam("b_disk_free"),
        disk_total=bindparam("b_disk_total"),
    )
)
_SET_SERVER_STATE = update(servers).where(_SERVER_NAMED).values(state=bindparam("b_state"))
_LIST_SERVERS = select(*_SERVER_COLUMNS)
# A dead server is forgotten: its copies do not count, and its replica rows
# of deleted files do not keep them from being purged.
DEAD_SERVERS = select(servers.c.name).where(servers.c.state == literal_column("'dead'"))


def _check_state(state: str) -> None:
    if state not in set(ServerState):
        raise ValueError(f"invalid server state {state!r}: use one of {', '.join(ServerState)}")


@writer
def register_server(server: ServerInfo) -> Unit[ServerInfo]:
    """
    Insert or update C{server}'s row and return it as stored.  A stored
    state other than ``dead`` is kept: an operator's ``readonly`` or
    ``drain`` survives restarts, while a server that comes back from
    ``dead`` takes the state it registers with.  Two servers racing to
    insert the same name collide on the key; the retry updates.
    """
    _check_state(server.state)
    out = yield Query(_SERVER_STATE, {"b_name": server.name})
    if out.rows and out.rows[0][0] != ServerState.DEAD:
        state = out.rows[0][0]
    else:
        state = server.state
    params = {
        "b_name": server.name,
        "b_state": state,
        **{f"b_{column}": getattr(server, column) for column in _SERVER_VALUES},
    }
    yield Query(_UPDATE_SERVER if out.rows else _INSERT_SERVER, params)
    return replace(server, state=state)


@writer
def heartbeat(name: str, now: float, disk_free: int, disk_total: int) -> Unit[bool]:
    """
    Record server C{name}'s heartbeat; return whether it is registered.
    """
    out = yield Query(
        _HEARTBEAT,
        {"b_name": name, "b_now": now, "b_disk_free": disk_free, "b_disk_total": disk_total},
    )
    return out.rowcount > 0


@writer
def set_server_state(name: str, state: str) -> Unit[bool]:
    """
    Set server C{name}'s state; return whether it is registered.

    @raise ValueError: C{state} is not a L{ServerState}.
    """
    _check_state(state)
    out = yield Query(_SET_SERVER_STATE, {"b_name": name, "b_state": state})
    if out.rowcount > 0 and state in UNCOUNTED_STATES:
        # Its copies no longer count: the files they leave short are work.
        yield Query(QUEUE_SERVER_FILES, {"b_server": name})
    return out.rowcount > 0


@reader
def list_servers() -> Unit[list[ServerInfo]]:
    """
    Every registered server, by name.
    """
    out = yield Query(_LIST_SERVERS)
    found = [record(ServerInfo, _SERVER_COLUMNS, row) for row in out.rows]
    return sorted(found, key=lambda server: server.name)
