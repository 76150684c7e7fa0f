"""tsd: a multi-user GPU task spooler compatible with task-spooler's ts."""

__version__ = "0.1.0"
