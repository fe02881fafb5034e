"""The version of hfprune, in one place (the package, its exports and the CLI read it)."""

__version__ = "0.1.0"
