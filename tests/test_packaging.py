"""The installable package: `--config` resolution, the requirements, the wheel, and `vcp-jax`.

The wheel test builds from a copy of the working tree (no `build/` or `.egg-info` left in the
checkout) and installs it with `--no-deps` into a fresh venv that holds only its declared
dependencies: offline, they are borrowed from the running environment file by file (the files
that the distributions the wheel requires, and those they require, list in their RECORD), so a
module that the package imports without declaring it is absent there. From a folder outside the
checkout, that venv imports every module of the package and runs `vcp-jax` on a tiny stage.
"""

from __future__ import annotations

import email
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import REPO_ROOT
from vcp_jax import config_paths, reporting

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


# --- requirements.txt and requirements-test.txt against pyproject.toml ----------------------------

# Pinned in requirements.txt though the package does not name it: it comes with jax, same version.
PINNED_WITH = {"jaxlib": "jax"}


def pins(name: str) -> tuple[dict[str, str], list[str]]:
    """The exact pins of a requirements file ({canonical name: version}) and its `-r` includes."""
    found, includes = {}, []
    for line in (REPO_ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r"):
            includes.append(line[2:].strip())
        elif line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{name}: {line} is not an exact pin"
            found[canonical(req.name)] = spec.version
    return found, includes


def test_requirements_txt_is_the_runtime_and_satisfies_the_package_ranges() -> None:
    """requirements.txt pins exactly the package's dependencies (no test tool, no torch), each
    inside its range; requirements-test.txt adds the extras on top of it, inside theirs."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    runtime, includes = pins("requirements.txt")
    assert includes == []
    declared = [Requirement(r) for r in project["dependencies"]]
    names = {canonical(r.name) for r in declared}
    extra = set(runtime) - names
    assert extra <= {canonical(n) for n in PINNED_WITH}, (
        f"requirements.txt pins {sorted(extra)}, which the package does not depend on: the "
        "runtime only; test tools go to requirements-test.txt")
    for req in declared:
        assert canonical(req.name) in runtime, f"{req.name} is not pinned in requirements.txt"
        assert req.specifier.contains(runtime[canonical(req.name)]), (
            f"requirements.txt pins {req.name}=={runtime[canonical(req.name)]}, outside {req}")

    test_pins, includes = pins("requirements-test.txt")
    assert includes == ["requirements.txt"]
    assert not set(test_pins) & set(runtime), "requirements-test.txt repeats a runtime pin"
    for group in ("torch", "notebook", "test"):
        for req in map(Requirement, project["optional-dependencies"][group]):
            version = test_pins.get(canonical(req.name))
            assert version is not None, f"{req.name} ([{group}]) is not in requirements-test.txt"
            assert req.specifier.contains(version), f"requirements-test.txt pins {req.name}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- the wheel and the entry point ----------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the working tree, with this environment's setuptools."""
    setuptools = Version(importlib.metadata.version("setuptools"))
    assert setuptools >= Version("70.1"), (
        f"setuptools {setuptools} cannot build wheels without the `wheel` package: install the "
        "pinned setuptools from requirements-test.txt (the `test` extra asks for >= 70.1)")
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


def declared_requirements(wheel: Path) -> list[Requirement]:
    """What `pip install <wheel>` (no extras) asks for: its Requires-Dist, extras left out."""
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(zf.read(name))
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist") or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def dependency_closure(
    requirements: list[Requirement],
) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions that `requirements` need, recursively (markers and extras
    evaluated as pip does), each checked against the version it is asked at."""
    found: dict[str, importlib.metadata.Distribution] = {}
    extras_done: dict[str, set[str]] = {}
    todo = list(requirements)
    while todo:
        req = todo.pop()
        key = canonical(req.name)
        try:
            dist = found.get(key) or importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req} (a declared dependency, or one of theirs) is not installed here: "
                        "install requirements-test.txt")
        assert req.specifier.contains(dist.version, prereleases=True), (
            f"{req} is asked for, {dist.version} is installed")
        wanted = {""} | {canonical(e) for e in req.extras}
        new = wanted - extras_done.get(key, set())
        if not new:
            continue
        found[key] = dist
        extras_done.setdefault(key, set()).update(new)
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in new):
                todo.append(sub)
    return found


def borrow(dists: dict[str, importlib.metadata.Distribution], folder: Path) -> int:
    """Links every file of `dists` (as their RECORD lists them) into `folder`, a site dir of
    exactly those distributions; returns how many files were linked."""
    count = 0
    for key, dist in sorted(dists.items()):
        assert dist.files is not None, f"{key} has no RECORD: cannot tell which files are its own"
        for file in dist.files:
            if ".." in file.parts:
                continue  # scripts in bin/, data outside site-packages
            source = Path(dist.locate_file(file))
            if not source.is_file():
                continue  # RECORD lists the .pyc files that were never written
            target = folder / file
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
                count += 1
    return count


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and only its declared dependencies, borrowed from this one.

    No network: the declared distributions (and those they require) are not downloaded but
    linked, file by file, into a folder that a `.pth` file puts on the venv's path. A package the
    code imports without declaring it is not there, and the import fails as it would after
    `pip install vcp-jax` on a fresh machine.
    """
    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)])
    dists = dependency_closure(declared_requirements(wheel))
    for name in ("torch", "pytest", "nbclient", "ipykernel", "ruff", "setuptools"):
        assert name not in dists, f"the runtime would pull {name}"
    borrowed = root / "borrowed"
    assert borrow(dists, borrowed) > 0
    site_packages = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    )
    # An `import` line in a .pth file runs at start-up; addsitedir also honours borrowed .pth files.
    (Path(site_packages.strip()) / "borrowed_deps.pth").write_text(
        f"import site; site.addsitedir({str(borrowed)!r})\n")
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


