"""Every setting is declared once (relex_callback/config.py: SETTINGS) and everything that lists the settings follows
that declaration: RelexCallback's explicit signature, RelexSettings and validate, RelexConfig, the callback's docstring,
the `relex` flags that take a setting, and the pages that show them (docs/callback.md, docs/cli.md). Also: no internal
function of the package takes a long list of loose parameters (an object such as the settings carries them).

The generated blocks of the docs are rewritten with ``python tests/test_settings.py --write``."""

import argparse
import ast
import dataclasses
import inspect
import os
import re
import sys

import pytest

from relex_callback.config import (DEFAULTS, REQUIRED, SETTING, SETTINGS, SETTINGS_DOC, RelexConfig, RelexSettings,
                                   cli_argument)
from relex_callback.errors import RelexInputError
from relex_callback.offline.cli import build_parser
from relex_callback.trainer.callback import RelexCallback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "relex_callback")
CALLBACK_MD = os.path.join(ROOT, "docs", "callback.md")
CLI_MD = os.path.join(ROOT, "docs", "cli.md")
BEGIN, END = "<!-- generated from relex_callback/config.py SETTINGS: begin -->", "<!-- generated: end -->"

# More parameters than this make a function take an object (the settings, a frozen dataclass of its part) instead.
MAX_PARAMETERS = 10
# Functions allowed more, each with the reason.
ALLOWED = {
    "relex_callback/trainer/callback.py:RelexCallback.__init__":
        "public API: the callback's arguments spelled out for editors and help(); test_settings holds them to SETTINGS",
    "relex_callback/offline/api.py:extrapolate_checkpoints":
        "public API: users' keywords kept; gathered into one OfflineOptions at once",
    "relex_callback/offline/api.py:extrapolate_trajectory":
        "public API: users' keywords kept; gathered into one OfflineOptions at once",
    "relex_callback/core/kernels/triton_ops.py:_gram_tile": "Triton kernel: scalar and constexpr arguments only",
    "relex_callback/core/kernels/triton_ops.py:_gram_kernel": "Triton kernel: scalar and constexpr arguments only",
    "relex_callback/core/kernels/triton_ops.py:_project_tile": "Triton kernel: scalar and constexpr arguments only",
    "relex_callback/core/kernels/triton_ops.py:_project_kernel": "Triton kernel: scalar and constexpr arguments only",
    "relex_callback/trajectory/store.py:TrajectoryStore.__init__":
        "the store's construction (tensors, rows, tier, directory, fold); not settings: the window passes its parts",
    "relex_callback/trajectory/persist.py:load":
        "the store's loader, the constructor's arguments plus what a resume checks",
    "relex_callback/trajectory/window.py:open_window":
        "takes the settings object already; the rest are the live run's objects (topology, trainer args, optimizer)",
    "relex_callback/core/fit.py:select_family":
        "arrays of the backtest and three fit options; the core's math, called once",
}


def _parameters(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [f"*{a.vararg.arg}"] if a.vararg else []
    names += [f"**{a.kwarg.arg}"] if a.kwarg else []
    return names[1:] if names and names[0] in ("self", "cls") else names


def _functions():
    """(``path:Qualified.name``, parameter names) of every function of the package."""
    for root, _, files in os.walk(PACKAGE):
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, ROOT)

            def walk(node, prefix):
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        yield f"{rel}:{prefix}{child.name}", _parameters(child)
                        yield from walk(child, f"{prefix}{child.name}.")
                    elif isinstance(child, ast.ClassDef):
                        yield from walk(child, f"{prefix}{child.name}.")
                    else:
                        yield from walk(child, prefix)

            with open(path) as fh:
                yield from walk(ast.parse(fh.read()), "")


def test_no_internal_function_takes_a_long_list_of_parameters():
    found = dict(_functions())
    long = {name: len(ps) for name, ps in found.items() if len(ps) > MAX_PARAMETERS and name not in ALLOWED}
    assert not long, (f"functions with more than {MAX_PARAMETERS} parameters (pass the settings or a frozen "
                      f"dataclass of the part they use): {long}")
    stale = [name for name in ALLOWED if name not in found or len(found[name]) <= MAX_PARAMETERS]
    assert not stale, f"allowed but gone or short now: drop them from ALLOWED: {stale}"


def test_the_parameter_count_sees_a_long_signature():
    fn = ast.parse("def f(a, b, c, d, e, f, g, h, i, j, k, *, l=1, **m): pass").body[0]
    assert len(_parameters(fn)) == 13
    method = ast.parse("class C:\n    def g(self, a): pass").body[0].body[0]
    assert _parameters(method) == ["a"]


