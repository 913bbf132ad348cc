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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="williw")
def cli() -> None:
    """Cut a Hugging Face model into per-node shards by the compute and memory of the nodes."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"williw.cli.{_name}")


def main() -> None:
    run_main(cli)
