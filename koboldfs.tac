"""
Run a KoboldFS server with C{twistd -ny koboldfs.tac}.

Options come from the environment variable KOBOLDFS_OPTIONS, written as on
the command line of C{twistd koboldfs} (for example
C{KOBOLDFS_OPTIONS="--config /etc/koboldfs.ini"}).
"""

import os
import shlex

from twisted.application.service import Application

from koboldfs.tap import Options, makeService

options = Options()
options.parseOptions(shlex.split(os.environ.get("KOBOLDFS_OPTIONS", "")))
application = Application("koboldfs")
makeService(options).setServiceParent(application)
