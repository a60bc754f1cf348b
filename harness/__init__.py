"""Runs what the converter writes: a reference CPU runtime and drivers for the real runtimes."""
