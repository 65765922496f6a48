"""
Tests of the server's configuration (L{koboldfs.config}) as
C{twistd koboldfs} reads it (L{koboldfs.tap}).
"""

from __future__ import annotations

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from koboldfs import tap
from koboldfs.config import DEFAULTS, ServerConfig, server_config


class DefaultsTests(SynchronousTestCase):
    def test_one_place(self) -> None:
        """
        Options left out take L{ServerConfig}'s own defaults: the defaults
        the options show are read off it, not written twice.
        """
        parsed = server_config({"name": "n", "host": "h"})
        written = ServerConfig(name="n", host="h", data=parsed.data)
        self.assertEqual(parsed, written)
        self.assertEqual(DEFAULTS["heartbeat"], "5")
        self.assertEqual(DEFAULTS["scrub_rate"], str(written.scrub_rate))
        self.assertEqual(DEFAULTS["listen"], written.listen)

    def test_every_default_is_an_option(self) -> None:
        """
        Each default belongs to an option of C{twistd koboldfs}.
        """
        options = {name.replace("-", "_") for name, *_ in tap.Options.optParameters}
        self.assertEqual(set(DEFAULTS) - options, set())

    def test_bad_value(self) -> None:
        """
        A wrong value is refused with the option's name.
        """
        with self.assertRaisesRegex(ValueError, "--heartbeat must be positive"):
            server_config({"heartbeat": "0"})

    def test_parsing_loads_no_server(self) -> None:
        """
        Parsing the options imports neither the server nor a reactor:
        C{twistd} can show C{--help} or refuse a bad option without them.
        """
        code = (
            "import sys; from koboldfs import tap; o = tap.Options();"
            " o.parseOptions(['--name', 'n']);"
            " print(sorted(m for m in sys.modules"
            " if m in ('koboldfs.service', 'koboldfs.node', 'twisted.internet.reactor')))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), "[]")
