"""A box's boot selection outside a box: grubenv (and its copy) in a folder of the lab, and
RAUC's custom bootloader backend as a script that runs sdwan.appliance.bootenv on it, for the
tests that run the real RAUC on loop devices instead of a booted image."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from sdwan.appliance import bootenv

FIRMWARE = Path(__file__).resolve().parents[2]


def make_boot_env(d: Path, system_conf: Path, values: dict[str, str]) -> tuple[Path, bootenv.Paths]:
    """grubenv and grubenv2 in d holding values, and the backend script for system.conf's
    [handlers] bootloader-custom-backend; returns (script, the paths it works on). The
    board's boot_tries is the default: there is no board file here."""
    paths = bootenv.Paths(d / "grubenv", system_conf, d / "no-board.toml")
    bootenv.save(paths, values)
    script = d / "bootenv-backend"
    env = {"SDWAN_GRUBENV": paths.grubenv, "SDWAN_RAUC_CONF": paths.system_conf,
           "SDWAN_BOARD": paths.board, "PYTHONPATH": FIRMWARE}
    script.write_text("#!/bin/sh\n" + "".join(
        f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())
        + f'exec {shlex.quote(sys.executable)} -m sdwan.appliance.bootenv "$@"\n')
    script.chmod(0o755)
    return script, paths


def backend_conf(script: Path) -> str:
    """system.conf's lines naming the backend (the [system] section needs bootloader=custom)."""
    return f"[handlers]\nbootloader-custom-backend={script}\n"
