"""voicegate's server: transports, the per-call loop, providers, admin and CLI."""

__version__ = "0.1.0"
