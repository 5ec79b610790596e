"""Shared by every framecap process: config, messages, topics and keys, the CLI."""
