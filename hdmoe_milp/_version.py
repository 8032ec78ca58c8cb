"""The package version (one place; recorded in every plan file)."""

__version__ = "0.8.7"
