"""What nbtrain's head and the tasks of its srun step agree on (standard library only).

The head (`nbtrain.launch.slurm`) marks the step's environment with LAUNCHED_VARIABLE and
reads the tasks' reports as REPORT_MARK lines on srun's stdout; a task
(`nbtrain.worker.slurm`) expands SLURM's node list to find its master.
"""

from __future__ import annotations

import re

LAUNCHED_VARIABLE = "NBTRAIN_SLURM"  # set by nbtrain.launch.slurm on the srun it starts
REPORT_MARK = "@@nbtrain-report "  # a report line on srun's stdout, after srun's "N: " label

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(hostlist: str) -> list[str]:
    """Return the host names of a SLURM host list, in order.

    >>> expand_hostlist("node[1-2,5],gpu-a[01-03]b,login")
    ['node1', 'node2', 'node5', 'gpu-a01b', 'gpu-a02b', 'gpu-a03b', 'login']
    """
    names: list[str] = []
    for item in _split_top_level(hostlist):
        names += _expand_item(item)
    return names


def _split_top_level(hostlist: str) -> list[str]:
    """Split at the commas that are not inside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(hostlist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_item(item: str) -> list[str]:
    """Expand one name with bracketed ranges, possibly several ("r[1-2]n[01-02]")."""
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    prefix, ranges, rest = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    numbers: list[str] = []
    for part in ranges.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"not a SLURM host range: [{ranges}] in {item!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        width = len(first)  # node[01-03]: the zero padding is kept
        numbers += [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
    return [prefix + number + tail for number in numbers for tail in _expand_item(rest)]
