"""Carry a remote host's part of a run directory to the head over ssh, and watch the head's pulse.

The head (the kernel's machine) starts one relay per remote host with
`ssh HOST <python> -m nbtrain.relay RUN_DIR --ranks 2,3 --host HOST`; the ssh pipes are the
channel, in both directions. On it:

- head → remote: `hello` (the shared-filesystem token), the run's input files (`file`,
  written atomically), a `beat` every second, optionally `start` (the host's worker command),
  `sync` and `stop`;
- remote → head: `ready` (says whether the run directory is shared), the new bytes of the
  host's ranks' append-only files (`append`, by offset, partial last lines included), whole
  copies of their small replaced files (`replace`), a `beat` every second, `synced`, `bye`.

Each message is one JSON header line (`type`, `size`, fields) followed by `size` raw bytes.
The head's `Relay` writes what arrives into its own run directory, so the dashboard, the
server API and the supervisor read remote ranks exactly as local ones.

Watchdog: the remote relay ends the host's workers, then itself, when it hears nothing from
the head for `--timeout` seconds (a cut link, a dead host), when its stdin closes (the ssh
client or the kernel died) or on `stop`. The workers are the processes whose environment
carries `NBTRAIN_WORKER_TAG=<tag>` (whoever started them: DeepSpeed's pdsh runner, mpirun,
srun) plus the process group of any command the relay started itself. On the head,
`Relay.lost` names a host whose relay went silent for as long, or whose ssh ended.

    relay = Relay("node1", run.path, ranks=[2, 3])   # doctest: +SKIP
    relay.handshake(timeout=20)                       # shared filesystem? -> relay.shared
    relay.send_files()                                # cell.py, inputs.pkl, ... unless shared
    ... the supervisor polls relay.lost ...
    relay.sync(); relay.stop("the run ended")

Standard library only: the module runs on every host before anything else is imported.
"""
