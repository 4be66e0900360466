"""docs/configuration.md is current, and the generator reads defaults and comments correctly."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from vcp_jax import config_reference


def test_docs_configuration_md_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    status = config_reference.main(["--check"])
    assert status == 0, capsys.readouterr().err  # says: run `python -m vcp_jax.config_reference`


def row(text: str, section: str, key: str) -> str:
    """The table row of `key` in the `## configs/<section>.py` part of the reference."""
    part = text.split(f"## configs/{section}.py\n")[1].split("\n## ")[0]
    (line,) = [line for line in part.splitlines() if line.startswith(f"| `{key}` |")]
    return line


def test_the_project_configs_keys_defaults_and_comments() -> None:
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    assert row(text, "default", "data.num_threads") == (
        "| `data.num_threads` | `16` | JPEG-decoding threads per host |")
    # A section built by a function in vcp_jax (config.cloze = cloze.default_config()).
    assert "frames per clip (T)" in row(text, "default", "cloze.clip_len")
    # An override without a comment keeps the base config's; changed values are bold.
    synthetic = row(text, "pretrain_synthetic", "data.num_val_videos")
    assert "**`40`**" in synthetic and "train videos held out for validation" in synthetic
    # Comment lines right above a key, inside ConfigDict(dict(...)).
    assert "A random camera pan per video" in row(text, "pretrain_synthetic",
                                                  "data.synthetic.camera_pan")


@pytest.fixture
def configs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A throwaway configs package (a unique name, so that imports never mix with `configs`)."""
    package = f"cfgs_{uuid.uuid4().hex[:8]}"
    directory = tmp_path / package
    directory.mkdir()
    (directory / "__init__.py").write_text("")
    (directory / "default.py").write_text(textwrap.dedent('''\
        """Base config."""
        import ml_collections


        def _section():
            return ml_collections.ConfigDict({
                "depth": 3,  # layers in the section
                "kind": "a",
            })


        def get_config(arch="r3d"):
            config = ml_collections.ConfigDict()
            config.arch = arch  # which backbone
            config.lr = 0.1  # learning rate
            # The batch, over
            # all hosts.
            config.batch = 8

            config.uncommented = True
            config.ref = ml_collections.config_dict.placeholder(str)  # a path | or None
            config.sub = _section()  # the section
            config.extra = ml_collections.ConfigDict(dict(
                a=1,  # first
                b="x",
            ))
            return config
        '''))
    (directory / "derived.py").write_text(textwrap.dedent(f'''\
        """A derived config with arguments.

        More text that the reference leaves out.
        """
        from {package} import default


        def get_config(arg_string="fold=1"):
            config = default.get_config("c3d")
            config.lr = 0.5
            if arg_string:
                config.batch = 2  # smaller batch here
            config.sub.depth = 5
            config["added"] = "new"  # only in derived
            return config
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield directory
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]


def test_generator_on_a_configs_package(configs_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "reference.md"
    assert config_reference.main(["--configs_dir", str(configs_dir), "--output", str(output)]) == 0
    text = output.read_text()
    name = configs_dir.name
    assert text.index(f"## {name}/default.py") < text.index(f"## {name}/derived.py")
    base, derived = text.split(f"## {name}/derived.py\n")
    assert "| `arch` | `'r3d'` | which backbone |" in base
    assert "| `batch` | `8` | The batch, over all hosts. |" in base
    assert "| `uncommented` | `True` |  |" in base
    assert "| `ref` | `None` | a path \\| or None |" in base
    assert "| `sub.*` |  | the section |" in base and "| `sub.kind` | `'a'` |  |" in base
    assert "| `sub.depth` | `3` | layers in the section |" in base
    assert "| `extra.a` | `1` | first |" in base and "| `extra.b` | `'x'` |  |" in base
    assert "Arguments: `get_config(arg_string='fold=1')`" in derived
    assert "A derived config with arguments." in derived and "More text" not in derived
    assert "| `arch` | **`'c3d'`** | which backbone |" in derived
    assert "| `lr` | **`0.5`** | learning rate |" in derived  # the base's comment is kept
    assert "| `batch` | **`2`** | smaller batch here |" in derived  # its own comment wins
    assert "| `sub.depth` | **`5`** | layers in the section |" in derived
    assert "| `added` | **`'new'`** | only in derived |" in derived
    assert "| `uncommented` | `True` |  |" in derived


def test_check_mode_reports_a_stale_file(configs_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "reference.md"
    args = ["--configs_dir", str(configs_dir), "--output", str(output)]
    assert config_reference.main([*args, "--check"]) == 1  # missing
    config_reference.main(args)
    assert config_reference.main([*args, "--check"]) == 0
    output.write_text(output.read_text().replace("which backbone", "old text"))
    capsys.readouterr()
    assert config_reference.main([*args, "--check"]) == 1
    err = capsys.readouterr().err
    assert "python -m vcp_jax.config_reference" in err and "-| `arch` |" in err


def test_get_config_with_a_required_argument_is_a_clear_error(configs_dir: Path) -> None:
    (configs_dir / "needs.py").write_text("def get_config(arg_string):\n    return None\n")
    with pytest.raises(ValueError, match=r"needs.py: get_config needs \['arg_string'\]"):
        config_reference.render(configs_dir)
