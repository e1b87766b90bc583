#!/usr/bin/env python3
"""Builds the bootable disk image of one board (board/<name>/) from Debian packages.

Owns the whole assembly: fetching .debs (apt-get download, cached in build/cache/debs/)
and wheels (pip download, build/cache/wheels/), the read-only root filesystem (squashfs),
the cffi modules setup.py declares (cross-compiled for aarch64), the initramfs, the slot
image (the squashfs holds the kernel and initramfs too), GRUB (grub-mkimage from Debian's
grub-efi-*-bin modules), the EFI system partition (mtools, no mounting) and the GPT disk
(sfdisk on a plain file): slot A filled, slot B empty. Every input is
pinned or cached and every timestamp is SOURCE_DATE_EPOCH, so the same inputs give the
same image; the sha256 is written next to it. Layout and reasons: docs/image.md.

    python board/mkimage.py qemu-x86_64 [--out build/images] [--check-repro]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import boardlib  # noqa: E402 - board/boardlib.py: the boards, shared with the Buildroot tree
from boardlib import (  # noqa: E402
    COMMON,
    NOT_ON_APPLIANCE,
    NOT_ON_APPLIANCE_MODULES,
    ROOT,
    SECTOR,
    BuildError,
    MiB,
    check_console,
    check_kernel_config,
    fixed_uuid,
    install_module,
    install_overlay,
    module_closure,
)

CACHE = ROOT / "build" / "cache"
WORK = ROOT / "build" / "work"
PY = "python3.11"


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str  # uname -m
    deb: str  # Debian architecture
    triplet: str
    grub_deb: str  # Debian's GRUB modules for the board's EFI platform
    cc: str
    wheel_platforms: tuple[str, ...]


ARCHES = {
    "x86_64": Arch("x86_64", "amd64", "x86_64-linux-gnu", "grub-efi-amd64-bin",
                   "gcc", ("manylinux_2_36_x86_64", "manylinux_2_34_x86_64",
                           "manylinux_2_28_x86_64", "manylinux2014_x86_64")),
    "aarch64": Arch("aarch64", "arm64", "aarch64-linux-gnu", "grub-efi-arm64-bin",
                    "aarch64-linux-gnu-gcc", ("manylinux_2_36_aarch64", "manylinux_2_34_aarch64",
                                              "manylinux_2_28_aarch64", "manylinux2014_aarch64")),
}
# What the native modules are compiled against (headers and link libraries of the target).
NATIVE_BUILD_DEBS = ["libssl-dev", "libssl3", "libpython3.11-dev"]
# ---------------------------------------------------------------- small helpers

_t0 = time.monotonic()


def step(msg: str) -> None:
    print(f"mkimage [{time.monotonic() - _t0:6.1f}s] {msg}", flush=True)


def run(cmd: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
        input: bytes | None = None) -> bytes:
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, input=input, capture_output=True,
                              timeout=1800)
    except FileNotFoundError as e:
        raise BuildError(f"{cmd[0]} is not installed (run `make setup`)") from e
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
        raise BuildError(f"`{' '.join(cmd[:6])}` failed ({proc.returncode}): {err[-2000:]}")
    return proc.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


# ---------------------------------------------------------------- board description


@dataclasses.dataclass
class Board(boardlib.BoardInfo):
    """The board as boardlib describes it (for both builds), with Debian's view of its
    architecture (`arch` stays uname's name)."""

    debarch: Arch

    @classmethod
    def load(cls, name: str) -> Board:
        b = boardlib.load_board(name)
        fields = {f.name: getattr(b, f.name) for f in dataclasses.fields(b)}
        return cls(**fields, debarch=ARCHES[b.arch])


# ---------------------------------------------------------------- Debian packages


def apt_env() -> dict[str, str]:
    return {**os.environ, "LC_ALL": "C"}


def deb_infos(pkgs: list[str], arch: str) -> dict[str, dict[str, str]]:
    """apt's candidate stanza of each package (one apt-cache call for all of them)."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions",
                           *[f"{p}:{arch}" for p in pkgs]],
                          capture_output=True, env=apt_env(), timeout=300)
    infos: dict[str, dict[str, str]] = {}
    for stanza in proc.stdout.decode().split("\n\n"):
        info: dict[str, str] = {}
        for line in stanza.splitlines():
            if ": " in line and not line.startswith(" "):
                k, v = line.split(": ", 1)
                info.setdefault(k, v)
        if "Package" in info:
            infos.setdefault(info["Package"], info)
    missing = [p for p in pkgs if p not in infos]
    if missing:
        hint = " (for arm64: `make setup` adds the architecture)" if arch != "amd64" else ""
        raise BuildError(f"apt knows no {', '.join(f'{p}:{arch}' for p in missing)}; "
                         f"run apt-get update{hint}")
    return infos


def deb_info(pkg: str, arch: str) -> dict[str, str]:
    return deb_infos([pkg], arch)[pkg]


def fetch_debs(pkgs: list[str], arch: str) -> dict[str, tuple[Path, str]]:
    """The cached .deb of apt's candidate version of each package: downloaded once (in one
    apt-get call), checked against the sha256 of apt's index."""
    infos = deb_infos(pkgs, arch)
    d = CACHE / "debs" / arch
    d.mkdir(parents=True, exist_ok=True)
    result: dict[str, tuple[Path, str]] = {}
    todo = []
    for pkg in pkgs:
        info = infos[pkg]
        dest = d / Path(info["Filename"]).name
        result[pkg] = (dest, info["Version"])
        if not dest.exists() or sha256_file(dest) != info["SHA256"]:
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            todo.append(pkg)
    if todo:
        step(f"download {len(todo)} package(s) for {arch}: {' '.join(todo)}")
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
             *[f"{p}:{arch}={infos[p]['Version']}" for p in todo]], cwd=d, env=apt_env())
        for pkg in todo:
            dest = result[pkg][0]
            if not dest.exists():
                # apt-get names the file after the version with ':' escaped as '%3a'
                got = list(d.glob(f"{pkg}_*_{infos[pkg]['Architecture']}.deb"))
                match = [g for g in got if sha256_file(g) == infos[pkg]["SHA256"]]
                if not match:
                    raise BuildError(f"apt-get download {pkg}:{arch} left no matching .deb")
                match[0].rename(dest)
            if sha256_file(dest) != infos[pkg]["SHA256"]:
                raise BuildError(f"{dest}: sha256 does not match apt's index")
    return result


