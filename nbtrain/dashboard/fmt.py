"""Numbers as the dashboard writes them: SI prefixes, bytes, clock times."""

from __future__ import annotations

_PREFIXES = ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """Return `value` with an SI prefix, e.g. si(1.25e12, "FLOP/s") == "1.25 TFLOP/s"."""
    if value is None:
        return "—"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale:
            return f"{value / scale:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def size(n_bytes: float | None) -> str:
    """Return a byte count in binary units, e.g. "1.5 GiB"."""
    if n_bytes is None:
        return "—"
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


def clock(seconds: float | None) -> str:
    """Return seconds as m:ss (or h:mm:ss)."""
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"
