"""The site agent: polls EMU units, spools on disk, uplinks to the central broker."""

__version__ = "0.1.0"
