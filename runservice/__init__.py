"""runservice: runs long jobs on the server and lets any client follow their event logs."""

__version__ = "0.1.0"
