"""The package version (one place: mii.__version__ and the servers' /version read it)."""

__version__ = "0.1.0"
