"""
Read-only HTTP: the URLs that C{get_url} hands out.

A server's published files live under C{<data>/files/}, and that tree alone
is served, at C{/files/...}: temp uploads, quarantine and the embedded
database are siblings of it, out of reach.  An external web server whose
root is the data directory serves the very same URLs (docs/http.md).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.web.resource import ForbiddenResource, Resource
from twisted.web.server import Site
from twisted.web.static import File


class PublishedFiles(File):
    """
    The published tree, with directory listings refused: a listing would
    reveal every stored file to anyone who asks.
    """

    def directoryListing(self) -> Resource:
        return ForbiddenResource("no listings")


def make_site(node: Any) -> Site:
    root = Resource()
    root.putChild(b"files", PublishedFiles(os.path.join(node.storage.root, "files")))
    return Site(root)
