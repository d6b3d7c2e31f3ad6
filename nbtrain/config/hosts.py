"""The hosts of a multi-node run: read them, check them, and check that ssh reaches them.

Hosts come from DeepSpeed's hostfile (`--hostfile`, lines `node-a slots=8`) or from the
`--hosts node-a,node-b` shorthand (slots unknown, so no cap). Every check returns
`Problem`s, like `nbtrain.config.validate`, so that the validator reports them all at once;
`resolve_hosts` raises them as one `ConfigError`.

>>> hosts, problems = parse_hostfile_lines(["# two nodes", "node-a slots=2", "node-b slots=2"], "hosts.txt")
>>> [(h.name, h.slots) for h in hosts], problems
([('node-a', 2), ('node-b', 2)], [])

`check_reachable` logs in to every host with ssh, as DeepSpeed's pdsh runner will, and
checks there that the kernel's Python executable exists at the same path and imports
nbtrain; the same probe counts the host's GPUs, so that a host with fewer GPUs than
`--nproc` is named before anything starts. Extra ssh options (e.g. `-F ssh_config`, `-p 2222`) come from the environment
variable NBTRAIN_SSH_ARGS, split like a shell command line.

Standard library only: this module is imported by the pure validator.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nbtrain.config.machine import gpus, too_few_gpus
from nbtrain.errors import ConfigError, Problem

# Launchers nbtrain can start today, and what each needs on the head.
LAUNCHERS = {"pdsh": "pdsh", "standard": "ssh"}

# DeepSpeed's own rule (deepspeed/launcher/runner.py, _parse_hostfile), applied with
# re.search to the stripped line: anything after `slots=N` is ignored, so OpenMPI's
# `max_slots=N` may follow (the openmpi runner hands the same file to mpirun).
_DEEPSPEED_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")
# Stricter than DeepSpeed on purpose: pdsh splits `-w a,b` on commas and expands `node[1-3]`,
# ssh reads a leading '-' as an option, and the names land in shell command lines.
_SAFE_HOST = re.compile(r"^(?:[A-Za-z0-9_.-]+@)?[A-Za-z0-9_][A-Za-z0-9_.:%-]*$")
SSH_ARGS_VARIABLE = "NBTRAIN_SSH_ARGS"
_PROBE_MARK = "@@nbtrain-probe"


@dataclass(frozen=True)
class Host:
    """One machine of a run: its ssh name and how many processes it may run."""

    name: str
    slots: int | None  # None: given by --hosts, so no cap
    line: int | None = None  # the hostfile line it came from


def parse_hostfile_lines(lines: Iterable[str], source: str) -> tuple[list[Host], list[Problem]]:
    """Read hostfile lines as DeepSpeed does; return the hosts in order and every bad line."""
    hosts: dict[str, Host] = {}
    problems: list[Problem] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"--hostfile {source}:{number}"
        match = _DEEPSPEED_LINE.search(text)
        if match is None:
            first = text.split()[0]
            problems.append(Problem(where, text, "not a `host slots=N` line (DeepSpeed's hostfile format)",
                                    f"write it as `{first} slots=N` (N processes may run there), "
                                    "or start it with # to make it a comment"))
            continue
        name, slots = match.group(1), int(match.group(2))
        if not _SAFE_HOST.match(name):
            problems.append(_unsafe_name(where, text, name))
        elif name in hosts:
            problems.append(Problem(where, text, f"{name} is already listed on line {hosts[name].line} "
                                    "(DeepSpeed refuses a host listed twice)",
                                    f"keep one line for {name} and give it the total slots"))
        else:
            hosts[name] = Host(name, slots, number)
    if not hosts and not problems:
        problems.append(Problem(f"--hostfile {source}", "", "lists no host (only blank lines and comments)",
                                "add one `host slots=N` line per machine"))
    return list(hosts.values()), problems


def read_hostfile(path: str | os.PathLike[str]) -> tuple[list[Host], list[Problem]]:
    """Read a hostfile; a missing or unreadable file is a problem (DeepSpeed would run locally)."""
    where = "--hostfile"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [Problem(where, str(path), "no such file (DeepSpeed would quietly train on this machine alone)",
                            "give the path of a file with one `host slots=N` line per machine")]
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem(where, str(path), f"cannot be read: {e}", "give a readable UTF-8 text file")]
    return parse_hostfile_lines(text.splitlines(), str(path))


def parse_host_list(names: str | Sequence[str]) -> tuple[list[Host], list[Problem]]:
    """Read `--hosts a,b` (a string or the parsed tuple); slots are unknown."""
    parts = names.split(",") if isinstance(names, str) else list(names)
    parts = [p.strip() for p in parts if p.strip()]
    problems: list[Problem] = []
    hosts: dict[str, Host] = {}
    for name in parts:
        if not _SAFE_HOST.match(name):
            problems.append(_unsafe_name("--hosts", name, name))
        elif name in hosts:
            problems.append(Problem("--hosts", name, f"{name} is listed twice",
                                    "list each host once; --nproc sets the processes on each"))
        else:
            hosts[name] = Host(name, None)
    if not parts:
        problems.append(Problem("--hosts", names if isinstance(names, str) else ",".join(names),
                                "names no host", "give host names separated by commas: --hosts node-a,node-b"))
    return list(hosts.values()), problems


def _unsafe_name(where: str, text: str, name: str) -> Problem:
    return Problem(where, text, f"host name {name!r} would be misread by ssh or pdsh (allowed: letters, digits, "
                   "'.', '_', '-', ':', an optional user@; no leading '-', commas, brackets or spaces)",
                   "use the machine's plain host name or address, or an alias from ~/.ssh/config")


def check_host_flags(hostfile: str | None, hosts: Sequence[str] | str | None,
                     launcher: str | None = None, slurm: bool = False) -> list[Problem]:
    """Refuse --hostfile with --hosts, --multinode-launcher without either, and hosts with --slurm."""
    if hostfile is not None and hosts is not None:
        return [Problem("--hosts", hosts if isinstance(hosts, str) else ",".join(hosts),
                        "--hostfile and --hosts both name the hosts", "give --hostfile FILE or --hosts a,b, not both")]
    if slurm or launcher == "slurm":
        return _check_slurm_launcher(hostfile, hosts, launcher)
    if launcher is not None and hostfile is None and hosts is None:
        return [Problem("--multinode-launcher", launcher, "has nothing to launch on without hosts",
                        "add --hostfile FILE or --hosts a,b, or drop --multinode-launcher")]
    return []


def _check_slurm_launcher(hostfile: str | None, hosts: Sequence[str] | str | None,
                          launcher: str | None) -> list[Problem]:
    """--slurm (or its long form) takes its nodes from SLURM: no hosts, no other launcher."""
    named = "--multinode-launcher slurm" if launcher == "slurm" else "--slurm"
    if launcher not in (None, "slurm"):
        return [Problem("--multinode-launcher", launcher, "--slurm launches the workers with srun, not "
                        f"{launcher}", "drop --multinode-launcher (or drop --slurm to launch over ssh)")]
    if hostfile is not None or hosts is not None:
        flag, value = ("--hostfile", hostfile) if hostfile is not None else ("--hosts", hosts)
        return [Problem(flag, value if isinstance(value, str) else ",".join(value or ()),
                        f"{named} runs on the nodes SLURM allocates, not on named hosts",
                        f"drop {flag} (ask for nodes with --nodes N), or drop {named} to launch over ssh")]
    return []


def check_slots(hosts: Sequence[Host], nproc: int) -> list[Problem]:
    """Refuse more processes per host than a host's slots (hosts from --hosts have no cap)."""
    return [Problem("--nproc", nproc, f"{h.name} has slots={h.slots} (hostfile line {h.line}), fewer than "
                    f"the {nproc} processes per host asked for",
                    f"give --nproc {h.slots} or less, or raise {h.name}'s slots in the hostfile")
            for h in hosts if h.slots is not None and nproc > h.slots]