def fetch_deb(pkg: str, arch: str) -> tuple[Path, str]:
    return fetch_debs([pkg], arch)[pkg]


def extract_deb(deb: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(into)])


def merge_usr(root: Path) -> None:
    """Debian bookworm packages still ship /bin, /sbin, /lib*: move them under /usr."""
    for top in ("bin", "sbin", "lib", "lib64"):
        src = root / top
        if src.is_symlink() or not src.exists():
            continue
        dst = root / "usr" / top
        for path in sorted(src.rglob("*"), key=lambda p: len(p.parts), reverse=False):
            rel = path.relative_to(src)
            target = dst / rel
            if path.is_dir() and not path.is_symlink():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                rmtree(target)
                os.rename(path, target)
        shutil.rmtree(src)
        os.symlink(f"usr/{top}", src)


# ---------------------------------------------------------------- Python parts


def cffi_modules() -> list[tuple[Path, str]]:
    """The cffi builders declared in setup.py (`cffi_modules=["file.py:var", ...]`)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "cffi_modules":
            specs = ast.literal_eval(node.value)
            return [(ROOT / s.split(":")[0], s.split(":")[1]) for s in specs]
    raise BuildError("setup.py declares no cffi_modules")


def build_native(board: Board, sysroot: Path, out: Path, work: Path) -> list[str]:
    """Compiles every cffi module for the board's architecture into out/sdwan/."""
    a = board.debarch
    built = []
    old_cwd = os.getcwd()
    os.chdir(ROOT)  # the builders resolve their source paths from the project folder
    try:
        for path, var in cffi_modules():
            spec = importlib.util.spec_from_file_location(f"_mkimage_{path.stem}", path)
            if spec is None or spec.loader is None:
                raise BuildError(f"cannot load the cffi builder {path}")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            ffi = getattr(mod, var)
            module_name, _src, _ext, kwds = ffi._assigned_source
            short = module_name.split(".")[-1]
            csrc = work / f"{short}.c"
            ffi.emit_c_code(str(csrc))
            pkg_dir = out / Path(*module_name.split(".")[:-1])
            pkg_dir.mkdir(parents=True, exist_ok=True)
            macros = list(kwds.get("define_macros", []))
            if kwds.get("py_limited_api") is False:  # as cffi's setuptools integration does
                macros.append(("_CFFI_NO_LIMITED_API", None))
                target = pkg_dir / f"{short}.cpython-311-{a.triplet}.so"
            else:
                target = pkg_dir / f"{short}.abi3.so"
            inc = [sysroot / "usr/include", sysroot / "usr/include" / a.triplet,
                   sysroot / "usr/include" / PY]
            cmd = [a.cc, "-shared", "-fPIC", "-O2", "-DNDEBUG", f"-ffile-prefix-map={ROOT}=.",
                   f"-ffile-prefix-map={work}=.", "-Wl,--build-id=sha1",
                   *[f"-I{p}" for p in kwds.get("include_dirs", [])],
                   *[f"-I{p}" for p in inc],
                   *[f"-D{k}" if v is None else f"-D{k}={v}"
                     for k, v in macros],
                   *kwds.get("extra_compile_args", []),
                   str(csrc), *kwds.get("sources", []),
                   f"-L{sysroot / 'usr/lib' / a.triplet}",
                   *[f"-l{lib}" for lib in kwds.get("libraries", [])],
                   *kwds.get("extra_link_args", []),
                   "-o", str(target)]
            step(f"compile {module_name} for {a.name} ({len(kwds.get('sources', []))} C files)")
            run(cmd, cwd=ROOT)
            built.append(module_name)
    finally:
        os.chdir(old_cwd)
    return built