# ------------------------------------------------------------------------------------------------ the callback
def test_callback_signature_is_the_declaration():
    """RelexCallback.__init__ spells out every setting (editors show the arguments): the same names, order and
    defaults as SETTINGS; parameters after them, if any, are not settings."""
    params = [p for p in inspect.signature(RelexCallback.__init__).parameters.values() if p.name != "self"]
    head = params[:len(SETTINGS)]
    assert [p.name for p in head] == [s.name for s in SETTINGS]
    for p, s in zip(head, SETTINGS):
        want = inspect.Parameter.empty if s.default is REQUIRED else s.default
        assert p.default == want, f"{s.name}: the callback's default {p.default!r}, the declaration's {want!r}"
    assert not [p.name for p in params[len(SETTINGS):] if p.name in SETTING]


def test_callback_passes_every_argument_to_validate():
    """Each argument reaches the settings (a value other than the default, read back)."""
    cb = RelexCallback(tcut=8, horizons="16,32", stride=2, fit_start=4, rank=2, storage="host", dtype="float32",
                       max_buffer_bytes="1GB", stop_training=False, output_dir="/tmp/x", include=["a"], exclude=["b"],
                       solver="gram", overwrite=True, max_shard_size="1GB", fold_rank=3, buffer_slots=3,
                       on_nonfinite="skip", merge_lora=True, fit="polynomial", fit_window=3, degree=1,
                       on_flat_reward="ignore", reward_metric="r", evaluate_horizons=True, keep_best=1,
                       fit_clock="steps")
    s = cb.settings
    assert (s.tcut, s.horizons, s.stride, s.fit_start, s.rank, s.storage, s.dtype) == (8, (16, 32), 2, 4, 2, "host",
                                                                                        "float32")
    assert (s.max_buffer_bytes, s.stop_training, s.output_dir, s.include, s.exclude, s.solver) == (
        10**9, False, "/tmp/x", ("a",), ("b",), "gram")
    assert (s.overwrite, s.max_shard_size, s.fold_rank, s.buffer_slots, s.on_nonfinite, s.merge_lora) == (
        True, 10**9, 3, 3, "skip", True)
    assert (s.fit, s.fit_window, s.degree, s.on_flat_reward, s.reward_metric, s.evaluate_horizons, s.keep_best,
            s.fit_clock) == ("polynomial", 3, 1, "ignore", "r", True, 1, "steps")


def test_settings_and_config_fields_are_the_declaration():
    assert [f.name for f in dataclasses.fields(RelexSettings)] == [s.name for s in SETTINGS] + ["auto_horizons"]
    fields = dataclasses.fields(RelexConfig)
    assert [f.name for f in fields] == [f"relex_{s.name}" for s in SETTINGS]
    for f, s in zip(fields, SETTINGS):
        assert f.default == (None if s.default is REQUIRED else s.default)
        assert f.metadata["help"] == s.help
    # the stored defaults are the validated form of the arguments' defaults
    assert RelexSettings.validate(tcut=4, horizons=[8]) == RelexSettings(tcut=4, horizons=(8,))


def test_validate_takes_the_declared_names_only():
    assert list(inspect.signature(RelexSettings.validate).parameters) == [s.name for s in SETTINGS] + [
        "allow_partial_stride"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'tcutt'"):
        RelexSettings.validate(tcutt=4, horizons=[8])
    with pytest.raises(TypeError, match="'horizons'"):
        RelexSettings.validate(tcut=4)
    with pytest.raises(RelexInputError, match="tcut is required"):
        RelexSettings.validate(tcut=None, horizons=[8])


def test_settings_doc_documents_every_setting_with_its_default():
    heads = re.findall(r"^    (\w+) \((.*)\):$", SETTINGS_DOC, re.M)
    assert [name for name, _ in heads] == [s.name for s in SETTINGS]
    for (name, head), s in zip(heads, SETTINGS):
        shown = s.shown_default
        if s.default is REQUIRED or shown is None:
            assert "defaults to" not in head, name
        else:
            text = f'"{shown}"' if isinstance(shown, str) else str(shown)
            assert head.endswith(f"defaults to `{text}`"), (name, head)
    assert SETTINGS_DOC.strip() in inspect.cleandoc(RelexCallback.__doc__)


# ---------------------------------------------------------------------------------------------------- the CLI
def _subparsers() -> dict:
    p = build_parser()
    return next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices


def _setting_actions():
    """(command, argparse action) of each flag made by cli_argument: every option named after a setting, except
    --horizons, which each command words itself (beyond the last checkpoint, beyond the state's tcut)."""
    for command, sub in _subparsers().items():
        for action in sub._actions:
            if action.dest in SETTING and action.option_strings and action.dest != "horizons":
                yield command, action


def test_cli_flags_of_settings_are_generated_from_the_declaration():
    seen = set()
    for command, action in _setting_actions():
        s = SETTING[action.dest]
        seen.add(s.name)
        assert action.option_strings == ["--" + s.name.replace("_", "-")]
        if isinstance(s.default, bool):
            assert action.default is False and isinstance(action, argparse._StoreTrueAction)
            continue
        if s.default is REQUIRED:
            assert action.required, (command, s.name)
            continue
        assert action.default == (None if s.default is None else str(s.default)), (command, s.name)
        if s.shown_default is not None:
            assert action.help.endswith(f"(default {s.shown_default})"), (command, s.name, action.help)
        for choice in s.choices:
            assert choice in action.help, (command, s.name, choice)
    assert {"tcut", "stride", "rank", "dtype", "storage", "solver", "max_shard_size", "fold_rank", "fit", "degree",
            "fit_clock", "overwrite"} <= seen


def test_cli_shard_default_parses_to_the_settings_default():
    from relex_callback.config import parse_size

    args = build_parser().parse_args(["materialize", "--state", "s", "--base", "b", "--horizons", "9", "--out", "o"])
    assert parse_size(args.max_shard_size) == RelexSettings(tcut=4, horizons=(8,)).max_shard_size
    assert cli_argument("max_shard_size")[1]["default"] == DEFAULTS["max_shard_size"]


# --------------------------------------------------------------------------------------------------- the docs
def _python_block_settings(text: str) -> dict:
    block = text.split("```python\nRelexCallback(\n", 1)[1].split("\n)\n```", 1)[0]
    code = "\n".join(line.split("#", 1)[0] for line in block.splitlines())
    return dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]+),", code))


