"""
This checkout's version, in a module that imports nothing: the modules under
the package's facade (the connection layer's HELLO) read it here, not from
C{koboldfs} itself, whose C{Client} imports the blocking client and so them.
"""

__version__ = "0.4.0.dev0"