def runtime_requirements() -> list[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(data["project"].get("dependencies", []))


def requirement_name(req: str) -> str:
    return re.split(r"[=<>!~;\[ ]", req, maxsplit=1)[0].strip().lower().replace("_", "-")


# Runtime dependencies PyPI has no wheel of for every board (python-pytun: x86_64 only): built
# from their sdist, at the version pinned in constraints.txt, with the board's compiler, like
# the firmware's own native modules. Name -> (extension module, its C sources in the sdist).
SDIST_MODULES = {"python-pytun": ("pytun", ["pytun.c"])}


def build_sdist_modules(arch: Arch, sysroot: Path, site: Path, work: Path) -> dict[str, str]:
    """Compile SDIST_MODULES into site; returns {sdist file name: sha256}."""
    d = CACHE / "sdists"
    d.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, (module, sources) in sorted(SDIST_MODULES.items()):
        run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
             "--no-binary=:all:", "--no-deps", "--dest", str(d),
             "-c", str(COMMON / "constraints.txt"), name])
        pin = next(line.split("==", 1)[1].strip()
                   for line in (COMMON / "constraints.txt").read_text().splitlines()
                   if requirement_name(line) == name and "==" in line)
        sdist = d / f"{name}-{pin}.tar.gz"
        src = work / f"{name}-{pin}"
        rmtree(src)
        with tarfile.open(sdist) as tf:
            tf.extractall(work, filter="data")
        target = site / f"{module}.cpython-311-{arch.triplet}.so"
        inc = [sysroot / "usr/include", sysroot / "usr/include" / arch.triplet,
               sysroot / "usr/include" / PY]
        step(f"compile {module} ({name} {pin}) for {arch.name}")
        run([arch.cc, "-shared", "-fPIC", "-O2", "-DNDEBUG", f"-ffile-prefix-map={src}=.",
             "-Wl,--build-id=sha1", *[f"-I{p}" for p in inc],
             *[str(src / s) for s in sources], "-o", str(target)], cwd=src)
        built[sdist.name] = sha256_file(sdist)
    return built


