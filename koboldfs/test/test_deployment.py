"""
The deployment files in docs/ say what the code does: the example ini sets
every server option and parses, and the systemd unit's command line is one
that twistd and the koboldfs plugin accept.
"""

from __future__ import annotations

import configparser
import os
import shlex

from twisted.trial.unittest import TestCase

from koboldfs import tap
from koboldfs.test.cluster import CHECKOUT

DOCS = os.path.join(CHECKOUT, "docs")
INI = os.path.join(DOCS, "koboldfs.ini")
UNIT = os.path.join(DOCS, "koboldfs.service")


def documented_keys(path: str) -> set[str]:
    """
    The keys an ini file sets or shows, commented out, with their default.
    """
    keys = set()
    with open(path) as f:
        for line in f:
            line = line.strip().lstrip("#;").strip()
            name, sep, _ = line.partition(" = ")
            if sep and name.replace("_", "").isalnum():
                keys.add(name)
    return keys


class ExampleIniTests(TestCase):
    def test_every_option(self) -> None:
        """
        Every server option is in the example, and nothing else is.
        """
        options = {name.replace("-", "_") for name, *_ in tap.Options.optParameters}
        options.discard("config")  # the file itself: command line only
        documented = documented_keys(INI)
        self.assertEqual(
            options - documented, set(), "server options missing from docs/koboldfs.ini"
        )
        self.assertEqual(documented - options, set(), "not server options")

    def test_parses(self) -> None:
        """
        The server reads the example as it is, and every commented value
        too (they are the defaults, or examples of the right kind).
        """
        options = tap.Options()
        options.parseOptions(["--config", INI])
        config = options.server_config
        self.assertEqual(
            (config.name, config.host, config.data), ("store1", "host1", "/srv/koboldfs")
        )
        self.assertEqual(config.listen, "tcp:9876:interface=0.0.0.0")
        self.assertTrue(config.db.startswith("postgresql://"))
        # The files the example names, made here so that they can be read.
        files = {
            "/etc/koboldfs/cluster-secret": b"s" * 32 + b"\n",
            "/etc/koboldfs/ca.pem": b"",
            "/etc/koboldfs/s3-credentials": b"AKIDEXAMPLE secret-of-the-example *:rw\n",
        }
        made = {}
        for path, content in files.items():
            made[path] = self.mktemp()
            with open(made[path], "wb") as f:
                f.write(content)
        uncommented = self.mktemp()
        with open(INI) as f, open(uncommented, "w") as out:
            for line in f:
                if (
                    line.startswith("# ")
                    and " = " in line
                    and line[2:].split(" = ")[0].isidentifier()
                ):
                    line = line[2:]
                for path in files:
                    line = line.replace(path, made[path])
                out.write(line)
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(uncommented)
        self.assertEqual(len(parser.items("koboldfs")), len(documented_keys(INI)))
        options = tap.Options()
        options.parseOptions(["--config", uncommented])
        self.assertEqual(options.server_config.max_file_size, 10737418240)
        self.assertEqual(options.server_config.scrub_rate, 10485760)
        self.assertEqual(options.server_config.reserve, "2%")
        self.assertEqual(options.server_config.cluster_secrets, (b"s" * 32,))


class SystemdUnitTests(TestCase):
    def test_command_line(self) -> None:
        """
        The unit's ExecStart is accepted by twistd and the plugin, with the
        example ini in place of /etc's, and so is its JSON logging variant.
        """
        from twisted.scripts._twistd_unix import ServerOptions

        with open(UNIT) as f:
            lines = [line.strip() for line in f]
        (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
        argv = shlex.split(exec_start.partition("=")[2])
        self.assertTrue(argv[0].endswith("/twistd"))
        argv = [INI if arg == "/etc/koboldfs/koboldfs.ini" else arg for arg in argv[1:]]
        options = ServerOptions()
        options.parseOptions(argv)
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options.subCommand, "koboldfs")
        self.assertEqual(options.subOptions.server_config.name, "store1")
        json_argv = [
            "--logger=koboldfs.logs.json_observer" if arg == "--logfile=-" else arg for arg in argv
        ]
        options = ServerOptions()
        options.parseOptions(json_argv)
        from koboldfs.logs import json_observer

        self.assertIs(options["logger"], json_observer)
        self.assertIn("SuccessExitStatus=143", lines)
