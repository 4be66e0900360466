"""Writes docs/configuration.md: every key of every config in configs/, its default and meaning.

    python -m vcp_jax.config_reference           # rewrite docs/configuration.md
    python -m vcp_jax.config_reference --check   # exit 1 if it is stale (a test runs this)

Defaults come from calling each config's `get_config()` with no argument, so they include the
config's own overrides. Meanings come from the source, read with `ast` and `tokenize` and never
executed: the trailing `# comment` on the line that sets a key, else the comment lines right
above it. A key takes the last meaning found along the chain that builds it (the config, the
config it derives from via `config = default.get_config(...)`, and functions that build a
section such as `config.cloze = cloze.default_config()`), so an override without a comment keeps
the base config's explanation; a local variable assigned into the config (`config.finetune = ft`)
is followed too, and a key of a stage section without a comment of its own takes the meaning of
the same key in the configs. `default.py` is listed whole, every other config only with what it
adds or changes. A listed key without any meaning is an error (exit status 1, the key named), so
the test that keeps docs/configuration.md current fails on it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import importlib.util
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import ml_collections

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
OUTPUT = REPO_ROOT / "docs" / "configuration.md"
COMMAND = "python -m vcp_jax.config_reference"
# Only the project's own code is read for comments (configs, and vcp_jax's section builders).
FOLLOWED_PACKAGES = ("vcp_jax",)
_CONFIG_CALLS = ("ConfigDict", "dict")  # calls whose keyword/dict arguments are config keys
SECTION = object()  # the "default" of a row that describes a whole section (`optimizer.*`)


# --- reading comments out of the source ----------------------------------------------------------


@dataclasses.dataclass
class SourceFile:
    """One parsed module: its syntax tree, its comments by line, and its imported names."""

    path: Path
    tree: ast.Module
    trailing: dict[int, str]  # line -> a comment after code on that line
    full_line: dict[int, str]  # line -> a comment alone on its line
    imports: dict[str, str]  # local name -> module (`from vcp_jax import cloze` -> vcp_jax.cloze)
    functions: dict[str, ast.FunctionDef]

    @classmethod
    def read(cls, path: Path) -> SourceFile:
        text = path.read_text()
        trailing, full_line = {}, {}
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                line = token.start[0]
                comment = token.string.lstrip("#").strip()
                if token.line[: token.start[1]].strip():
                    trailing[line] = comment
                else:
                    full_line[line] = comment
        tree = ast.parse(text, filename=str(path))
        imports = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    imports[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    imports[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
        functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        return cls(path, tree, trailing, full_line, imports, functions)

    def meaning(self, first: int, last: int) -> str:
        """The comment for code on lines first..last: trailing on its first or last line (lines
        in between belong to nested items), else the comment block right above it."""
        for line in (first, last):
            if line in self.trailing:
                return self.trailing[line]
        block = []
        line = first - 1
        while line in self.full_line:
            block.append(self.full_line[line])
            line -= 1
        return " ".join(reversed(block))


class MeaningCollector:
    """Walks the functions that build a config and records each key's comment."""

    def __init__(self, packages: Sequence[str]):
        self.packages = tuple(packages)
        self.meanings: dict[str, str] = {}
        self._sources: dict[Path, SourceFile] = {}
        self._seen: set[tuple[Path, str, str]] = set()

    def function(self, path: Path, name: str, prefix: str = "") -> None:
        """Records the keys that function `name` of `path` sets, under `prefix` ('' or 'a.')."""
        if (path, name, prefix) in self._seen:
            return
        self._seen.add((path, name, prefix))
        source = self._sources.get(path) or self._sources.setdefault(path, SourceFile.read(path))
        func = source.functions.get(name)
        if func is None:
            return
        # The names that hold the config: the returned one, and locals assigned into it
        # (`config.finetune = ft` makes `ft.data.crop_size` the key `finetune.data.crop_size`).
        roots = {n.value.id: prefix for n in ast.walk(func)
                 if isinstance(n, ast.Return) and isinstance(n.value, ast.Name)}
        grown = True
        while grown:
            grown = False
            for node in _statements(func.body):
                if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Name)
                        and node.value.id not in roots):
                    continue
                for target in node.targets:
                    chain = _key_chain(target)
                    if chain is not None and len(chain) > 1 and chain[0] in roots:
                        roots[node.value.id] = roots[chain[0]] + ".".join(chain[1:]) + "."
                        grown = True
                        break
        for node in _statements(func.body):
            if isinstance(node, ast.Return) and node.value is not None:
                self._value(source, node.value, prefix)
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, ast.AnnAssign) else [])
            for target in targets:
                chain = _key_chain(target)
                if chain is None or chain[0] not in roots or node.value is None:
                    continue
                root = roots[chain[0]]
                key = root + ".".join(chain[1:])
                if len(chain) > 1:
                    self._record(key, source.meaning(node.lineno, node.end_lineno or node.lineno))
                self._value(source, node.value, f"{key}." if len(chain) > 1 else root)

    def _value(self, source: SourceFile, value: ast.expr, prefix: str) -> None:
        """Keys inside a value: a ConfigDict/dict literal, or a call to a builder we can read."""
        if isinstance(value, ast.Dict):
            for key, item in zip(value.keys, value.values, strict=True):
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    self._item(source, prefix + key.value, key.lineno, item)
        elif isinstance(value, ast.Call):
            callee = _dotted(value.func)
            if callee and callee.split(".")[-1] in _CONFIG_CALLS:
                for arg in value.args[:1]:
                    self._value(source, arg, prefix)
                for keyword in value.keywords:
                    if keyword.arg:
                        self._item(source, prefix + keyword.arg, keyword.lineno, keyword.value)
            elif callee:
                self._follow(source, callee, prefix)

    def _item(self, source: SourceFile, key: str, line: int, value: ast.expr) -> None:
        self._record(key, source.meaning(line, value.end_lineno or line))
        self._value(source, value, f"{key}.")

    def _follow(self, source: SourceFile, callee: str, prefix: str) -> None:
        """Reads `module.function` (imported from a followed package) or a local function."""
        *module, name = callee.split(".")
        if not module:
            self.function(source.path, name, prefix)
            return
        qualified = source.imports.get(module[0])
        if qualified is None:
            return
        qualified = ".".join([qualified, *module[1:]])
        if qualified.split(".")[0] not in self.packages:
            return
        spec = importlib.util.find_spec(qualified)
        if spec is not None and spec.origin and spec.origin.endswith(".py"):
            self.function(Path(spec.origin), name, prefix)

    def _record(self, key: str, meaning: str) -> None:
        if meaning or key not in self.meanings:
            self.meanings[key] = meaning


