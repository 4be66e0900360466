"""The launchers in scripts/: the commands they assemble, and that the arguments reach main intact.

No cluster is needed: stand-ins for `gcloud`, `srun` and the Python interpreter on PATH record
what they are given, so the tests check the real exec path, the remote shell's view of
`--command`, and the SLURM example script, in well under a second each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"
MAIN_ARGS = [
    "--config", "configs/pretrain_r3d.py", "--workdir=~/runs/r3d",  # `~` for the worker to expand
    "--config.cloze.options=('original','rotation')", "--config.data.data_dir=/mnt/my data",
    "--config.note=$HOME `x` \"q\" it's!",  # nothing here is for the shell
]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """A minimal environment: nothing from a surrounding scheduler leaks into the test."""
    return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **extra}


def run_script(name: str, *args: str, env: dict[str, str] | None = None,
               check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True,
                            text=True, env=env or clean_env(), timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    """A bin folder with `gcloud` (runs `--command` with bash, as a worker's ssh does) and an
    interpreter `fake_python` that records its arguments and working directory as JSON."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        '#!/usr/bin/env bash\nset -euo pipefail\nprintf "%s\\n" "$@" > "$FAKE_DIR/gcloud_args"\n'
        'for a in "$@"; do case "$a" in --command=*) exec bash -c "${a#--command=}";; esac; done\n'
    )
    (bin_dir / "fake_python").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.path.join(os.environ['FAKE_DIR'], 'main_argv.json'), 'w') as f:\n"
        "    json.dump({'argv': sys.argv[1:], 'cwd': os.getcwd(),\n"
        "               'xla': os.environ.get('XLA_FLAGS')}, f)\n"
    )
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    return bin_dir


def received(fakes: Path) -> dict:
    return json.loads((fakes.parent / "main_argv.json").read_text())


# --- TPU VM slices --------------------------------------------------------------------------------


def test_tpu_dry_run_prints_the_gcloud_command() -> None:
    out = run_script("launch_tpu.py", "--name=my-v4-32", "--zone=us-central2-b",
                     "--project=my-proj", "--python=.venv/bin/python", "--env", "XLA_FLAGS=--a --b",
                     "--dry_run", "--", *MAIN_ARGS).stdout
    words = shlex.split(out)
    assert words[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v4-32",
                         "--zone=us-central2-b", "--project=my-proj", "--worker=all"]
    (command,) = [w.removeprefix("--command=") for w in words if w.startswith("--command=")]
    assert shlex.split(command) == [
        "cd", "~/vcp-jax", "&&", "echo", "$$", ">", "~/.vcp_jax.pid", "&&", "exec", "env",
        "XLA_FLAGS=--a --b", ".venv/bin/python", "main.py", "--distributed", *MAIN_ARGS]
    assert command.startswith("cd ~/vcp-jax && ")  # `~` unquoted: the worker's shell expands it


def test_tpu_launch_reaches_main_intact_on_the_worker(fakes: Path, tmp_path: Path) -> None:
    """The real path: exec gcloud, whose `--command` a worker's shell runs."""
    checkout = tmp_path / "check out"
    checkout.mkdir()
    env = clean_env(PATH=f"{fakes}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
                    TPU_NAME="my-tpu", ZONE="europe-west4-a", HOME=str(tmp_path))
    run_script("launch_tpu.py", f"--repo_dir={checkout}", f"--python={fakes / 'fake_python'}",
               "--env=XLA_FLAGS=--xla_x=1", "--", *MAIN_ARGS, env=env)
    assert received(fakes) == {"argv": ["main.py", "--distributed", *MAIN_ARGS],
                               "cwd": str(checkout), "xla": "--xla_x=1"}
    gcloud_args = (tmp_path / "gcloud_args").read_text().splitlines()
    assert gcloud_args[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu",
                               "--zone=europe-west4-a"]


