"""The one `vrex` command: every area's commands register, and help works."""

import argparse
import importlib
import json
import subprocess
import sys
import textwrap

import pytest

from vrex.cli import _REGISTRARS, build_parser, main


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for *_, commands in _REGISTRARS:
        for command in commands:
            assert command in out


@pytest.mark.parametrize("command", [c for *_, commands in _REGISTRARS for c in commands])
def test_each_command_builds_alone_and_has_help(command, capsys):
    # only the command's own module is imported: its help must not need the others
    parser = build_parser([command])
    with pytest.raises(SystemExit) as done:
        parser.parse_args([command, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vrex " + command)


def test_every_option_of_every_command_has_help():
    def undocumented(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from undocumented(child, f"{path} {name}")
            elif action.option_strings and not action.help:
                yield f"{path} {action.option_strings[0]}"

    assert list(undocumented(build_parser([]), "vrex")) == []


def test_help_loads_no_heavy_module():
    """`vrex --help` and every command's `--help` (sub-commands too) take a blink, not the
    seconds torch and transformers take to import: the handlers import them."""
    # a fresh interpreter, as this one may have imported torch for other tests
    script = textwrap.dedent(
        """
        import argparse, contextlib, io, json, sys
        from vrex.cli import build_parser, main

        def commands(parser, path=()):
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    for name, sub in action.choices.items():
                        yield (*path, name)
                        yield from commands(sub, (*path, name))

        every = [(), *commands(build_parser([]))]
        heavy = ("torch", "transformers", "grpc", "simpy")
        loaded = {}
        for argv in every:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                main([*argv, "--help"])
            loaded[" ".join(argv)] = [m for m in heavy if m in sys.modules]
        print(json.dumps(loaded))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert {"", "run", "bench", "bench fidelity", "sim run", "model info"} <= set(loaded)
    assert all(not heavy for heavy in loaded.values()), loaded


@pytest.mark.parametrize("package", ["vrex.engine", "vrex.kv", "vrex.models"])
def test_lazy_packages_load_every_name_they_list(package):
    # their names load on first use (vrex._lazy): a misspelt entry would only fail when used
    module = importlib.import_module(package)
    assert set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_an_unwritable_output_is_one_line_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the plot folder would be made inside a file
    assert (
        main(["sim", "plot", "--system", "vrex8", "--kv-tokens", "1000", "--out", str(blocker / "plots")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("vrex: error: ") and str(blocker) in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, dest",
    [
        (["run", "--video", "x.mp4", "--ask", "q"], "preset"),
        (["codesign", "--video", "x.mp4"], "preset"),
        (["serve"], "resv_preset"),
    ],
)
def test_the_resv_preset_takes_either_name(argv, dest):
    parser = build_parser(argv[:1])
    for flag in ("--preset", "--resv-preset"):
        assert getattr(parser.parse_args([*argv, flag, "paper"]), dest) == "paper"
