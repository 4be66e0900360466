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
    # Fails when the file is stale (run `python -m vcp_jax.config_reference`), and when a key
    # the reference lists has no meaning (add a comment where it is set; stderr names it).
    status = config_reference.main(["--check"])
    assert status == 0, capsys.readouterr().err


def part(text: str, section: str) -> str:
    """The `## configs/<section>.py` part of the reference."""
    return text.split(f"## configs/{section}.py\n")[1].split("\n## ")[0]


def row(text: str, section: str, key: str) -> str:
    """The table row of `key` in the `## configs/<section>.py` part of the reference."""
    (line,) = [line for line in part(text, section).splitlines()
               if line.startswith(f"| `{key}` |")]
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
    # Every key the code reads is declared: the device prefetch the training loop reads.
    assert "ahead of the step" in row(text, "default", "prefetch_to_device")
    assert "TFDS builder config" in row(text, "default", "data.builder_config")
    # A derived config lists only what it changes, and what it drops.
    retrieval = part(text, "retrieval")
    assert "`bn_recalibration`" not in retrieval and "`data.num_threads`" not in retrieval
    assert "it drops `checkpoint_every_steps`, `cloze.*`" in retrieval
    assert "| `model.arch` | **`'c3d'`** |" in part(text, "pretrain_c3d")
    assert "Changes over `configs/default.py`: none." in part(text, "pretrain_r3d")
    # A stage of the demo is compared with default.py too, and keys without a comment of their
    # own in the demo take the meaning of the same key elsewhere.
    demo = part(text, "demo")
    assert "`finetune.cloze.clip_len`" not in demo  # as in default.py
    assert "JPEG-decoding threads per host" in row(text, "demo", "finetune.data.num_threads")


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
                "kind": "a",  # its kind
            })


        def get_config(arch="r3d"):
            config = ml_collections.ConfigDict()
            config.arch = arch  # which backbone
            config.lr = 0.1  # learning rate
            # The batch, over
            # all hosts.
            config.batch = 8

            config.uncommented = True
            config.explained = False  # explained
            config.gone = 1  # not in derived
            config.ref = ml_collections.config_dict.placeholder(str)  # a path | or None
            config.sub = _section()  # the section
            config.extra = ml_collections.ConfigDict(dict(
                a=1,  # first
                b="x",  # second
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
            config.explained = False  # now in other words
            del config["gone"]
            return config
        '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield directory
    for name in [m for m in sys.modules if m.split(".")[0] == package]:
        del sys.modules[name]


def test_generator_on_a_configs_package(configs_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "reference.md"
    # Written, but the status is 1: `uncommented` has no meaning.
    assert config_reference.main(["--configs_dir", str(configs_dir), "--output", str(output)]) == 1
    name = configs_dir.name
    err = capsys.readouterr().err
    assert "1 config keys have no meaning" in err and f"{name}/default.py: uncommented" in err
    text = output.read_text()
    assert text.index(f"## {name}/default.py") < text.index(f"## {name}/derived.py")
    base, derived = text.split(f"## {name}/derived.py\n")
    assert "| `arch` | `'r3d'` | which backbone |" in base
    assert "| `batch` | `8` | The batch, over all hosts. |" in base
    assert "| `uncommented` | `True` |  |" in base
    assert "| `ref` | `None` | a path \\| or None |" in base
    assert "| `sub.*` |  | the section |" in base and "| `sub.kind` | `'a'` | its kind |" in base
    assert "| `sub.depth` | `3` | layers in the section |" in base
    assert "| `extra.a` | `1` | first |" in base and "| `extra.b` | `'x'` | second |" in base
    assert "Arguments: `get_config(arg_string='fold=1')`" in derived
    assert "A derived config with arguments." in derived and "More text" not in derived
    assert "| `arch` | **`'c3d'`** | which backbone |" in derived
    assert "| `lr` | **`0.5`** | learning rate |" in derived  # the base's comment is kept
    assert "| `batch` | **`2`** | smaller batch here |" in derived  # its own comment wins
    assert "| `sub.depth` | **`5`** | layers in the section |" in derived
    assert "| `sub.*` |  | the section |" in derived  # above a changed key
    assert "| `added` | **`'new'`** | only in derived |" in derived
    assert "| `explained` | `False` | now in other words |" in derived  # a meaning of its own
    # Unchanged keys are left out, dropped ones named.
    assert "`uncommented`" not in derived and "`ref`" not in derived and "`extra." not in derived
    assert "it drops `extra.*`" not in derived and "it drops `gone`" in derived


def test_a_stage_section_is_compared_with_the_base(configs_dir: Path, tmp_path: Path) -> None:
    """A section holding a whole stage's config (a `task` key), as the demo's: its keys are
    compared with the base config's, and take their meanings where it has none."""
    (configs_dir / "default.py").write_text(
        (configs_dir / "default.py").read_text().replace(
            "config.uncommented = True", "config.uncommented = True  # now commented"))
    (configs_dir / "combo.py").write_text(textwrap.dedent(f'''\
        """Stages."""
        import ml_collections

        from {configs_dir.name} import default


        def get_config():
            config = ml_collections.ConfigDict()
            stage = default.get_config()
            stage.lr = 0.2
            stage.task = "train"  # what the stage runs
            config.stage = stage
            return config
        '''))
    output = tmp_path / "reference.md"
    assert config_reference.main(["--configs_dir", str(configs_dir), "--output", str(output)]) == 0
    combo = output.read_text().split(f"## {configs_dir.name}/combo.py\n")[1].split("\n## ")[0]
    assert "| `stage.lr` | **`0.2`** | learning rate |" in combo  # followed through `stage`
    assert "| `stage.task` | **`'train'`** | what the stage runs |" in combo
    assert "`stage.arch`" not in combo and "`stage.batch`" not in combo  # as in the base
    assert "drops" not in combo


def test_check_mode_reports_a_stale_file(configs_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (configs_dir / "default.py").write_text(
        (configs_dir / "default.py").read_text().replace(
            "config.uncommented = True", "config.uncommented = True  # now commented"))
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


# --- data.config, renamed data.builder_config ---------------------------------------------------


def test_the_old_data_config_key_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    """`data.config` (renamed `data.builder_config`) still works for a release, with a message:
    set in a config file, on the command line, or read by `datasets` from a section that was not
    migrated."""
    from configs import default
    from vcp_jax import config_utils, datasets

    config_utils._told.clear()
    config = default.get_config()
    config.demo_stage = default.get_config()
    config.data.config = "split2_48x64"  # a config file that was not updated
    config.demo_stage.data.config = "split3"
    config.lock()
    assert datasets.builder_config(config.data) == "split2_48x64"  # read before migration
    config_utils.migrate_deprecated_keys(config)
    assert config.data.builder_config == "split2_48x64" and "config" not in config.data
    assert config.demo_stage.data.builder_config == "split3"
    assert datasets.fold_of(config.demo_stage.data) == 3
    assert config_utils.migrate_deprecated_keys(config) is config  # idempotent
    err = capsys.readouterr().err
    assert err.count("config.data.config (set in the config") == 1  # said once
    assert "use config.demo_stage.data.builder_config" in err

    # A command-line override of the new key wins over a config file's old one.
    config = default.get_config()
    config.data.config = "split2"
    config.data.builder_config = "split3"  # from --config.data.builder_config=split3
    config_utils.migrate_deprecated_keys(config, ["data.builder_config"])
    assert config.data.builder_config == "split3" and "config" not in config.data

    argv = ["main.py", "--config", "c.py", "--config.data.config=split2",
            "--config.finetune.data.config", "split3", "--config.data.config_x=1", "--",
            "--config.data.config=kept"]
    assert config_utils.rename_deprecated_overrides(argv) == [
        "main.py", "--config", "c.py", "--config.data.builder_config=split2",
        "--config.finetune.data.builder_config", "split3", "--config.data.config_x=1", "--",
        "--config.data.config=kept"]
    assert config_utils.override_keys(argv) == [
        "data.builder_config", "finetune.data.builder_config", "data.config_x"]
    assert "config.finetune.data.config (on the command line) is deprecated" in (
        capsys.readouterr().err)
