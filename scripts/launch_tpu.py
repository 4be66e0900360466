#!/usr/bin/env python3
"""Starts the same `main.py` command on every worker of a Cloud TPU VM slice.

    python scripts/launch_tpu.py --name=my-v4-32 --zone=us-central2-b -- \\
        --config configs/pretrain_r3d.py --workdir=/mnt/runs/r3d \\
        --config.data.data_dir=/mnt/disks/data/tensorflow_datasets --config.batch_size=256

runs, from this machine,

    gcloud compute tpus tpu-vm ssh my-v4-32 --zone=us-central2-b --worker=all \\
        --command='cd ~/vcp-jax && python3 main.py --distributed --config ...'

Every worker runs one process; `--distributed` makes main call `jax.distributed.initialize()`,
which on Cloud TPU finds the coordinator, the process count and this worker's index by itself.
The checkout (`--repo_dir`) and its environment (`--python`) must exist on every worker, the
dataset must be readable at the same path on each (docs/tpu_and_gpu.md), and the workdir must be
one folder that all workers share (checkpoints are written by all of them).

Stopping: each worker's main writes its process id to `--pid_file` (on the worker). Ctrl-C (or
SIGTERM) here is forwarded as SIGTERM to main on every worker, through a second `gcloud ... ssh
--worker=all`: the run saves a checkpoint at the next step boundary and stops, and its last
lines still arrive here (gcloud runs in its own session, so Ctrl-C does not cut the stream); a
second Ctrl-C stops waiting. With `--detach`, stop a run the same way by hand:
`gcloud compute tpus tpu-vm ssh NAME --zone=Z --worker=all --command='kill -TERM $(cat
~/.vcp_jax.pid)'`. A preempted TPU VM sends SIGTERM to main itself.

Arguments after `--` are quoted for the remote shell exactly as given: quote a `~` in them
(`'--workdir=~/runs/r3d'`) to have the worker expand it rather than this machine's shell.
`--dry_run` prints the gcloud command instead of running it. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

_FLAG_OR_VARIABLE = r"-{1,2}[\w.-]+|[A-Za-z_]\w*"  # the part before `=` of `--flag=v`, `KEY=v`


def quote_path(path: str) -> str:
    """Shell-quotes `path` but leaves a leading `~/` bare so that the remote shell expands it."""
    if path == "~":
        return path
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:]) if path[2:] else "~/"
    return shlex.quote(path)


def remote_command(args: argparse.Namespace) -> str:
    """The shell line every worker runs: cd to the checkout, then main with `--distributed`."""
    main_args = list(args.main_args)
    if "--distributed" not in main_args:
        main_args.insert(0, "--distributed")
    program = ["vcp-jax"] if args.installed else [quote_path(args.python), "main.py"]
    env = [f"{key}={value}" for key, value in args.env]
    line = " ".join([*(["env", *map(quote_word, env)] if env else []), *program,
                     *map(quote_word, main_args)])
    pid_file = quote_path(args.pid_file)
    if args.detach:
        line = (f"nohup {line} > {quote_path(args.log_file)} 2>&1 < /dev/null & "
                f"echo $! > {pid_file}")
    else:
        # exec: the shell's pid ($$) becomes main's, which `stop_command` signals.
        line = f"echo $$ > {pid_file} && exec {line}"
    return f"cd {quote_path(args.repo_dir)} && {line}"


def stop_command(args: argparse.Namespace) -> list[str]:
    """`gcloud ... ssh --worker=all` that sends SIGTERM to main on every worker (only to a
    process that is main: a stale pid file may name a process that reused the number)."""
    pid_file = quote_path(args.pid_file)
    remote = (f"p=$(cat {pid_file} 2>/dev/null) && grep -q -- --distributed /proc/$p/cmdline "
              f"2>/dev/null && kill -TERM $p")
    command = gcloud_command(args)
    return [*command[:command.index("--worker=all") + 1], f"--command={remote}",
            *args.gcloud_flag]


def quote_word(word: str) -> str:
    """shlex.quote, except that `--flag=value` and `KEY=value` read `--flag="value"` where safe.

    Double quotes nest readably in `--command="..."`; values with `$`, a backquote or `!` (which
    a shell would expand inside double quotes) keep shlex's single quotes.
    """
    if shlex.quote(word) == word:
        return word
    prefix, eq, value = word.partition("=")
    if eq and re.fullmatch(_FLAG_OR_VARIABLE, prefix) and not re.search(r"[$`!]", value):
        return prefix + '="' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.quote(word)


def shell_join(command: Sequence[str]) -> str:
    return " ".join(map(quote_word, command))


def gcloud_command(args: argparse.Namespace) -> list[str]:
    """`gcloud compute tpus tpu-vm ssh NAME --zone Z [--project P] --worker=all --command ...`."""
    command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, f"--zone={args.zone}"]
    if args.project:
        command.append(f"--project={args.project}")
    return [*command, "--worker=all", f"--command={remote_command(args)}", *args.gcloud_flag]


def env_assignment(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Everything after `--` goes to main unchanged.",
        usage="%(prog)s --name NAME --zone ZONE [options] -- --config CONFIG --workdir DIR ...")
    parser.add_argument("--name", default=os.environ.get("TPU_NAME"),
                        help="TPU VM name (default: $TPU_NAME)")
    parser.add_argument("--zone", default=os.environ.get("ZONE"),
                        help="its zone, e.g. us-central2-b (default: $ZONE)")
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's own)")
    parser.add_argument("--repo_dir", default="~/vcp-jax",
                        help="the checkout on every worker (default: %(default)s)")
    parser.add_argument("--python", default="python3",
                        help="interpreter on the workers, e.g. .venv/bin/python (relative to "
                             "--repo_dir; default: %(default)s)")
    parser.add_argument("--installed", action="store_true",
                        help="run the installed `vcp-jax` command instead of main.py")
    parser.add_argument("--env", action="append", default=[], type=env_assignment,
                        metavar="KEY=VALUE", help="environment variable for main (repeatable)")
    parser.add_argument("--detach", action="store_true",
                        help="keep running after this machine disconnects (nohup, logs to "
                             "--log_file on each worker)")
    parser.add_argument("--log_file", default="~/vcp_jax.log",
                        help="each worker's log with --detach (default: %(default)s)")
    parser.add_argument("--pid_file", default="~/.vcp_jax.pid",
                        help="where each worker records main's process id, to stop it with "
                             "SIGTERM (default: %(default)s)")
    parser.add_argument("--gcloud_flag", action="append", default=[], metavar="FLAG",
                        help="extra flag for `gcloud ... ssh`, e.g. --gcloud_flag=--internal-ip")
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud command only")
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.main_args = argv[split + 1:]
    if not args.name or not args.zone:
        parser.error("--name and --zone are required (or set $TPU_NAME and $ZONE)")
    if not args.main_args:
        parser.error("no arguments for main after `--` (at least --config and --workdir)")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    command = gcloud_command(args)
    if args.dry_run:
        print(shell_join(command))
        return 0
    print(f"launch_tpu: {shell_join(command)}", file=sys.stderr, flush=True)
    if args.detach:  # nothing to wait for or forward to
        try:
            os.execvp(command[0], command)
        except OSError as e:
            print(f"error: cannot run gcloud ({e}); install the Google Cloud CLI",
                  file=sys.stderr)
            return 127
    try:
        # Its own session: Ctrl-C reaches this launcher only, which forwards it, and the
        # workers' output keeps streaming while they save and stop.
        child = subprocess.Popen(command, start_new_session=True)
    except OSError as e:
        print(f"error: cannot run gcloud ({e}); install the Google Cloud CLI", file=sys.stderr)
        return 127
    forwarded = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal forwarded
        del frame
        if forwarded:  # a second signal: stop waiting (the workers go on stopping by themselves)
            child.terminate()
            return
        forwarded = True
        print(f"launch_tpu: {signal.Signals(signum).name}: sending SIGTERM to main on every "
              "worker (it saves a checkpoint and stops; again to stop waiting)",
              file=sys.stderr, flush=True)
        subprocess.run(stop_command(args), start_new_session=True, check=False)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
