"""The image's serial console is socket-console and nothing else (board/mkimage.py,
check_console): the build stops with a clear message when the console's entry point is
missing, or when anything on a terminal would start a shell or another login instead.

The root filesystem here is the real overlay (board/common/rootfs) and the real firmware
with its entry points, installed the way the image build installs them, without the
Debian packages around them.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mkimage() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkimage", REPO / "board" / "mkimage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mkimage"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def root(tmp_path: Path, mkimage: ModuleType) -> Path:
    root = tmp_path / "rootfs"
    bindir = root / "usr/bin"
    site = root / "usr/lib/python3/dist-packages"
    bindir.mkdir(parents=True)
    site.mkdir(parents=True)
    mkimage.install_firmware(site, bindir)
    mkimage.install_overlay(root, "ttyS0", 115200)
    return root


def build_error(mkimage: ModuleType, root: Path, console: str = "ttyS0") -> str:
    with pytest.raises(mkimage.BuildError) as info:
        mkimage.check_console(root, console)
    return str(info.value)


def test_the_real_overlay_has_the_console_and_no_shell(mkimage: ModuleType, root: Path) -> None:
    mkimage.check_console(root, "ttyS0")
    login = (root / "usr/libexec/sdwan/console-login").read_text()
    assert "exec /usr/bin/socket-console" in login
    inittab = (root / "etc/inittab").read_text()
    assert "ttyS0::respawn:/sbin/getty -n -l /usr/libexec/sdwan/console-login 115200 ttyS0" in (
        inittab
    )


def test_a_missing_console_entry_point_fails_the_build(mkimage: ModuleType, root: Path) -> None:
    (root / "usr/bin/socket-console").unlink()
    message = build_error(mkimage, root)
    assert "the console entry point /usr/bin/socket-console is missing from the image" in message
    assert "NOT_ON_APPLIANCE" in message


def test_a_console_left_out_of_the_appliance_fails_the_build(
    mkimage: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone adds the console to the scripts kept off the appliance.
    monkeypatch.setattr(mkimage, "NOT_ON_APPLIANCE", {*mkimage.NOT_ON_APPLIANCE, "socket-console"})
    root = tmp_path / "rootfs"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib/python3/dist-packages").mkdir(parents=True)
    mkimage.install_firmware(root / "usr/lib/python3/dist-packages", root / "usr/bin")
    mkimage.install_overlay(root, "ttyS0", 115200)
    assert "/usr/bin/socket-console is missing" in build_error(mkimage, root)


def test_a_missing_console_module_fails_the_build(mkimage: ModuleType, root: Path) -> None:
    (root / "usr/lib/python3/dist-packages/sdwan/appliance/console.py").unlink()
    assert "the console module sdwan.appliance.console is missing" in build_error(mkimage, root)


FALLBACK_LOGIN = """#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ -x /usr/bin/socket-console ]; then
    exec /usr/bin/socket-console
fi
echo "development login"
cd /root && exec /bin/sh -l
"""


@pytest.mark.parametrize(
    ("script", "why"),
    [
        (FALLBACK_LOGIN, r"must run `exec /usr/bin/socket-console` and nothing else"),
        (
            "#!/bin/sh\n/bin/sh -l\nexec /usr/bin/socket-console\n",
            r"starts '/bin/sh' \('/bin/sh -l'\): no shell may stand in",
        ),
        ("#!/bin/sh\nexec /bin/login\n", r"must run `exec /usr/bin/socket-console`"),
    ],
)
def test_a_console_login_with_a_way_around_fails_the_build(
    mkimage: ModuleType, root: Path, script: str, why: str
) -> None:
    (root / "usr/libexec/sdwan/console-login").write_text(script)
    assert re.search(why, build_error(mkimage, root))


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("ttyS1::askfirst:-/bin/sh", "starts a shell on a terminal"),
        ("tty1::respawn:/bin/sh -l", "starts a shell on a terminal"),
        ("::respawn:/sbin/sulogin", "starts a shell on a terminal"),
        ("ttyS1::respawn:/sbin/getty 115200 ttyS1", "getty without -l"),
    ],
)
def test_another_way_in_from_inittab_fails_the_build(
    mkimage: ModuleType, root: Path, line: str, why: str
) -> None:
    inittab = root / "etc/inittab"
    inittab.write_text(inittab.read_text() + line + "\n")
    assert why in build_error(mkimage, root)


def test_the_console_must_be_on_the_boards_port(mkimage: ModuleType, root: Path) -> None:
    message = build_error(mkimage, root, console="ttyAMA0")
    assert "no getty with the console's login on the board's console port ttyAMA0" in message
