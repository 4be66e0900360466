#!/usr/bin/env python3
"""Starts this host's process of a multi-host run (GPU clusters): one process per host.

Run it once on every host, e.g. by `srun` (see scripts/slurm_example.sbatch) or by hand:

    # on host 0 and host 1 (only --process_id differs)
    python scripts/launch_multihost.py --coordinator_address=host0:8476 --num_processes=2 \\
        --process_id=0 -- --config configs/pretrain_r3d.py --workdir /shared/runs/r3d

It execs `python main.py --distributed --coordinator_address=HOST:PORT --num_processes=N
--process_id=I <the arguments after -->`. Each of the three values comes from, in order:
1. its flag;
2. the generic environment: COORDINATOR_ADDRESS (`host` or `host:port`), NUM_PROCESSES,
   PROCESS_ID;
3. SLURM's environment: the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST,
   SLURM_NODELIST; compressed lists such as `node[01-04]` are expanded), SLURM_NTASKS,
   SLURM_PROCID.
The port is `--port`, else COORDINATOR_PORT, else the one `jax.distributed` picks under SLURM
(61440 + SLURM_JOB_ID % 4096, so two jobs on one node do not collide), else 8476.

Standard library only: it runs before anything is imported. `--dry_run` prints the command.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 8476  # the coordinator port jax uses on Cloud TPU
SLURM_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


class LaunchError(Exception):
    """A value the launcher cannot find or accept; printed as a usage error."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, compressed or not.

    `node07` -> node07; `a1,b2` -> a1; `node[01-04]` -> node01; `gpu[3,5-7],cpu1` -> gpu3;
    `rack[1-2]-n[08-09]` -> rack1-n08 (each bracket contributes its first value, padding kept).
    """
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):  # the first top-level comma ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if not entry or entry.count("[") != entry.count("]"):
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], entry)


def coordinator_port(flag: int | None, env: Mapping[str, str]) -> int:
    if flag is not None:
        return flag
    if env.get("COORDINATOR_PORT"):
        return int(env["COORDINATOR_PORT"])
    if env.get("SLURM_JOB_ID", "").isdigit():
        return 61440 + int(env["SLURM_JOB_ID"]) % 4096
    return DEFAULT_PORT


def resolve(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, int, int]:
    """(coordinator `host:port`, number of processes, this process's id) from flags or env."""
    address = args.coordinator_address or env.get("COORDINATOR_ADDRESS")
    if not address:
        nodelist = next((env[v] for v in SLURM_NODELIST_VARS if env.get(v)), None)
        address = first_host(nodelist) if nodelist else None
    num_processes = pick_int(args.num_processes, env, ("NUM_PROCESSES", "SLURM_NTASKS"))
    process_id = pick_int(args.process_id, env, ("PROCESS_ID", "SLURM_PROCID"))
    missing = [name for name, value in (("--coordinator_address", address),
                                         ("--num_processes", num_processes),
                                         ("--process_id", process_id)) if value is None]
    if missing:
        raise LaunchError(
            f"no value for {', '.join(missing)}: pass the flags, set COORDINATOR_ADDRESS, "
            "NUM_PROCESSES and PROCESS_ID, or run the launcher under SLURM (srun)")
    assert address is not None and num_processes is not None and process_id is not None
    if ":" not in address:
        address = f"{address}:{coordinator_port(args.port, env)}"
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise LaunchError(f"process_id={process_id} must be in [0, num_processes="
                          f"{num_processes})")
    return address, num_processes, process_id


def pick_int(flag: int | None, env: Mapping[str, str], names: Sequence[str]) -> int | None:
    if flag is not None:
        return flag
    for name in names:
        if env.get(name):
            try:
                return int(env[name])
            except ValueError:
                raise LaunchError(f"{name}={env[name]!r} is not an integer") from None
    return None


def build_command(args: argparse.Namespace, env: Mapping[str, str]) -> list[str]:
    """The command this host runs: main with `--distributed` and the three values."""
    address, num_processes, process_id = resolve(args, env)
    program = ["vcp-jax"] if args.installed else [args.python, str(REPO_ROOT / "main.py")]
    return [*program, "--distributed", f"--coordinator_address={address}",
            f"--num_processes={num_processes}", f"--process_id={process_id}", *args.main_args]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` goes to main unchanged.",
        usage="%(prog)s [options] -- --config CONFIG --workdir DIR [--config.key=value ...]")
    parser.add_argument("--coordinator_address", help="host or host:port of process 0")
    parser.add_argument("--num_processes", type=int, help="number of processes (hosts)")
    parser.add_argument("--process_id", type=int, help="this process's index, 0-based")
    parser.add_argument("--port", type=int, help="coordinator port when the address has none")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter that runs main.py (default: the one running this)")
    parser.add_argument("--installed", action="store_true",
                        help="run the installed `vcp-jax` command instead of main.py")
    parser.add_argument("--dry_run", action="store_true", help="print the command, run nothing")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.main_args = argv[split + 1:]
    if not args.main_args:
        parser.error("no arguments for main after `--` (at least --config and --workdir)")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        command = build_command(args, os.environ)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(shlex.join(command))
        return 0
    print(f"launch_multihost: {shlex.join(command)}", file=sys.stderr, flush=True)
    # exec, not a child: signals from the scheduler (SIGTERM at the time limit) reach main.
    try:
        os.execvp(command[0], command)
    except OSError as e:
        print(f"error: cannot run {command[0]}: {e}", file=sys.stderr)
        return 127
    return 0  # not reached: exec replaced this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
