"""The edge capture daemon: capture, sample, spool, publish. Imports no torch."""
