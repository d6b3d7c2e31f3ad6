"""Code that runs in the worker processes (never imported by the kernel side)."""
