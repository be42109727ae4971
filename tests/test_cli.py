"""The command line as a whole: every command's --help lists the environment knobs, and an option name means one
thing wherever it appears (cli/options.py declares the shared ones once)."""
from __future__ import annotations

from collections.abc import Iterator

import click
from click.testing import CliRunner

from sts_export.cli.main import main
from sts_export.cli.options import ENVIRONMENT

KNOBS = [line.split()[0] for line in ENVIRONMENT.splitlines()[2:]]  # STS_CACHE, ..., HF_HUB_CACHE,
# the same option on purpose with another default or wording: the bench times one method unless asked (show compares
# all), and --image is required where a command cannot make its own
SAME_MEANING = {"--methods", "--image"}


def commands(cmd: click.Command = main, name: str = "sts") -> Iterator[tuple[str, click.Command]]:
    yield name, cmd
    if isinstance(cmd, click.Group):
        for sub, c in cmd.commands.items():
            yield from commands(c, f"{name} {sub}")


def test_every_help_lists_the_environment() -> None:
    assert len(KNOBS) == 8 and KNOBS[0] == "STS_CACHE", KNOBS
    runner = CliRunner()
    for name, _ in commands():
        r = runner.invoke(main, [*name.split()[1:], "--help"])
        assert r.exit_code == 0, (name, r.output)
        missing = [k for k in KNOBS if k.rstrip(",") not in r.output]
        assert not missing, f"`{name} --help` does not list {missing}"


def test_one_option_name_one_meaning() -> None:
    seen: dict[str, dict[tuple[str, str], list[str]]] = {}
    for name, cmd in commands():
        for p in cmd.params:
            if isinstance(p, click.Option):
                for opt in p.opts:
                    seen.setdefault(opt, {}).setdefault((p.name or "", repr(p.type)), []).append(name)
    differ = {opt: v for opt, v in seen.items() if len(v) > 1 and opt not in SAME_MEANING}
    assert not differ, f"option names declared with different parameters or types: {differ}"
    # the shared groups are declared once: the same help text in every command that takes them
    for opt in ("--model", "--random-weights", "--device", "--threads", "--dtype", "--weights", "--max-new-tokens"):
        helps = {p.help for _, cmd in commands() for p in cmd.params if isinstance(p, click.Option) and opt in p.opts}
        assert len(helps) == 1, (opt, helps)