def test_tpu_dry_run_output_runs_as_printed(fakes: Path, tmp_path: Path) -> None:
    """The printed line, pasted into a shell, does what the launcher would do."""
    line = run_script("launch_tpu.py", "--name=t", "--zone=z", f"--repo_dir={tmp_path}",
                      f"--python={fakes / 'fake_python'}", "--dry_run", "--", *MAIN_ARGS).stdout
    env = clean_env(PATH=f"{fakes}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
                    HOME=str(tmp_path))
    subprocess.run(["bash", "-c", line], env=env, check=True, timeout=60)
    assert received(fakes)["argv"] == ["main.py", "--distributed", *MAIN_ARGS]


def test_tpu_detach_and_installed() -> None:
    out = run_script("launch_tpu.py", "--name=t", "--zone=z", "--installed", "--detach",
                     "--dry_run", "--", "--config", "demo", "--workdir", "/w",
                     "--distributed").stdout
    (command,) = [w.removeprefix("--command=") for w in shlex.split(out)
                  if w.startswith("--command=")]
    assert command == ("cd ~/vcp-jax && nohup vcp-jax --config demo --workdir /w --distributed "
                       "> ~/vcp_jax.log 2>&1 < /dev/null & echo $! > ~/.vcp_jax.pid")


def test_tpu_ctrl_c_is_forwarded_to_main_on_the_workers(fakes: Path, tmp_path: Path) -> None:
    """Ctrl-C on the launcher reaches main on the worker as SIGTERM (through a second gcloud
    ssh and the pid file), and the launcher ends with main's exit status."""
    (fakes / "sleepy_python").write_text(
        f"#!{sys.executable}\nimport os, signal, sys, time\n"
        "d = os.environ['FAKE_DIR']\n"
        "def stop(signum, frame):\n"
        "    open(os.path.join(d, 'got_sigterm'), 'w').close()\n"
        "    sys.exit(128 + signum)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open(os.path.join(d, 'ready'), 'w').close()\n"
        "time.sleep(60)\n")
    (fakes / "sleepy_python").chmod(0o755)
    env = clean_env(PATH=f"{fakes}:{os.environ['PATH']}", FAKE_DIR=str(tmp_path),
                    HOME=str(tmp_path))
    launcher = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "launch_tpu.py"), "--name=t", "--zone=z",
         f"--repo_dir={tmp_path}", f"--python={fakes / 'sleepy_python'}", "--", *MAIN_ARGS],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists():
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()[0]
        time.sleep(0.05)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=30)
    assert (tmp_path / "got_sigterm").exists(), out
    assert launcher.returncode == 128 + signal.SIGTERM, out
    assert "sending SIGTERM to main on every worker" in out


def test_tpu_usage_errors() -> None:
    result = run_script("launch_tpu.py", "--name=t", "--dry_run", "--", "--config", "demo",
                        check=False)
    assert result.returncode == 2 and "--zone are required" in result.stderr
    result = run_script("launch_tpu.py", "--name=t", "--zone=z", "--dry_run", check=False)
    assert result.returncode == 2 and "after `--`" in result.stderr
    result = run_script("launch_tpu.py", "--name=t", "--zone=z", "--env=1X=2", "--", "a",
                        check=False)
    assert result.returncode == 2 and "KEY=VALUE" in result.stderr


# --- GPU clusters ---------------------------------------------------------------------------------


def multihost_dry_run(*args: str, **env: str) -> list[str]:
    out = run_script("launch_multihost.py", *args, "--dry_run", "--", *MAIN_ARGS,
                     env=clean_env(**env)).stdout
    return shlex.split(out)


def expected(address: str, num_processes: int, process_id: int) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "main.py"), "--distributed",
            f"--coordinator_address={address}", f"--num_processes={num_processes}",
            f"--process_id={process_id}", *MAIN_ARGS]


def test_multihost_from_flags() -> None:
    command = multihost_dry_run("--coordinator_address=10.0.0.1:1234", "--num_processes=4",
                                "--process_id=3")
    assert command == expected("10.0.0.1:1234", 4, 3)


def test_multihost_from_the_generic_environment() -> None:
    command = multihost_dry_run(COORDINATOR_ADDRESS="head", NUM_PROCESSES="2", PROCESS_ID="0")
    assert command == expected("head:8476", 2, 0)
    command = multihost_dry_run(COORDINATOR_ADDRESS="head", COORDINATOR_PORT="999",
                                NUM_PROCESSES="2", PROCESS_ID="1")
    assert command == expected("head:999", 2, 1)


