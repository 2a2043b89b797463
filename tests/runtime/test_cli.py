"""The ``shopflow`` command as an operator meets it: one line on stderr for an expected
failure (exit 1, or 2 for bad settings and usage), a traceback only for a bug, and
read-only commands that find the runtime ``shopflow up`` started instead of starting an
empty one.

Real servers: an embedded Redis per test in its own var dir, the session's PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from runtime import cli, embedded
from runtime.cli import main
from runtime.embedded import EmbeddedPaths
from runtime.settings import Settings
from runtime.tree import process_key
from tests.conftest import SessionServers
from tests.support import free_port, http_ready

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def var_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The environment of an operator's shell: no URLs, a var dir, free embedded ports."""
    for name in ("REDIS_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SHOPFLOW_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("SHOPFLOW_EMBEDDED_REDIS_PORT", str(free_port()))
    monkeypatch.setenv("SHOPFLOW_EMBEDDED_PG_PORT", str(free_port()))
    settings = Settings.from_env()
    yield settings
    embedded.stop_redis(EmbeddedPaths(settings.var_dir), settings.embedded_redis_port)


def one_line(text: str) -> str:
    """The text, asserted to be exactly one ``shopflow: ...`` line (no traceback)."""
    assert text.startswith("shopflow: ") and text.count("\n") == 1, text
    return text


def test_read_only_commands_find_the_embedded_redis_that_up_started(
        var_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """``shopflow up`` leaves its Redis running under ./var; with no REDIS_URL the tree and
    the job commands read that one (a process snapshot published there shows up)."""
    url, _ = embedded.start_redis(EmbeddedPaths(var_env.var_dir), var_env.embedded_redis_port)
    client = redis.Redis.from_url(url)
    client.hset(process_key(var_env.namespace, "worker", 4242), mapping={
        "process": "worker", "pid": "4242", "host": "elsewhere", "at": "now",
        "supervisors": "[]"})
    client.close()

    assert main(["tree"]) == 0
    assert "(outside supervisord) worker pid 4242 on elsewhere" in capsys.readouterr().out
    assert main(["jobs", "queues", "--json"]) == 0
    assert {q["name"] for q in json.loads(capsys.readouterr().out)} >= {"emails", "inventory"}
    assert main(["schedules"]) == 0
    assert "daily-sales-report" in capsys.readouterr().out

    assert main(["jobs", "show", "no-such-job"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and one_line(err).startswith("shopflow: no job 'no-such-job'")


def test_with_nothing_running_read_only_commands_say_how_to_start_it_and_start_nothing(
        var_env: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, missing in ((["jobs", "queues"], "no embedded Redis"),
                          (["monitor", "--once"], "no embedded Redis"),
                          (["schedules"], "no embedded Redis"),
                          (["agents", "status"], "no embedded Redis"),
                          (["trace", "1"], "no embedded PostgreSQL"),
                          (["tree"], "no supervisord, no embedded Redis")):
        assert main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert out == "" and missing in one_line(err) and "`ops/dev up`" in err, (argv, err)
    assert not http_ready(var_env.embedded_redis_port)
    assert not http_ready(var_env.embedded_pg_port)
    assert not (var_env.var_dir / "redis").exists() and not (var_env.var_dir / "postgres").exists()


def test_trace_finds_the_embedded_postgresql_of_the_var_dir(
        session_servers: SessionServers, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The session's embedded PostgreSQL stands for the one ``shopflow up`` left running."""
    if session_servers.paths is None or session_servers.pg_port is None:
        pytest.skip("TEST_DATABASE_URL is set: no embedded PostgreSQL in this session")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", session_servers.redis_url)
    monkeypatch.setenv("SHOPFLOW_VAR_DIR", str(session_servers.paths.root))
    monkeypatch.setenv("SHOPFLOW_EMBEDDED_PG_PORT", str(session_servers.pg_port))
    assert main(["migrate"]) == 0
    capsys.readouterr()
    assert main(["trace", "987654321"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and one_line(err) == "shopflow: order 987654321 does not exist\n"


def test_an_unreachable_server_is_one_line_naming_it_and_the_setting(
        var_env: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/shop")
    for argv, what, setting in ((["jobs", "queues"], "Redis", "REDIS_URL"),
                                (["monitor", "--once"], "Redis", "REDIS_URL"),
                                (["trace", "1"], "PostgreSQL", "DATABASE_URL"),
                                (["migrate"], "PostgreSQL", "DATABASE_URL")):
        assert main(argv) == 1, argv
        err = one_line(capsys.readouterr().err)
        assert err.startswith(f"shopflow: cannot reach {what} (") and setting in err, err


def test_bad_settings_and_bad_arguments_exit_2_with_one_line(
        var_env: Settings, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SHOPFLOW_EMBEDDED_REDIS_PORT", "six")
    assert main(["jobs", "queues"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "shopflow: SHOPFLOW_EMBEDDED_REDIS_PORT must be a whole number, got 'six'\n")

    for argv, expected in ((["jobs", "list", "emails", "--limit", "0"], "argument --limit"),
                           (["jobs", "watch", "--timeout-s", "soon"], "argument --timeout-s"),
                           (["jobs", "list", "nowhere"], "invalid choice: 'nowhere'"),
                           (["no-such-command"], "invalid choice: 'no-such-command'")):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2
        err = one_line(capsys.readouterr().err)
        assert expected in err and "--help`)" in err, err


def test_a_bug_keeps_its_traceback(var_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object, settings: Settings) -> int:
        raise KeyError("a bug, not an operator's problem")

    monkeypatch.setattr(cli, "_cmd_tree", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["tree"])


def test_the_installed_command_prints_no_traceback_for_an_expected_failure(
        tmp_path: Path) -> None:
    """The real process (entry point, logging set up): exit 1 and one line, nothing else."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env |= {"SHOPFLOW_VAR_DIR": str(tmp_path / "var"),
            "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "jobs", "queues"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert one_line(done.stderr).startswith("shopflow: cannot reach Redis")


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
              ) -> Iterator[tuple[tuple[str, ...], str | None, argparse.ArgumentParser]]:
    """Every command and sub-command: (words, its help line, the parser listing it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                words = (*prefix, choice.dest)
                yield words, choice.help, parser
                yield from _commands(action.choices[choice.dest], words)


def test_every_command_has_a_one_line_help_and_its_own_help_page(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """In an 80-column terminal the list of ``shopflow --help`` (and of ``shopflow jobs
    --help``...) shows each command's help whole on one line; each command's ``--help``
    works."""
    monkeypatch.setenv("COLUMNS", "80")
    commands = list(_commands(cli.build_parser()))
    assert {"up", "tree", "jobs", "monitor", "trace"} <= {words[0] for words, _, _ in commands}
    assert ("jobs", "queues") in {words for words, _, _ in commands}
    for words, help_line, parent in commands:
        assert help_line and (help_line[0].islower() or help_line.startswith("LLM")), words
        listing = parent.format_help().splitlines()
        assert any(line.endswith(f" {help_line}") for line in listing), (
            f"`{' '.join(words)}`: {help_line!r} wraps in `{parent.prog} --help`")
        with pytest.raises(SystemExit) as exited:
            main([*words, "--help"])
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: shopflow {' '.join(words)}"), words