def resolve_hosts(hostfile: str | None, hosts: Sequence[str] | str | None,
                  nproc: int | None = None, launcher: str | None = None) -> list[Host]:
    """Return the run's hosts in order, or raise ConfigError with every problem at once."""
    problems = check_host_flags(hostfile, hosts, launcher)
    found: list[Host] = []
    if not problems and hostfile is not None:
        found, problems = read_hostfile(hostfile)
    elif not problems and hosts is not None:
        found, problems = parse_host_list(hosts)
    if nproc is not None:
        problems += check_slots(found, nproc)
    if problems:
        raise ConfigError(problems)
    return found


def hostfile_text(hosts: Sequence[Host], nproc: int) -> str:
    """Write the DeepSpeed hostfile of a run: `nproc` slots on every host."""
    return "".join(f"{h.name} slots={nproc}\n" for h in hosts)


def world_info(hosts: Sequence[Host], nproc: int) -> dict[str, list[int]]:
    """Return DeepSpeed's `--world_info` dict (before base64): local slot ids per host, in order."""
    return {h.name: list(range(nproc)) for h in hosts}


# -- reachability ------------------------------------------------------------------------

def ssh_command(host: str, remote: str, connect_timeout: float,
                environ: Mapping[str, str] | None = None) -> list[str]:
    """Return the ssh command that runs `remote` on `host` without ever asking for a password."""
    extra = shlex.split((os.environ if environ is None else environ).get(SSH_ARGS_VARIABLE, ""))
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(connect_timeout))}",
            *extra, "--", host, remote]