def test_multihost_from_slurm_with_a_compressed_nodelist() -> None:
    slurm = dict(SLURM_STEP_NODELIST="node[01-04]", SLURM_JOB_NODELIST="other[1-9]",
                 SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_JOB_ID="5000")
    # The port jax itself derives from the job id, so two jobs on one node do not collide.
    assert multihost_dry_run(**slurm) == expected(f"node01:{61440 + 5000 % 4096}", 4, 2)
    # Flags, then the generic variables, win over SLURM's.
    command = multihost_dry_run("--process_id=0", "--port=7000", **slurm, NUM_PROCESSES="8")
    assert command == expected("node01:7000", 8, 0)


def test_multihost_execs_main(fakes: Path, tmp_path: Path) -> None:
    env = clean_env(FAKE_DIR=str(tmp_path), SLURM_NODELIST="gpu7", SLURM_NTASKS="1",
                    SLURM_PROCID="0")
    run_script("launch_multihost.py", f"--python={fakes / 'fake_python'}", "--", *MAIN_ARGS,
               env=env)
    assert received(fakes)["argv"] == [str(REPO_ROOT / "main.py"), "--distributed",
                                       "--coordinator_address=gpu7:8476", "--num_processes=1",
                                       "--process_id=0", *MAIN_ARGS]


def test_multihost_usage_errors() -> None:
    result = run_script("launch_multihost.py", "--num_processes=2", "--", "x", check=False)
    assert result.returncode == 2
    assert "--coordinator_address, --process_id" in result.stderr, result.stderr
    result = run_script("launch_multihost.py", "--coordinator_address=h", "--num_processes=2",
                        "--process_id=2", "--", "x", check=False)
    assert result.returncode == 2 and "process_id=2" in result.stderr
    result = run_script("launch_multihost.py", "--", "x", check=False,
                        env=clean_env(COORDINATOR_ADDRESS="h", NUM_PROCESSES="two", PROCESS_ID="0"))
    assert result.returncode == 2 and "NUM_PROCESSES='two'" in result.stderr


@pytest.mark.parametrize("nodelist, host", [
    ("node07", "node07"),
    ("a1,b2", "a1"),
    ("node[01-04]", "node01"),
    ("gpu[3,5-7],cpu1", "gpu3"),
    ("rack[1-2]-n[08-09],x", "rack1-n08"),
])
def test_first_host(nodelist: str, host: str) -> None:
    assert load_script("launch_multihost").first_host(nodelist) == host


def test_slurm_example_under_a_stand_in_srun(tmp_path: Path) -> None:
    """The example batch file, with `srun` replaced by two local tasks that dry-run."""
    if not (REPO_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the example runs .venv/bin/python from the checkout")
    srun = tmp_path / "srun"
    srun.write_text('#!/usr/bin/env bash\nset -euo pipefail\n'
                    'while [[ "$1" == --* ]]; do shift; done\n'
                    'for id in 0 1; do SLURM_PROCID=$id "$1" "$2" --dry_run "${@:3}"; done\n')
    srun.chmod(0o755)
    env = clean_env(PATH=f"{tmp_path}:{os.environ['PATH']}", HOME="/home/me",
                    SLURM_SUBMIT_DIR=str(REPO_ROOT), SLURM_JOB_ID="77",
                    SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NTASKS="2")
    out = subprocess.run(["bash", str(SCRIPTS / "slurm_example.sbatch")], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    lines = [shlex.split(line) for line in out.splitlines()]
    assert [line[2:6] for line in lines] == [
        ["--distributed", f"--coordinator_address=gpu07:{61440 + 77}", "--num_processes=2",
         f"--process_id={i}"] for i in (0, 1)]
    assert lines[0][6:10] == ["--config", "configs/pretrain_r3d.py", "--workdir",
                              "/home/me/runs/vcp_r3d_77"]
    help_text = subprocess.run(["bash", str(SCRIPTS / "slurm_example.sbatch"), "--help"],
                               check=True, capture_output=True, text=True).stdout
    assert "sbatch scripts/slurm_example.sbatch" in help_text
