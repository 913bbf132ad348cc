"""The top-level --help lists every command with its whole first sentence, never cut with '...' (issue 16)."""

from __future__ import annotations

from click.testing import CliRunner

from williw.cli import cli


def test_top_level_help_keeps_every_description_whole():
    out = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    listed = "".join(out.split("Commands:")[1].split())  # wrapping may break at spaces and hyphens
    assert "..." not in listed
    for name, cmd in cli.commands.items():
        first = "".join(cmd.get_short_help_str(limit=10_000).split())
        assert f"{name}{first}" in listed, name


def test_a_usage_error_is_one_line_naming_the_command_and_its_help(williw, tmp_path):
    done = williw("split", str(tmp_path), "--plan", str(tmp_path / "plan.json"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == ("error: williw split: give either --node ID (repeatable) or --all "
                           "(see 'williw split --help')\n")
    done = williw("plan")
    assert (done.returncode, done.stderr) == (2, "error: williw plan: Missing argument 'METADATA' "
                                                 "(see 'williw plan --help')\n")


def test_williw_alone_prints_the_help_laid_out(williw):
    # A usage error, but its message is the whole help: one line of it was 2,000 characters of squeezed columns.
    done = williw()
    expected = CliRunner().invoke(cli, ["--help"], terminal_width=80).output
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("Usage: williw [OPTIONS] COMMAND [ARGS]...\n")
    assert done.stderr.splitlines()[-1] == expected.splitlines()[-1]
    assert "  plan " in done.stderr
