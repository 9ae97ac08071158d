"""dtf: a fault-tolerant distributed testing framework."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dtf")
except PackageNotFoundError:  # running from a checkout without an install
    __version__ = "0+unknown"
