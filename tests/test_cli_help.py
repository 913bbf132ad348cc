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
