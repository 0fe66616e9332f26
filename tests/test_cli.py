"""The one `vrex` command: every area's commands register, and help works."""

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
