#!/usr/bin/env bash
# Validates this BR2_EXTERNAL tree against a Buildroot checkout, the way Buildroot's own CI
# checks its defconfigs and packages, without building anything:
#
#   buildroot/check.sh BUILDROOT_DIR
#
# For every configs/*_defconfig: `make BR2_EXTERNAL=<this tree> <defconfig>` in a scratch
# output folder, then support/scripts/check-dotconfig.py (fails when a BR2_ line of the
# defconfig did not survive into .config, i.e. was silently dropped: a symbol renamed, a
# dependency missing) and a look for every symbol the tree's packages select in .config
# (a select of a package this Buildroot lacks is ignored), then `make show-info`, which must list the firmware package and every
# package of this tree. Last, `utils/check-package -b` on every file of the tree, run from
# the tree as Buildroot's manual says for external trees (it needs shellcheck, flake8 and
# python-magic). Every check runs even after one fails; the exit status is 1 if any failed.
set -uo pipefail

if [ $# -ne 1 ] || [ ! -f "$1/Makefile" ] || [ ! -x "$1/utils/check-package" ]; then
    echo "usage: $0 BUILDROOT_DIR   (a Buildroot checkout, e.g. of the 2026.02 LTS)" >&2
    exit 2
fi
br=$(cd "$1" && pwd)
tree=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
failed=0

ok() { echo "  ok    $*"; }
bad() { echo "  FAIL  $*"; failed=1; }
indent() { sed 's/^/        /'; }

version=$(git -C "$br" describe --tags 2>/dev/null || sed -n 's/^export BR2_VERSION := //p' "$br/Makefile")
echo "Buildroot: $br ($version)"
echo "tree:      $tree"

packages=()
for mk in "$tree"/package/*/*.mk; do
    packages+=("$(basename "$mk" .mk)")
done
# What the tree's packages select: Kconfig ignores a select of a symbol this Buildroot does
# not have (a package it lacks), so each one is looked for in .config.
mapfile -t selects < <(sed -n 's/^[[:space:]]*select \(BR2_[A-Z0-9_]*\).*/\1/p' \
    "$tree"/package/*/Config.in | sort -u)

for defconfig in "$tree"/configs/*_defconfig; do
    name=$(basename "$defconfig")
    out=$scratch/${name%_defconfig}
    echo
    echo "== $name"
    if make -s -C "$br" O="$out" BR2_EXTERNAL="$tree" "$name" >"$out.log" 2>&1; then
        ok "make $name"
    else
        bad "make $name:"
        indent <"$out.log"
        continue
    fi
    # files the defconfig takes from Buildroot itself (its qemu boards' kernel configs)
    while read -r file; do
        if [ -e "$br/$file" ]; then
            ok "$file is in this Buildroot"
        else
            bad "$file (named by $name) is not in this Buildroot"
        fi
    done < <(sed -n 's/^BR2_[A-Z0-9_]*="\(board\/[^"$ ]*\)"$/\1/p' "$defconfig")
    if python3 "$br/support/scripts/check-dotconfig.py" "$out/.config" "$defconfig" \
            >"$out.dotconfig" 2>&1; then
        ok "check-dotconfig: every BR2_ line of the defconfig is in .config"
    else
        bad "check-dotconfig:"
        indent <"$out.dotconfig"
    fi
    missing=()
    for sym in "${selects[@]}"; do
        grep -qx "$sym=y" "$out/.config" || missing+=("$sym")
    done
    if [ ${#missing[@]} = 0 ]; then
        ok "every symbol the tree's packages select is set (${#selects[@]})"
    else
        bad "selected but not set (this Buildroot lacks them): ${missing[*]}"
    fi
    if make -s -C "$out" show-info >"$out.json" 2>"$out.err"; then
        for pkg in "${packages[@]}"; do
            got=$(python3 -c 'import json, sys
info = json.load(open(sys.argv[1])).get(sys.argv[2])
print("%s (%s)" % (info["version"], info["type"]) if info else "")' "$out.json" "$pkg")
            if [ -n "$got" ]; then
                ok "show-info lists $pkg $got"
            else
                bad "show-info does not list $pkg"
            fi
        done
    else
        bad "make show-info:"
        indent <"$out.err"
    fi
done

echo
echo "== check-package -b (every file of the tree)"
# check-package imports magic (python-magic) and flake8: the first python3 that has both
# runs it (CHECK_PACKAGE_PYTHON chooses one), e.g. Debian's with python3-magic and flake8.
py=""
for cand in ${CHECK_PACKAGE_PYTHON:-} python3 /usr/bin/python3; do
    if "$cand" -c 'import magic, flake8' 2>/dev/null; then
        py=$cand
        break
    fi
done
mapfile -t files < <(cd "$tree" && find . -type f ! -name '*.pyc' | sed 's|^\./||' | sort)
if [ -z "$py" ]; then
    bad "check-package needs a python3 with the modules magic and flake8 (Debian:" \
        "apt-get install python3-magic flake8); set CHECK_PACKAGE_PYTHON to one"
elif (cd "$tree" && "$py" "$br/utils/check-package" -b "${files[@]}") \
        >"$scratch/check-package" 2>&1; then
    ok "check-package -b on ${#files[@]} files"
    indent <"$scratch/check-package"
else
    bad "check-package -b on ${#files[@]} files:"
    indent <"$scratch/check-package"
fi

echo
if [ "$failed" = 0 ]; then
    echo "check.sh: all checks passed against Buildroot $version"
else
    echo "check.sh: FAILED against Buildroot $version"
fi
exit "$failed"