# Every module of the three packages, and those they import only inside functions.
IMPORT_EVERYTHING = """
import importlib, pkgutil
import configs, tfds_builders, vcp_jax
names = [m.name for p in (vcp_jax, tfds_builders, configs)
         for m in pkgutil.walk_packages(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
import matplotlib.pyplot, matplotlib.figure, tensorboardX
from unrar.cffi import unrarlib
print(len(names))
"""


def test_every_module_imports_with_only_the_declared_dependencies(venv: Path,
                                                                  tmp_path: Path) -> None:
    result = run_python(venv, tmp_path, IMPORT_EVERYTHING)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) > 30, result.stdout


def test_the_venv_lacks_what_is_not_declared(venv: Path, tmp_path: Path) -> None:
    """The borrowing is exact: what the test setup has and the runtime does not is absent, so an
    undeclared import in the package would fail the tests above."""
    for module in ("torch", "pytest", "nbclient", "setuptools"):
        result = run_python(venv, tmp_path, f"import {module}")
        assert result.returncode != 0, f"{module} is importable in the runtime venv"
        assert f"No module named '{module}'" in result.stderr, result.stderr


# The demo's tiny fine-tuning stage on its own, from random init: generates and builds a synthetic
# dataset (PyAV, OpenCV, the TFDS builder), trains and tests (grain, flax, optax, Orbax,
# tensorboardX) and plots (matplotlib). The whole tiny demo runs in tests/test_demo.py.
TINY_STAGE = """
import ml_collections

from configs import demo

CACHE = {cache!r}


def _with_cache(node):
    if isinstance(node, ml_collections.ConfigDict):
        for key, value in node.items():
            node[key] = _with_cache(value)
    elif isinstance(node, str):
        node = node.replace("{{cache}}", CACHE)
    return node


def get_config():
    return _with_cache(demo.get_config("size=tiny").finetune)
"""


@pytest.mark.slow
def test_a_tiny_stage_runs_from_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny_stage.py"
    config.write_text(TINY_STAGE.format(cache=str(tmp_path / "cache")))
    workdir = tmp_path / "run"
    result = run_entry_point(venv, tmp_path, f"--config={config}", f"--workdir={workdir}",
                             "--compilation_cache=", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["task"] == "finetune" and "video_top1" in metrics["test"], metrics
    assert (workdir / "confusion.png").stat().st_size > 0
    assert reporting.PLOTS_SKIPPED not in result.stdout


def test_plots_are_skipped_with_one_line_without_matplotlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    reporting.plotting_available.cache_clear()
    try:
        reporting.plot_bars(tmp_path / "bars.png", {"a": {"x": 1.0}}, title="t", ylabel="y")
        reporting.plot_curves(tmp_path / "curves.png", {"a": ([1, 2], [0.5, 0.7])}, title="t",
                              xlabel="k", ylabel="y")
        reporting.plot_confusion(tmp_path / "confusion.png", np.eye(2), ["a", "b"], "t")
    finally:
        reporting.plotting_available.cache_clear()
    assert capsys.readouterr().out == reporting.PLOTS_SKIPPED + "\n"
    assert not list(tmp_path.iterdir())


def run_python(venv: Path, cwd: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def run_entry_point(venv: Path, cwd: Path, *args: str,
                    timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    return subprocess.run([str(venv / "bin" / "vcp-jax"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run(cmd: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result.stdout