def fetch_wheels(arch: Arch) -> list[Path]:
    d = CACHE / "wheels" / arch.name
    d.mkdir(parents=True, exist_ok=True)
    reqs = [r for r in runtime_requirements() if requirement_name(r) not in SDIST_MODULES]
    step(f"wheels for {arch.name}: {', '.join(reqs)}")
    common = ["--disable-pip-version-check", "--only-binary=:all:", "--python-version", "3.11",
              "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none",
              "-c", str(COMMON / "constraints.txt"),
              *[x for p in arch.wheel_platforms for x in ("--platform", p)]]
    # pip download keeps whatever it fetched before; the resolver's report says which wheels
    # this build uses.
    run([sys.executable, "-m", "pip", "download", "-q", "--dest", str(d), *common, *reqs])
    run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
         "--no-index", "--find-links", str(d), "--target", str(WORK / "pip-target"),
         "--report", str(d / "report.json"), *common, *reqs])
    report = json.loads((d / "report.json").read_text())
    wheels = []
    pins = {re.split(r"[=<>]", line)[0].strip().lower().replace("_", "-")
            for line in (COMMON / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    for item in report["install"]:
        name = Path(item["download_info"]["url"]).name
        meta_name = item["metadata"]["name"].lower().replace("_", "-")
        if meta_name not in pins:
            print(f"mkimage: warning: {meta_name} {item['metadata']['version']} is not pinned in "
                  "board/common/constraints.txt; builds may differ when it is released again")
        wheels.append(d / name)
    return sorted(wheels)


def install_wheel(whl: Path, site: Path) -> None:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            parts = Path(info.filename).parts
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    rel = Path(*parts[2:])
                else:
                    continue  # scripts, headers: not needed on the appliance
            else:
                rel = Path(*parts)
            dest = site / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            mode = (info.external_attr >> 16) & 0o777
            dest.chmod(0o755 if mode & 0o111 else 0o644)


def install_firmware(site: Path, bindir: Path) -> list[str]:
    src = ROOT / "firmware" / "sdwan"
    dest = site / "sdwan"
    for p in sorted(src.rglob("*.py")):
        rel = p.relative_to(src)
        if rel.parts[0] in NOT_ON_APPLIANCE_MODULES or "__pycache__" in rel.parts:
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest / rel)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    names = []
    for name, target in sorted(scripts.items()):
        if name in NOT_ON_APPLIANCE:
            continue
        module, func = target.split(":")
        (bindir / name).write_text(
            f"#!/usr/bin/python3\nimport sys\nfrom {module} import {func}\n"
            f"sys.exit({func}())\n")
        (bindir / name).chmod(0o755)
        names.append(name)
    return names


def compile_pyc(root: Path) -> None:
    """Byte-code for the read-only root (python could not write it at run time).
    unchecked-hash pycs carry no source mtime; PYTHONHASHSEED=0 fixes set ordering."""
    if sys.version_info[:2] != (3, 11):
        raise BuildError("run mkimage with Python 3.11 (the image's python3.11 reads its pycs)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for d in ("usr/lib/python3.11", "usr/lib/python3/dist-packages"):
        run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-f",
             "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/",
             str(root / d)], env=env)


# ---------------------------------------------------------------- kernel modules


# ---------------------------------------------------------------- archives and images


