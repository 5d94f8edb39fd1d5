"""heygem-watch: recordings dropped into a folder become one lip-synced video per avatar template."""

__version__ = "0.1.0"
