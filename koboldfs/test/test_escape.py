"""
No escape from the data directory: keys and namespaces never become paths
that leave the tree, and HTTP serves published files and nothing else,
whatever the request's path or the tree's symlinks.
"""

from __future__ import annotations

import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from koboldfs.errors import InvalidKey, InvalidNamespace
from koboldfs.names import check_key, check_namespace
from koboldfs.storage import relpath_for
from koboldfs.test.test_web import BODY, _WebMixin
from koboldfs.testing import MemoryServer


class NamesTests(SynchronousTestCase):
    def test_keysAreNotPaths(self) -> None:
        """
        Whatever a key says, its file is C{files/ab/cd/<fid><ext>}: only a
        safe extension of the key reaches the disk.
        """
        fid = "ab" * 16
        for key, ext in [
            ("../../etc/passwd", ""),
            ("/etc/passwd", ""),
            ("a/../../b.txt", ".txt"),
            ("x.../..", ""),
            ("..", ""),
            ("a.TXT", ".txt"),
            ("a.t/x", ""),
            ("a.%2e%2e", ""),
            ("a.\u2024txt", ""),
            ("a." + "x" * 11, ""),
        ]:
            self.assertEqual(relpath_for(fid, key), f"files/ab/ab/{fid}{ext}", key)

    def test_namespacesAreNames(self) -> None:
        for bad in ("", "a/b", "a\\b", "../x", "x" * 65, "a\0", "é", " ", "a:b"):
            self.assertRaises(InvalidNamespace, check_namespace, bad)
        for bad in ("", "a\0b", "x" * 1025, "\udc80"):
            self.assertRaises(InvalidKey, check_key, bad)
        # "." and ".." are valid names but never directories.
        for name in (".", ".."):
            self.assertRaises(ValueError, relpath_for, "ab" * 16, "k", private=name)


class HTTPEscapeTests(_WebMixin, SynchronousTestCase):
    """
    Request paths that try to leave the published files, beyond the plain
    ones test_web covers.
    """

    def test_encodedEscapes(self) -> None:
        info = self.put("a.txt", BODY)
        fid, good = info.fid, "/" + info.path
        d = f"/files/{fid[:2]}/{fid[2:4]}"
        for target in [
            f"{d}/..%2F..%2F..%2Fmetadata.sqlite",
            f"{d}/%2e%2e/%2e%2e/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/files/{fid[:2]}%252F{fid[2:4]}%252F{fid}.txt",
            f"/files/{fid[:2]}%5C{fid[2:4]}%5C{fid}.txt",
            f"/files\\{fid[:2]}\\{fid[2:4]}\\{fid}.txt",
            f"//files/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/files//{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/./files/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/files/{fid[:2]}/{fid[2:4]}/./{fid}.txt",
            f"{d}/{fid}.txt%00.png",
            f"{d}/{fid}.txt/",
            f"{d}/{fid}.txt/..",
            f"{d}/%C0%AE%C0%AE/{fid}.txt",
            f"/private/../files/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/private/..%2Ffiles/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"/FILES/{fid[:2]}/{fid[2:4]}/{fid}.txt",
            f"{d}/{fid.upper()}.txt",
            "/tmp",
            "/quarantine",
            "/metadata.sqlite-wal",
            "/..",
            "/%2e%2e/etc/passwd",
        ]:
            self.assertEqual(self.get(target).status, 404, target)
        self.assertEqual(self.get(good).status, 200)
        self.assertEqual(self.get(good + "?x=../../metadata.sqlite").body, BODY)

    def test_directorySymlinkOut(self) -> None:
        """
        A directory of the tree replaced by a symlink to elsewhere is not
        followed, even when the file it leads to has the right bytes.
        """
        info = self.put("a.txt", BODY)
        url = self.get_url("a.txt")
        leaf = os.path.dirname(self.disk(info))
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        shutil.copy(self.disk(info), os.path.join(outside, os.path.basename(self.disk(info))))
        shutil.rmtree(leaf)
        os.symlink(outside, leaf)
        # Set aside, and it was the only copy: lost (410), not an outage.
        self.assertEqual(self.get(url).status, 410)
        info = self.server.flush(self.server.store.lookup("ns", "a.txt"))
        self.assertEqual(info.replicas, ())

    def test_rootMayBeSymlink(self) -> None:
        """
        The data directory itself may be a symlink (to another disk): only
        symlinks inside the tree are refused.
        """
        target = os.path.abspath(self.mktemp())
        shutil.copytree(self.server.storage.root, target, symlinks=True)
        link = os.path.abspath(self.mktemp())
        os.symlink(target, link)
        server = MemoryServer(link)
        server.start()
        self.addCleanup(server.stop)
        self.server.stop()
        client = server.client("ns")
        server.flush(client.put("b.txt", BODY))
        url = server.flush(server.node.get_url("ns", "b.txt"))
        self.assertEqual(server.http("GET", url.removeprefix("http://memory")).body, BODY)
        server.flush(client.close())
