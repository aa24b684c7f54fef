"""The store format's error type. Its own module so that every other module of ``schemas``
can raise it without importing the manifest (which imports them)."""


class StoreFormatError(ValueError):
    """The store on disk does not match the format this code reads."""


class StorageError(OSError):
    """Object storage could not be used: its endpoint cannot be reached, there are no
    credentials for it, or the server went away mid-run. The message is one line that names
    the cause and what to do; nothing already committed is affected."""
