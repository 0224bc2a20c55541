"""Subcommands of ``grounded-sam-backend``; each module adds its own with ``register(subparsers)``."""