def test_callback_md_shows_every_argument_with_its_default():
    with open(CALLBACK_MD) as f:
        shown = _python_block_settings(f.read())
    assert sorted(shown) == sorted(SETTING), "docs/callback.md's RelexCallback(...) block lists other arguments"
    for name, text in shown.items():
        if SETTING[name].default is not REQUIRED:
            assert ast.literal_eval(text.strip()) == SETTING[name].default, name


def test_cli_md_prose_states_the_declared_defaults_and_choices():
    """Where docs/cli.md's prose writes a setting's flag with choices (`--storage auto|device|host|disk`) they are
    declared ones; where it writes a value as the default (`--max-shard-size 50GB` (the default ...)) it is the
    declared default."""
    with open(CLI_MD) as f:
        prose = f.read().split(BEGIN, 1)[0]
    checked = 0
    for flag, value, after in re.findall(r"`(--[a-z-]+) ([^`]+)`([^`]{0,20})", prose):
        s = SETTING.get(flag[2:].replace("-", "_"))
        if s is None:
            continue
        if "|" in value:
            assert set(value.split("|")) <= set(s.choices), (flag, value, s.choices)
            checked += 1
        elif "default" in after:
            assert value == str(s.default), (flag, value, s.default)
            checked += 1
    assert checked >= 4


def cli_table() -> str:
    """The table of the `relex` flags that take a setting (generated into docs/cli.md)."""
    rows = {}
    for command, action in _setting_actions():
        rows.setdefault((action.option_strings[0], action.help), [action, []])[1].append(command)
    lines = ["| flag | commands | what (default) | the callback's argument |", "|---|---|---|---|"]
    for (flag, text), (action, commands) in rows.items():
        lines.append(f"| `{flag}` | {', '.join(commands)} | {text} | `{action.dest}` |")
    return "\n".join(lines)


def callback_table() -> str:
    """The table of the callback's arguments (generated into docs/callback.md)."""
    lines = ["| argument | default | `RelexConfig` field | what |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "required" if s.default is REQUIRED else f"`{s.default}`" if not isinstance(s.default, str) else (
            f'`"{s.default}"`')
        lines.append(f"| `{s.name}` | {default} | `relex_{s.name}` | {s.help} |")
    return "\n".join(lines)


def _generated(path: str) -> str:
    with open(path) as f:
        text = f.read()
    assert BEGIN in text and END in text, f"{path} has no generated block"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


@pytest.mark.parametrize("path,table", [(CALLBACK_MD, callback_table), (CLI_MD, cli_table)])
def test_docs_tables_are_generated_from_the_declaration(path, table):
    assert _generated(path) == table(), f"{path} is stale: run python tests/test_settings.py --write"


def _write():
    for path, table in ((CALLBACK_MD, callback_table), (CLI_MD, cli_table)):
        with open(path) as f:
            text = f.read()
        head, rest = text.split(BEGIN, 1)
        with open(path, "w") as f:
            f.write(head + BEGIN + "\n" + table() + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__" and "--write" in sys.argv:
    _write()
