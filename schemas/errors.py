"""The store format's error type. Its own module so that every other module of ``schemas``
can raise it without importing the manifest (which imports them)."""


class StoreFormatError(ValueError):
    """The store on disk does not match the format this code reads."""