def make_esp(path: Path, size_mib: int, files: dict[str, Path], volid: str, epoch: int) -> None:
    with path.open("wb") as f:
        f.truncate(size_mib * MiB)
    run(["mkfs.fat", "--invariant", "-i", volid, "-n", "ESP", str(path)])
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(epoch), "MTOOLS_SKIP_CHECK": "1"}
    dirs = sorted({str(Path(dst).parent) for dst in files})
    for d in dirs:
        parts = Path(d).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            with contextlib.suppress(BuildError):
                run(["mmd", "-i", str(path), f"::{sub}"], env=env)
    for dst, src in sorted(files.items()):
        os.utime(src, (epoch, epoch))
        run(["mcopy", "-m", "-i", str(path), str(src), f"::{dst}"], env=env)


def make_disk(path: Path, board: Board, contents: dict[str, Path]) -> list[dict]:
    """GPT disk: 1 MiB for the primary table, the partitions in order, then the backup."""
    disk = boardlib.disk_layout(board)  # the layout Buildroot's genimage gets too
    layout = [{"name": p.name, "type": p.type, "start": p.start * SECTOR,
               "size": p.size * SECTOR, "partuuid": p.partuuid} for p in disk.partitions]
    with path.open("wb") as f:
        f.truncate(disk.total_bytes)
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", "--wipe", "never", str(path)],
        input=boardlib.sfdisk_script(disk).encode())
    with path.open("r+b") as f:
        for part in layout:
            src = contents.get(part["name"])
            if src is None:
                continue
            size = src.stat().st_size
            if size > part["size"]:
                raise BuildError(
                    f"{part['name']} needs {size / MiB:.1f} MiB but the partition is "
                    f"{part['size'] / MiB:.0f} MiB: raise size_mib in {board.dir}/board.toml")
            part["used"] = size
            f.seek(part["start"])
            with src.open("rb") as s:
                shutil.copyfileobj(s, f, MiB)
    return layout


# ---------------------------------------------------------------- the root filesystem


def check_libraries(root: Path, arch: Arch) -> None:
    """Every DT_NEEDED of every ELF file in the root must be in the root."""
    present = {p.name for p in root.rglob("*.so*")}
    present |= {p.name for p in root.rglob("ld-linux*")}
    missing: dict[str, set[str]] = {}
    for p in root.rglob("*"):
        if p.is_symlink() or not p.is_file():
            continue
        with p.open("rb") as f:
            if f.read(4) != b"\x7fELF":
                continue
        out = run(["readelf", "-d", "-W", str(p)]).decode(errors="replace")
        for so in re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out):
            if so not in present:
                missing.setdefault(so, set()).add(str(p.relative_to(root)))
    if missing:
        raise BuildError("shared libraries missing from the root filesystem (add their Debian "
                         "package to board/common/packages.toml): " + "; ".join(
                             f"{so} (needed by {', '.join(sorted(u)[:3])})"
                             for so, u in sorted(missing.items())))


def check_imports(root: Path, arch: Arch, modules: list[str]) -> None:
    """Imports socketd's modules with the image's own python3.11 and libraries (possible
    when the image's architecture is the build machine's): a stdlib module trimmed away
    that a dependency imports fails the build, not the boot."""
    if os.uname().machine != arch.name:
        step(f"import check skipped (a {arch.name} image on {os.uname().machine})")
        return
    ld = next((root / "usr/lib" / arch.triplet).glob("ld-linux*.so*"))
    env = {"PYTHONHOME": str(root / "usr"), "PYTHONNOUSERSITE": "1", "LC_ALL": "C",
           "PYTHONPATH": str(root / "usr/lib/python3/dist-packages")}
    code = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
    try:
        run([str(ld), "--library-path", str(root / "usr/lib" / arch.triplet),
             str(root / "usr/bin" / PY), "-B", "-c", code, *modules], env=env)
    except BuildError as e:
        raise BuildError(f"the image's python cannot import socketd's modules: {e}") from e


def busybox_applets(host_busybox: Path) -> list[str]:
    out = run([str(host_busybox), "--list-full"]).decode()
    return [line.strip() for line in out.splitlines() if line.strip() and "/" in line]


