"""
The server's layout as docs/architecture.md draws it, checked on the
source: the parts depend on the core's interface, never on the core or on
what composes it, and the server's modules import each other in no
circle.  Imports are read from the code (any import, at any level,
including those under C{TYPE_CHECKING}), not run.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import koboldfs

ROOT = os.path.dirname(koboldfs.__file__)

#: The server's modules, and those everything shares.
SERVER = {
    "binaryserver",
    "config",
    "events",
    "forwarding",
    "metrics",
    "node",
    "orphans",
    "periodic",
    "placement",
    "replicator",
    "service",
    "status",
    "tap",
    "txnhandler",
    "web",
    "storage",
    "auth",
    "protocol",
    "errors",
    "interfaces",
    "names",
    "urls",
    "humanize",
    "connection",
}

#: The parts the core composes, and the front ends: what they must not
#: import.
FORBIDDEN = {
    "forwarding": {"node", "service", "binaryserver", "web"},
    "replicator": {"node", "service", "binaryserver", "web"},
    "orphans": {"node", "service", "binaryserver", "web"},
    "status": {"node", "service", "binaryserver", "web"},
    "txnhandler": {"node", "service", "binaryserver", "web"},
    "placement": SERVER - {"interfaces"},
    "node": {"service", "binaryserver", "web"},
    "binaryserver": {"service", "web"},
    "web": {"service", "binaryserver", "node"},
    "config": {"service", "node"},
    "periodic": {"service", "node"},
}


def imports(module: str) -> set[str]:
    """
    The koboldfs modules (top-level names: C{metadata} for its package)
    that C{module} imports anywhere in its source.
    """
    with open(os.path.join(ROOT, module + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "koboldfs":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "koboldfs" and len(parts) > 1:
                    found.add(parts[1])
    found.discard(module)
    return found


class LayoutTests(SynchronousTestCase):
    def test_parts_depend_on_the_interface(self) -> None:
        """
        No part imports the core or its composer, and only the twistd entry
        imports the service (inside C{makeService}).
        """
        for module, forbidden in FORBIDDEN.items():
            self.assertEqual(imports(module) & forbidden, set(), module)
        for module in SERVER - {"tap", "service"}:
            self.assertNotIn("service", imports(module), module)

    def test_no_cycle(self) -> None:
        """
        The server's modules import each other in no circle.
        """
        graph = {m: imports(m) & SERVER for m in SERVER}
        done: set[str] = set()

        def visit(module: str, path: list[str]) -> None:
            if module in path:
                self.fail(" -> ".join(path[path.index(module) :] + [module]))
            if module in done:
                return
            for dep in sorted(graph[module]):
                visit(dep, path + [module])
            done.add(module)

        for module in sorted(graph):
            visit(module, [])