def probe_script(python: str, workdir: str | None = None) -> str:
    """Return the shell line run on each host, which asks whether `python` exists there and imports nbtrain."""
    py = shlex.quote(python)
    steps = [f"[ -x {py} ] || {{ echo {_PROBE_MARK} no-python; exit 0; }}"]
    if workdir is not None:
        # The workers start there (and import from there first), so import from there too.
        wd = shlex.quote(workdir)
        steps.append(f"cd {wd} 2>/dev/null || {{ echo {_PROBE_MARK} no-workdir; exit 0; }}")
    # The GPU count ignores the login shell's CUDA_VISIBLE_DEVICES: DeepSpeed's launch sets it
    # on each host to the run's local slots (0..nproc-1), so the host's GPUs are what count.
    code = ('import os, sys, nbtrain; from nbtrain.config.machine import count_gpus; '
            'os.environ.pop("CUDA_VISIBLE_DEVICES", None); '
            f'print("{_PROBE_MARK} ok", "%d.%d" % sys.version_info[:2], nbtrain.__version__, count_gpus())')
    steps.append(f"{py} -c {shlex.quote(code)} 2>&1")
    # Wrapped in `sh -c` so that a login shell other than a Bourne shell runs it the same.
    return "sh -c " + shlex.quote("; ".join(steps))


@dataclass(frozen=True)
class _Answer:
    host: str
    returncode: int | None  # None: no answer before the deadline
    stdout: str
    stderr: str