def assemble_rootfs(board: Board, work: Path, kver: str, kstage: Path,
                    epoch: int, manifest: dict) -> Path:
    a = board.debarch
    pkgs = tomllib.loads((COMMON / "packages.toml").read_text())
    root = work / "rootfs"
    rmtree(root)
    root.mkdir(parents=True)
    versions = manifest.setdefault("debs", {})
    debs = fetch_debs(pkgs["rootfs"] + NATIVE_BUILD_DEBS + [a.grub_deb], a.deb)
    for pkg in pkgs["rootfs"]:
        deb, ver = debs[pkg]
        versions[pkg] = ver
        extract_deb(deb, root)
    merge_usr(root)
    keep = {}
    for rel in pkgs["keep_bin"]:
        for cand in (root / rel, root / "usr" / rel):
            if cand.exists() or cand.is_symlink():
                keep["usr/" + rel.removeprefix("usr/")] = cand
                break
        else:
            raise BuildError(f"packages.toml keep_bin: {rel} is in none of the packages")
    saved = work / "keep"
    rmtree(saved)
    for rel, src in keep.items():
        (saved / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(src, saved / rel)
    for pattern in pkgs["drop"]:
        for p in sorted(root.glob(pattern), reverse=True):
            rmtree(p)
    for rel in keep:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.rename(saved / rel, root / rel)
    for empty in ("usr/share", "etc"):
        for dirpath, _dirs, _files in sorted(os.walk(root / empty), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)

    # busybox: one binary, a symlink per applet where no real tool is installed
    bb_host = work / "busybox-host"
    rmtree(bb_host)
    deb, _ = fetch_deb("busybox-static", "amd64")
    extract_deb(deb, bb_host)
    bindir = root / "usr/bin"
    bindir.mkdir(parents=True, exist_ok=True)
    if not (bindir / "busybox").exists():
        raise BuildError("busybox-static did not provide /bin/busybox")
    for applet in busybox_applets(bb_host / "bin/busybox"):
        if applet == "linuxrc":
            continue
        top = applet.split("/")[0]
        rel = Path("usr") / applet if top in ("bin", "sbin") else Path(applet)
        dest = root / rel
        if dest.exists() or dest.is_symlink():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(os.path.relpath(bindir / "busybox", dest.parent))
    (bindir / "python3").symlink_to(PY)

    # Python: the firmware, its native modules and its wheels
    site = root / "usr/lib/python3/dist-packages"
    site.mkdir(parents=True, exist_ok=True)
    manifest["scripts"] = install_firmware(site, bindir)
    sysroot = work / "sysroot"
    rmtree(sysroot)
    for pkg in NATIVE_BUILD_DEBS:
        deb, ver = fetch_deb(pkg, a.deb)
        extract_deb(deb, sysroot)
    (work / "native").mkdir(exist_ok=True)
    manifest["native"] = build_native(board, sysroot, site, work / "native")
    wheels = fetch_wheels(a)
    for whl in wheels:
        install_wheel(whl, site)
    manifest["wheels"] = {w.name: sha256_file(w) for w in wheels}
    manifest["sdists"] = build_sdist_modules(a, sysroot, site, work / "native")
    compile_pyc(root)

    # kernel modules
    runtime = module_closure(kstage, kver, board.modules_boot + board.modules_runtime)
    on_demand = module_closure(kstage, kver, board.modules_on_demand)
    names = []
    for rel in runtime + [m for m in on_demand if m not in runtime]:
        name = str(Path(rel).parent / install_module(
            kstage / "lib/modules" / kver / rel, root / "usr/lib/modules" / kver / rel))
        if rel in runtime:
            names.append(name)
    for f in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        shutil.copyfile(kstage / "lib/modules" / kver / f, root / "usr/lib/modules" / kver / f)
    run(["depmod", "-b", str(root), kver])
    (root / "usr/lib/modules" / kver / "modules.runtime").write_text("\n".join(names) + "\n")
    manifest["modules"] = len(names)

    # the overlay: init scripts, users, board files
    install_overlay(root, board.console, board.baud)
    boardlib.install_board_files(root, board, epoch)
    (root / "etc/os-release").write_text(
        boardlib.os_release(board.name, manifest["version"], manifest["commit"]))
    check_libraries(root, a)
    check_console(root, board.console)
    entry_modules = sorted({t.split(":")[0] for n, t in tomllib.loads(
        (ROOT / "pyproject.toml").read_text())["project"]["scripts"].items()
        if n not in NOT_ON_APPLIANCE})
    check_imports(root, a, entry_modules + manifest["native"])
    return root


# ---------------------------------------------------------------- the whole build


def git_describe() -> tuple[str, str]:
    commit = run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"]).decode().strip()
    epoch = run(["git", "-C", str(ROOT), "log", "-1", "--format=%ct"]).decode().strip()
    return commit, epoch


def build(board_name: str, out_dir: Path) -> Path:
    board = Board.load(board_name)
    a = board.debarch
    commit, git_epoch = git_describe()
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", git_epoch))
    os.environ["SOURCE_DATE_EPOCH"] = str(epoch)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    manifest: dict = {"board": board.name, "arch": a.name, "version": version,
                      "commit": commit, "source_date_epoch": epoch}
    work = WORK / board.name
    work.mkdir(parents=True, exist_ok=True)
    step(f"board {board.name} ({a.name}), SOURCE_DATE_EPOCH={epoch}")

    # kernel
    pkgs = tomllib.loads((COMMON / "packages.toml").read_text())
    meta = pkgs["kernel"].format(debarch=a.deb)
    dep = deb_info(meta, a.deb)["Depends"]
    kpkg = re.match(r"(linux-image-[^\s,(]+)", dep)
    if not kpkg:
        raise BuildError(f"cannot tell the kernel package from {meta}: Depends {dep}")
    kdeb, kver_deb = fetch_deb(kpkg.group(1), a.deb)
    manifest.setdefault("debs", {})[kpkg.group(1)] = kver_deb
    kstage = work / "kernel"
    rmtree(kstage)
    extract_deb(kdeb, kstage)
    merge_usr(kstage)
    kver = kpkg.group(1).removeprefix("linux-image-")
    kroot = kstage / "usr"  # lib/modules/<kver>
    check_kernel_config(kstage / "boot" / f"config-{kver}", boardlib.kernel_fragments(board))
    step(f"kernel {kver}: depmod")
    run(["depmod", "-b", str(kroot), kver])
    manifest["kernel"] = kver

    root = assemble_rootfs(board, work, kver, kroot, epoch, manifest)
    # The slot's kernel and initramfs (busybox, the boot modules, /init) go into its root.
    step("kernel and initramfs into the slot's /boot")
    boardlib.install_slot_boot(board, root, kstage / "boot" / f"vmlinuz-{kver}", epoch)
    step("squashfs (the slot image)")
    sqfs = work / "root.squashfs"
    rmtree(sqfs)
    run(["mksquashfs", str(root), str(sqfs), *boardlib.slot_squashfs_args(epoch)],
        env={k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"})

    step("GRUB")
    grub = make_grub(board, work, manifest)
    esp_part = next(p for p in board.partitions if p.type == "esp")
    esp = work / "esp.vfat"
    volid = fixed_uuid(board.name, "esp")[:8]
    esp_dir = work / "esp"
    rmtree(esp_dir)
    files = boardlib.esp_files(board, grub, esp_dir)
    need = sum(f.stat().st_size for f in files.values()) + MiB
    if need > esp_part.size_mib * MiB:
        raise BuildError(f"the ESP's files need {need / MiB:.1f} MiB but the ESP is "
                         f"{esp_part.size_mib} MiB: raise its size_mib in {board.dir}/board.toml")
    make_esp(esp, esp_part.size_mib, files, volid, epoch)

    step("GPT disk")
    out_dir.mkdir(parents=True, exist_ok=True)
    img = out_dir / f"{board.name}.img"
    tmp = img.with_suffix(".img.tmp")
    slots = boardlib.boot_slots(board)
    # root-b ships empty (zeros): GRUB finds no kernel there and keeps to A.
    layout = make_disk(tmp, board, {esp_part.name: esp, slots[0].partition: sqfs})
    os.replace(tmp, img)
    digest = sha256_file(img)
    (out_dir / f"{board.name}.img.sha256").write_text(f"{digest}  {img.name}\n")
    # The slot image alone: what an update bundle carries into the other slot.
    rootfs_img = out_dir / f"{board.name}.rootfs.img"
    shutil.copyfile(sqfs, rootfs_img)
    kernel = root / boardlib.SLOT_KERNEL
    initrd = root / boardlib.SLOT_INITRD
    slot_size = {p["name"]: p["size"] for p in layout}
    manifest.update({
        "image": img.name, "sha256": digest, "image_bytes": img.stat().st_size,
        "rootfs_image": rootfs_img.name, "rootfs_sha256": sha256_file(rootfs_img),
        "kernel_bytes": kernel.stat().st_size, "initrd_bytes": initrd.stat().st_size,
        "squashfs_bytes": sqfs.stat().st_size, "grub_bytes": grub.stat().st_size,
        "partitions": layout,
        "slots": [{"slot": s.bootname, "partition": s.partition, "number": s.number,
                   "size": slot_size[s.partition], "kernel": "/" + boardlib.SLOT_KERNEL,
                   "initrd": "/" + boardlib.SLOT_INITRD,
                   "shipped": s is slots[0]} for s in slots],
        "boot_tries": board.boot_tries,
        "boot_loops": board.boot_loops,
        "cmdline": board.cmdline,
    })
    (out_dir / f"{board.name}.manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    step(f"{img} {img.stat().st_size / MiB:.0f} MiB (slot image {sqfs.stat().st_size / MiB:.1f}"
         f" MiB, kernel {kernel.stat().st_size / MiB:.1f} MiB) sha256 {digest[:16]}…")
    return img


def make_grub(board: Board, work: Path, manifest: dict) -> Path:
    """GRUB for the ESP's removable-media path: grub-mkimage (grub-common, on the build
    machine) with Debian's modules of the board's platform, the slot selection's modules
    built in and board/common/grub-early.cfg as its embedded config. grub-mkimage stamps
    no time and orders what it is given, so the same modules give the same file."""
    a = board.debarch
    deb, ver = fetch_deb(a.grub_deb, a.deb)
    manifest["debs"][a.grub_deb] = ver
    stage = work / "grub"
    rmtree(stage)
    extract_deb(deb, stage)
    platform = boardlib.GRUB_PLATFORMS[a.name]
    out = work / boardlib.EFI_LOADERS[a.name]
    run(["grub-mkimage", "-O", platform, "-d", str(stage / "usr/lib/grub" / platform),
         "-p", boardlib.GRUB_PREFIX, "-c", str(boardlib.GRUB_EARLY_CFG), "-o", str(out),
         *boardlib.GRUB_MODULES])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="build the disk image of one board")
    ap.add_argument("board", help="a folder of board/ with a board.toml, e.g. qemu-x86_64")
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "images",
                    help="where the image, its .sha256 and manifest go (default build/images)")
    ap.add_argument("--check-repro", action="store_true",
                    help="build twice and fail unless both images have the same sha256")
    args = ap.parse_args(argv)
    try:
        img = build(args.board, args.out)
        if args.check_repro:
            first = sha256_file(img)
            again = build(args.board, WORK / "repro")
            second = sha256_file(again)
            if first != second:
                raise BuildError(f"not reproducible: {img} {first} but a second build gave "
                                 f"{second} ({again})")
            step(f"reproducible: two builds agree on {first}")
    except BuildError as e:
        print(f"mkimage: {args.board}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
