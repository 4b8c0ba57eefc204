"""runservice: runs long jobs on the server and lets any client follow their event logs."""

__version__ = "0.1.0"


def version() -> str:
    """The installed package's version (`runservice --version`, GetServerStats), or the
    source tree's when it is not installed."""
    import importlib.metadata  # noqa: PLC0415  (kept out of every import of the package)

    try:
        return importlib.metadata.version("runservice")
    except importlib.metadata.PackageNotFoundError:
        return __version__
