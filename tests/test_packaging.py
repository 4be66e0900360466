"""The installable package: `--config` resolution, the wheel, and the `vcp-jax` entry point.

The wheel test builds from a copy of the working tree (no `build/` or `.egg-info` left in the
checkout), installs it with `--no-deps` into a fresh venv that borrows the running environment's
site-packages through a `.pth` file (offline, seconds), and runs `vcp-jax` from a folder outside
the checkout, as a user does after `pip install .`.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO_ROOT
from vcp_jax import config_paths

# What `pip install .` needs from the working tree.
SOURCES = ("pyproject.toml", "README.md", "vcp_jax", "tfds_builders", "configs")


# --- config_paths: pure, in-process --------------------------------------------------------------


@pytest.fixture
def packaged(tmp_path: Path) -> Path:
    """A stand-in for the installed `configs` package folder."""
    directory = tmp_path / "site" / "configs"
    directory.mkdir(parents=True)
    for name in ("__init__", "default", "demo"):
        (directory / f"{name}.py").write_text("")
    return directory


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory: a folder with no configs in it."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("value", ["demo", "demo.py", "configs/demo.py"])
def test_names_and_checkout_paths_resolve_to_the_package(value, packaged, elsewhere) -> None:
    assert config_paths.resolve_config_path(value, packaged) == str(packaged / "demo.py")


def test_arguments_after_the_colon_are_kept(packaged, elsewhere) -> None:
    resolved = config_paths.resolve_config_path("demo:arch=r3d,fold=2", packaged)
    assert resolved == f"{packaged / 'demo.py'}:arch=r3d,fold=2"


def test_an_existing_local_file_wins(packaged, elsewhere) -> None:
    (elsewhere / "configs").mkdir()
    (elsewhere / "configs" / "demo.py").write_text("")
    assert config_paths.resolve_config_path("configs/demo.py:x", packaged) == "configs/demo.py:x"


def test_unknown_config_names_the_choices(packaged, elsewhere) -> None:
    with pytest.raises(config_paths.ConfigNotFoundError, match=r"nosuch.*default, demo$"):
        config_paths.resolve_config_path("nosuch", packaged)
    # A missing path outside `configs/` is an error, not a silent switch to a packaged file.
    with pytest.raises(config_paths.ConfigNotFoundError, match="default, demo"):
        config_paths.resolve_config_path("experiments/demo.py", packaged)


def test_resolve_config_flag_spellings(elsewhere) -> None:
    default = str(REPO_ROOT / "configs" / "default.py")
    argv = ["prog", "--config", "default:c3d", "--config.batch_size=4", "--workdir=w"]
    assert config_paths.resolve_config_flag(argv) == [
        "prog", "--config", f"{default}:c3d", "--config.batch_size=4", "--workdir=w"]
    assert config_paths.resolve_config_flag(["prog", "-config=default"]) == [
        "prog", f"-config={default}"]
    untouched = ["prog", "--config.seed=1", "--", "--config", "nosuch"]
    assert config_paths.resolve_config_flag(untouched) == untouched
    assert argv[2] == "default:c3d"  # a copy: the caller's list is not modified


# --- requirements.txt against pyproject.toml ------------------------------------------------------


def test_pinned_requirements_satisfy_the_package_ranges() -> None:
    """Every dependency and extra of the package is pinned in requirements.txt, inside its range
    (except the notebook and torch extras, which CI installs only where a test needs them)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            pins[canonical(req.name)] = next(iter(req.specifier)).version
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["test"]]
    for req in declared:
        assert canonical(req.name) in pins, f"{req.name} is not pinned in requirements.txt"
        version = pins[canonical(req.name)]
        assert req.specifier.contains(version), f"requirements.txt pins {req.name}=={version}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the wheel and the entry point ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the working tree, with this environment's setuptools."""
    setuptools = Version(importlib.metadata.version("setuptools"))
    assert setuptools >= Version("70.1"), (
        f"setuptools {setuptools} cannot build wheels without the `wheel` package: install the "
        "pinned setuptools from requirements.txt (the `test` extra asks for >= 70.1)")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy2(path, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--wheel-dir", str(root / "dist"), str(source)])
    (built,) = (root / "dist").glob("vcp_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed and the dependencies borrowed from this one."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)])
    site_packages = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    borrowed = sysconfig.get_path("purelib")
    # An `import` line in a .pth file runs at start-up; addsitedir also honours borrowed .pth files.
    (Path(site_packages.strip()) / "borrowed_deps.pth").write_text(
        f"import site; site.addsitedir({borrowed!r})\n")
    return venv


def test_wheel_holds_the_packages_data_and_entry_point(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read("vcp_jax-0.1.0.dist-info/entry_points.txt").decode()
        metadata = zf.read("vcp_jax-0.1.0.dist-info/METADATA").decode()
    for name in ("vcp_jax/main.py", "vcp_jax/config_paths.py", "vcp_jax/data/video.py",
                 "tfds_builders/build.py", "configs/__init__.py", "configs/default.py"):
        assert name in names, name
    for builder in ("ucf101_frames", "hmdb51_frames"):
        for data in ("README.md", "CITATIONS.bib", f"{builder}_dataset_builder.py"):
            assert f"tfds_builders/{builder}/{data}" in names
    assert not any(n.startswith(("tests/", "benchmarks/", "scripts/", "docs/")) for n in names)
    assert re.search(r"^vcp-jax = vcp_jax\.main:run$", entry_points, re.M), entry_points
    for extra in ("torch", "notebook", "test"):
        assert f"Provides-Extra: {extra}" in metadata


def test_installed_packages_come_from_the_venv(venv: Path, tmp_path: Path) -> None:
    code = ("import configs, tfds_builders, vcp_jax; "
            "from tfds_builders import ucf101_frames; from pathlib import Path; "
            "print(*(Path(m.__file__).parent for m in (vcp_jax, tfds_builders, configs, "
            "ucf101_frames)), sep='\\n')")
    folders = [Path(p) for p in run([str(venv / "bin" / "python"), "-c", code],
                                    cwd=tmp_path).split()]
    for folder in folders:
        assert folder.is_relative_to(venv), folder
    assert (folders[3] / "README.md").is_file() and (folders[3] / "CITATIONS.bib").is_file()


def test_entry_point_helpshort_lists_the_flags(venv: Path, tmp_path: Path) -> None:
    result = run_entry_point(venv, tmp_path, "--helpshort")
    assert result.returncode in (0, 1), result.stderr  # absl's help flags exit with status 1
    for flag in ("--config", "--workdir", "--distributed"):
        assert flag in result.stdout, result.stdout


def test_entry_point_finds_a_config_by_name(venv: Path, tmp_path: Path) -> None:
    # The override only applies to a loaded config, so reaching the missing-workdir error shows
    # that `pretrain_r3d` was found in the installed package; no JAX computation runs.
    result = run_entry_point(venv, tmp_path, "--config", "pretrain_r3d", "--config.batch_size=16")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "--workdir must have a value" in result.stderr, result.stderr


def test_entry_point_names_the_configs_for_an_unknown_one(venv: Path, tmp_path: Path) -> None:
    result = run_entry_point(venv, tmp_path, "--config=nosuch", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "nosuch" in result.stderr and "pretrain_r3d" in result.stderr, result.stderr
    assert not (tmp_path / "w").exists()


def run_entry_point(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(venv / "bin" / "vcp-jax"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout
