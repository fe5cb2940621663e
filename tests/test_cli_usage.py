"""Every command line: -h works, and a usage error is one `error:` line with exit code 2."""

import pytest
from click.testing import CliRunner

from bench.cli import main as bench_main
from mobilemoe_mlx.chat.cli import main as chat_main
from mobilemoe_mlx.checkpoints.convert_cli import main as convert_main
from mobilemoe_mlx.checkpoints.synthetic import main as synthetic_main

COMMANDS = {
    "convert": (convert_main, []),
    "chat": (chat_main, []),
    "synthetic": (synthetic_main, []),
    "bench run": (bench_main, ["run"]),
    "bench report": (bench_main, ["report"]),
    "bench plan": (bench_main, ["plan"]),
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_bad_option_is_one_line_and_exit_2(name):
    command, prefix = COMMANDS[name]
    result = CliRunner().invoke(command, [*prefix, "--no-such-option"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No such option"), result.stderr
    assert "Usage:" not in result.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_h_prints_the_help(name):
    command, prefix = COMMANDS[name]
    result = CliRunner().invoke(command, [*prefix, "-h"])
    assert result.exit_code == 0 and result.stdout.startswith("Usage:"), result.output


def _listed_commands(help_text: str) -> list:
    """The command names of a click group's help, from its "Commands:" section."""
    section = help_text.split("\nCommands:\n", 1)[1]
    return [line.split()[0] for line in section.splitlines()
            if line.startswith("  ") and not line.startswith("   ")]


def test_bench_without_a_command_shows_its_commands():
    result = CliRunner().invoke(bench_main, [])
    assert result.exit_code == 2
    assert "error:" not in result.stderr
    assert result.stderr.startswith("Usage:")
    assert sorted(_listed_commands(result.stderr)) == sorted(bench_main.commands)
