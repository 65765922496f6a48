"""
The C{twistd koboldfs} plugin.  This directory must have no C{__init__.py}:
it is installed into Twisted's own C{twisted/plugins} package.
"""

from twisted.application.service import ServiceMaker

koboldfs = ServiceMaker(
    "KoboldFS", "koboldfs.tap", "A distributed file store for write-once files.", "koboldfs"
)