def check_reachable(hosts: Sequence[Host | str], python: str = sys.executable, *, workdir: str | None = None,
                    connect_timeout: float = 5.0, deadline: float = 15.0,
                    environ: Mapping[str, str] | None = None, nproc: int | None = None) -> list[Problem]:
    """Log in to every host at once with ssh; return one problem per host that cannot run workers.

    Each host must take a key login (BatchMode: never a password prompt), have `python` at
    the same path (DeepSpeed's pdsh runner starts `sys.executable` there), import nbtrain
    with it at the same Python and nbtrain versions as here, and have `workdir` if given
    (the pdsh runner `cd`s into the launcher's directory), and, given `nproc` (processes per
    host), no fewer GPUs than that where it has GPUs at all (a host without GPUs runs CPU
    processes). The whole check ends within `deadline` seconds, however many hosts hang.
    """
    names = [h.name if isinstance(h, Host) else h for h in hosts]
    env = dict(os.environ if environ is None else environ)
    remote = probe_script(python, workdir)
    end = time.monotonic() + deadline

    def ask(host: str) -> _Answer:
        left = end - time.monotonic()
        if left <= 0:
            return _Answer(host, None, "", "")
        try:
            done = subprocess.run(ssh_command(host, remote, min(connect_timeout, left), env), env=env,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return _Answer(host, None, "", "")
        except FileNotFoundError:
            return _Answer(host, 127, "", "ssh: command not found on this machine")
        return _Answer(host, done.returncode, done.stdout, done.stderr)

    if not names:
        return []
    with ThreadPoolExecutor(max_workers=min(32, len(names))) as pool:
        answers = list(pool.map(ask, names))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [p for a in answers if (p := _judge(a, python, workdir, here, deadline, nproc)) is not None]


def _judge(answer: _Answer, python: str, workdir: str | None, here_python: str,
           deadline: float, nproc: int | None = None) -> Problem | None:
    """Turn one host's ssh answer into a problem naming the host and what failed, or None."""
    where = f"host {answer.host}"
    lines = answer.stdout.splitlines()
    marks = [line.split()[1:] for line in lines if line.startswith(_PROBE_MARK)]
    if answer.returncode is None:
        return Problem(where, f"no answer within {deadline:g} s", "the ssh login or the check there hangs",
                       f"check that `ssh -o BatchMode=yes {answer.host} true` returns quickly")
    if answer.returncode == 255 or (not marks and answer.returncode != 0 and not lines):
        said = _last_line(answer.stderr) or f"ssh exited with status {answer.returncode}"
        return Problem(where, said, "cannot be reached with ssh without a password", _ssh_fix(answer.host, said))
    mark = marks[-1] if marks else []
    if mark[:1] == ["no-python"]:
        return Problem(where, python, "this Python executable does not exist there (every host starts the "
                       "workers with the kernel's Python, at the same path)",
                       "install the same environment at the same path on every host, or keep it on a "
                       "filesystem they all share")
    if mark[:1] == ["no-workdir"]:
        return Problem(where, workdir, "this directory does not exist there (DeepSpeed's pdsh runner starts "
                       "the workers in the launcher's directory)",
                       "create it on that host, or launch from a directory every host has")
    if mark[:1] != ["ok"] or len(mark) < 3:
        said = _last_line(answer.stdout) or _last_line(answer.stderr) or f"exit status {answer.returncode}"
        return Problem(where, said, f"`import nbtrain` fails with {python} there",
                       f"install nbtrain into that environment on {answer.host} (the same version as here, "
                       f"{_version()}), or share the environment between the hosts")
    their_python, their_nbtrain = mark[1], mark[2]
    if their_python != here_python:
        return Problem(where, f"Python {their_python}", f"the kernel runs Python {here_python}; the cell's "
                       "functions are pickled by value and need the same Python on every host",
                       f"use Python {here_python} at {python} on every host")
    if their_nbtrain != _version():
        return Problem(where, f"nbtrain {their_nbtrain}", f"the kernel uses nbtrain {_version()}",
                       f"install nbtrain {_version()} on {answer.host}")
    return _judge_gpus(answer.host, mark[3:], nproc)


def _judge_gpus(host: str, counted: list[str], nproc: int | None) -> Problem | None:
    """Refuse `nproc` processes on a host whose probe counted fewer GPUs, but at least one."""
    count = int(counted[0]) if counted and counted[0].isdigit() else 0
    if nproc is None or count == 0 or nproc <= count:
        return None
    return too_few_gpus(nproc, count, f"host {host} has {gpus(count)}",
                        f"run on hosts with {gpus(nproc)} or more (--nproc is per host)")


def _ssh_fix(host: str, said: str) -> str:
    if "Permission denied" in said or "Host key verification failed" in said:
        return (f"let this machine log in by key: `ssh-copy-id {host}`, and accept its host key once with "
                f"`ssh {host} true`; then `ssh -o BatchMode=yes {host} true` must succeed")
    if "Could not resolve" in said:
        return f"check the name {host} (the hostfile's names must resolve here, or be aliases in ~/.ssh/config)"
    return (f"check that {host} is up, reachable from here and runs sshd "
            f"(`ssh -o BatchMode=yes {host} true` must succeed), or remove it from the hosts")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _version() -> str:
    from nbtrain import __version__

    return __version__


def check_launcher(launcher: str) -> list[Problem]:
    """Refuse a launcher nbtrain cannot start (yet), or whose program is missing on the head."""
    if launcher not in LAUNCHERS:
        return [Problem("--multinode-launcher", launcher,
                        "only pdsh and standard (ssh to each host) are supported by nbtrain so far",
                        "use --multinode-launcher pdsh (DeepSpeed's default) or standard")]
    program = LAUNCHERS[launcher]
    if shutil.which(program) is None:
        return [Problem("--multinode-launcher", launcher, f"needs `{program}` on this machine's PATH",
                        f"install it (Debian: apt-get install {'pdsh' if program == 'pdsh' else 'openssh-client'})")]
    return []
