"""The release number (its own module, so the library can record it without importing the API)."""

__version__ = "0.1.0"