def _statements(body: Sequence[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements in source order, including those nested in if/for/with/try blocks."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody"):
            yield from _statements(getattr(node, field, []))
        for handler in getattr(node, "handlers", []):
            yield from _statements(handler.body)


def _key_chain(target: ast.expr) -> list[str] | None:
    """`config.data.name` or `config["data"].name` -> ['config', 'data', 'name']."""
    parts = []
    while True:
        if isinstance(target, ast.Attribute):
            parts.append(target.attr)
            target = target.value
        elif (isinstance(target, ast.Subscript) and isinstance(target.slice, ast.Constant)
              and isinstance(target.slice.value, str)):
            parts.append(target.slice.value)
            target = target.value
        elif isinstance(target, ast.Name):
            return [target.id, *reversed(parts)]
        else:
            return None


def _dotted(node: ast.expr) -> str | None:
    chain = _key_chain(node)
    return ".".join(chain) if chain else None


# --- defaults ------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConfigReference:
    """What the reference shows for one config file."""

    path: Path
    summary: str
    signature: str
    rows: list[tuple[str, Any, str]]  # (key, default or SECTION, meaning), sorted by key
    stages: tuple[str, ...] = ()  # sections that are whole stage configs (they hold a `task`)


def load_config(configs_dir: Path, stem: str) -> tuple[ml_collections.ConfigDict, str]:
    """Imports `<package>.<stem>` (the package is the folder's name) and calls `get_config()`."""
    module = importlib.import_module(f"{configs_dir.name}.{stem}")
    get_config = module.get_config
    signature = inspect.signature(get_config)
    required = [p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if required:
        raise ValueError(f"{configs_dir.name}/{stem}.py: get_config needs {required}; give them "
                         "defaults so that the reference can show the plain config")
    return get_config(), str(signature).split(" ->")[0]


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in config.keys():  # ConfigDict keys come sorted
        value = config[key]  # resolves FieldReferences
        if isinstance(value, ml_collections.ConfigDict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def describe(configs_dir: Path, stem: str) -> ConfigReference:
    config, signature = load_config(configs_dir, stem)
    path = configs_dir / f"{stem}.py"
    collector = MeaningCollector((configs_dir.name, *FOLLOWED_PACKAGES))
    collector.function(path, "get_config")
    rows: list[tuple[str, Any, str]] = []
    sections: set[str] = set()
    for key, value in flatten(config):
        parts = key.split(".")
        for i in range(1, len(parts)):  # a commented section gets a row before its first key
            section = ".".join(parts[:i])
            if section not in sections:
                sections.add(section)
                if collector.meanings.get(section):
                    rows.append((f"{section}.*", SECTION, collector.meanings[section]))
        rows.append((key, value, collector.meanings.get(key, "")))
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    summary = " ".join(docstring.split("\n\n")[0].split())
    stages = tuple(k for k, v in config.items()
                   if isinstance(v, ml_collections.ConfigDict) and "task" in v)
    return ConfigReference(path, summary, signature if signature != "()" else "", rows, stages)


def fill_stage_meanings(references: Sequence[ConfigReference]) -> None:
    """A key of a stage section (the demo's `finetune.data.crop_size`) without a comment of its
    own takes the meaning of the same key (`data.crop_size`) in the configs, or in another stage
    section: `default.py`'s first, then the others' in order."""
    known: dict[str, str] = {}
    for ref in references:
        for key, _, meaning in ref.rows:
            stage, _, rest = key.partition(".")
            for name in (key, rest) if stage in ref.stages else (key,):
                if meaning and name not in known:
                    known[name] = meaning
    for ref in references:
        for i, (key, value, meaning) in enumerate(ref.rows):
            stage, _, rest = key.partition(".")
            if not meaning and stage in ref.stages and rest in known:
                ref.rows[i] = (key, value, known[rest])


# --- rendering -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Shown:
    """The rows of one config as the reference shows them, against the base config."""

    rows: list[tuple[str, Any, str, bool]]  # (key, value or SECTION, meaning, changed)
    dropped: list[str]  # keys (or `section.*`) of the base config that this one removes


def shown_rows(ref: ConfigReference, base: ConfigReference | None) -> Shown:
    """Every row of the base config; of another, only what it adds or changes over the base: a
    value, or a meaning of its own. A stage section (the demo's `finetune.*`) is compared with the
    base config key by key (`finetune.data.crop_size` with `data.crop_size`), by value."""
    if base is None or ref is base:
        return Shown([(k, v, m, False) for k, v, m in ref.rows], [])
    base_values = {k: v for k, v, _ in base.rows if v is not SECTION}
    base_meanings = {k: m for k, _, m in base.rows}
    rows = []
    for key, value, meaning in ref.rows:
        if value is SECTION:
            rows.append((key, value, meaning, False))
            continue
        stage, _, rest = key.partition(".")
        if stage in ref.stages:
            changed = rest not in base_values or base_values[rest] != value
            show = changed
        else:
            changed = key not in base_values or base_values[key] != value
            show = changed or meaning != base_meanings.get(key, "")
        if show:
            rows.append((key, value, meaning, changed))
    # A section row only where a key below it is shown.
    keys = [k for k, v, _, _ in rows if v is not SECTION]
    rows = [r for r in rows if r[1] is not SECTION
            or any(k.startswith(r[0][:-1]) for k in keys)]
    own = [k for k, v, _ in ref.rows if v is not SECTION]
    # Dropped: a base key that is gone, not replaced by a section of that name, in a config
    # that derives from the base (a config made of stage sections does not).
    gone = [] if ref.stages else [
        k for k in base_values if k not in own and not any(o.startswith(k + ".") for o in own)]
    dropped = []
    for key in gone:
        section = key.split(".")[0]
        if "." in key and all(k in gone for k in base_values if k.startswith(section + ".")):
            if f"{section}.*" not in dropped:
                dropped.append(f"{section}.*")
        else:
            dropped.append(key)
    return Shown(rows, dropped)


def missing_meanings(references: Sequence[ConfigReference]) -> list[str]:
    """`<folder>/<name>.py: <key>` for each shown key without a meaning."""
    base = references[0] if references and references[0].path.stem == "default" else None
    return [f"{ref.path.parent.name}/{ref.path.name}: {key}"
            for ref in references for key, _, meaning, _ in shown_rows(ref, base).rows
            if not meaning]


def config_stems(configs_dir: Path) -> list[str]:
    """The config files, `default` first (the others derive from it), then by name."""
    stems = sorted(p.stem for p in configs_dir.glob("*.py") if p.stem != "__init__")
    return sorted(stems, key=lambda s: s != "default")


def references_of(configs_dir: Path = CONFIGS_DIR) -> list[ConfigReference]:
    references = [describe(configs_dir, stem) for stem in config_stems(configs_dir)]
    fill_stage_meanings(references)
    return references


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(value: Any) -> str:
    if value is SECTION:
        return ""
    text = repr(value)
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return _cell(f"{fence}{pad}{text}{pad}{fence}")


def render(configs_dir: Path = CONFIGS_DIR,
           references: Sequence[ConfigReference] | None = None) -> str:
    references = references_of(configs_dir) if references is None else references
    base = references[0] if references and references[0].path.stem == "default" else None
    folder = configs_dir.name
    intro = (
        f"Every key of every config in `{folder}/`, with its default and what it means (the "
        "comment where it is set, in the config or in the config it derives from)."
        + (f" `{folder}/default.py` is listed whole; every other config lists only what it adds "
           f"or changes over it: a value (in bold) or a meaning of its own, and the keys it "
           f"drops; every key it does not list is as in `{folder}/default.py`. A section that "
           f"is a whole stage's config (the demo's `pretrain.*`, `finetune.*`, ...) is compared "
           f"with `{folder}/default.py` in the same way." if base else "")
        + " Override any key on the command line, e.g. `--config.batch_size=64`. A config that "
        "takes arguments gets them after a colon, `--config configs/<name>.py:<arguments>`; "
        "the installed `vcp-jax` command also accepts a bare name, `--config <name>`. "
        f"`{folder}` ships as a top-level package in the wheel because the configs import each "
        f"other as `from {folder} import default`."
    )
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated by `{COMMAND}` from {folder}/*.py: do not edit by hand. -->",
        "",
        textwrap.fill(intro, width=100, break_on_hyphens=False, break_long_words=False),
        "",
    ]
    lines += [f"- [`{folder}/{r.path.name}`](#{_anchor(f'{folder}/{r.path.name}')}): {r.summary}"
              for r in references]
    for ref in references:
        shown = shown_rows(ref, base)
        lines += ["", f"## {folder}/{ref.path.name}", ""]
        if ref.summary:
            lines += [ref.summary, ""]
        if ref.signature:
            lines += [f"Arguments: `get_config{ref.signature}`", ""]
        if base is not None and ref is not base:
            if not shown.rows and not shown.dropped:
                lines.append(f"Changes over `{folder}/default.py`: none.")
                continue
            lines += [f"Changes over `{folder}/default.py`"
                      + (f"; it drops {', '.join(f'`{k}`' for k in shown.dropped)}"
                         if shown.dropped else "") + ":", ""]
        lines += ["| key | default | meaning |", "|---|---|---|"]
        for key, value, meaning, changed in shown.rows:
            cell = f"**{_code(value)}**" if changed else _code(value)
            lines.append(f"| `{key}` | {cell} | {_cell(meaning)} |")
    return "\n".join(lines) + "\n"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    kept = "".join(c for c in heading.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1, with a diff, if the output file is not current")
    parser.add_argument("--configs_dir", type=Path, default=CONFIGS_DIR)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    root = str(args.configs_dir.resolve().parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # the configs import each other as a package
    references = references_of(args.configs_dir)
    text = render(args.configs_dir, references)
    status = 0
    missing = missing_meanings(references)
    if missing:
        print(f"{len(missing)} config keys have no meaning; add a comment where each is set (on "
              "its line, or the lines right above it):\n  " + "\n  ".join(missing),
              file=sys.stderr)
        status = 1
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current == text:
            return status
        diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(args.output),
                                    "generated", lineterm="", n=0)
        print(f"{args.output} is stale; regenerate it with `{COMMAND}`:", file=sys.stderr)
        print("\n".join(list(diff)[:60]), file=sys.stderr)
        return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} ({len(text.splitlines())} lines)")
    return status


if __name__ == "__main__":
    sys.exit(main())
