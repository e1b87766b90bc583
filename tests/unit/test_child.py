"""A helper program kept running (appliance/child.py), with real short-lived processes: one
that keeps exiting is started again with a delay that doubles, its exit and last output kept,
said once per streak; one that cannot start is said once and never retried; close() ends a
running one."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from sdwan.appliance import child as child_mod
from sdwan.appliance.child import Child


def make(argv: list[str] | None, why: str | None = None) -> tuple[Child, list]:
    said: list[tuple[str, dict[str, Any]]] = []
    c = Child("helper", lambda: (argv, why), lambda t, d: said.append((t, d)))
    return c, said


async def wait_until(cond: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.02)


def test_a_program_that_keeps_exiting_is_restarted_with_back_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(child_mod, "RESTART_S", 0.1)
    starts: list[float] = []

    async def main() -> None:
        c, said = make(["/bin/sh", "-c", "echo starting; echo bad config; exit 3"])
        real_serve = c._serve  # noqa: SLF001

        async def serve(argv: list[str]) -> float:
            starts.append(asyncio.get_running_loop().time())
            return await real_serve(argv)

        c._serve = serve  # type: ignore[method-assign]  # noqa: SLF001
        c.start()
        await wait_until(lambda: c.st.restarts >= 3)
        st = c.status()
        assert st["error"] == "helper exited with status 3: bad config", st
        assert st["output"] == ["starting", "bad config"], st
        assert c.st.failures >= 3
        # Said once for the streak, not at every restart.
        assert [t for t, _ in said] == ["helper exited with status 3: bad config"], said
        await c.close()
        assert c.status()["state"] == "stopped"

    asyncio.run(main())
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    # 0.1, 0.2, 0.4 s: each delay longer than the one before.
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[1] > gaps[0] * 1.5, gaps


def test_a_program_that_cannot_run_is_said_once_and_not_retried() -> None:
    async def main() -> None:
        c, said = make(None, "helper is not installed")
        c.start()
        await wait_until(lambda: c.st.state == "failed")
        await asyncio.sleep(0.2)
        assert c.st.restarts == 0 and c.st.error == "helper is not installed"
        assert said == [("helper not started: helper is not installed",
                         {"error": "helper is not installed"})]
        await c.close()

    asyncio.run(main())


def test_a_missing_executable_is_an_error_kept(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(child_mod, "RESTART_S", 0.05)

    async def main() -> None:
        c, said = make([str(tmp_path / "nope")])
        c.start()
        await wait_until(lambda: c.st.restarts >= 2)
        assert c.st.error is not None and c.st.error.startswith(
            f"cannot start {tmp_path / 'nope'}"), c.st.error
        assert len(said) == 1, said
        await c.close()

    asyncio.run(main())


def test_close_terminates_a_running_program() -> None:
    async def main() -> None:
        c, said = make(["/bin/sleep", "60"])
        c.start()
        await wait_until(lambda: c.running)
        pid = c.status()["pid"]
        assert pid is not None and Path(f"/proc/{pid}").exists()
        await c.close()
        assert c.status()["state"] == "stopped"
        # Reaped: no process (nor zombie) left with that pid of ours.
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        assert said == []  # a stop asked for is no failure to report

    asyncio.run(main())
