"""The ``williw`` command. Each command parses its options, calls one library function and prints.

Command modules import the library inside the command body, so that ``williw metadata`` never pays for
fastapi, torch or transformers at start-up.
"""

from __future__ import annotations

import importlib

import click

from williw.cli._output import run_main

# One module per command family; each defines click commands decorated with @cli.command.
COMMAND_MODULES = ("metadata", "plan", "replan", "show", "split", "hub", "worker", "verify", "run", "generate")


class _Group(click.Group):
    """Lists each command with its whole first sentence, wrapped, where click cuts it to the terminal's width."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="williw")
def cli() -> None:
    """Cut a Hugging Face model into per-node shards by the compute and memory of the nodes."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"williw.cli.{_name}")


def main() -> None:
    run_main(cli)
