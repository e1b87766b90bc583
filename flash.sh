#!/usr/bin/env bash
# flash.sh: writes an appliance image to a whole disk (SD card, USB stick, eMMC,
# SSD, loop device) and proves it by reading the disk back.
#
# It owns the safety checks that stand between an operator and the wrong disk:
# only a whole block device that is not mounted, not used as swap, not held by
# device-mapper or RAID, and not the disk of the running root filesystem is
# written, and only after the operator types its name back (or passes --yes).
# See docs/flash.md.
set -euo pipefail

readonly EXIT_OK=0 EXIT_REFUSED=1 EXIT_WRITE=2 EXIT_VERIFY=3
readonly BS=4M

usage() {
  cat <<'EOF'
Usage: flash.sh [options] IMAGE DEVICE

Writes IMAGE to the whole disk DEVICE and verifies it by reading it back.

IMAGE may be raw or compressed (.xz, .gz, .zst). When IMAGE.bmap (or the bmap
of the uncompressed name) exists and bmaptool is installed, only the mapped
blocks are written with `bmaptool copy` and each mapped range is verified
against the bmap's checksum; otherwise the whole image is written with a
synchronous dd and verified against its sha256.

Options:
  -y, --yes      do not ask to type the device name back
  -n, --dry-run  run every check and show the target, write nothing
      --no-bmap  ignore a bmap file, write the whole image
  -h, --help     show this help

Exit status:
  0  written and verified (or a dry run whose checks passed)
  1  usage error or refused: bad image, unsafe or unsuitable device, no
     confirmation; nothing was written
  2  writing failed or was interrupted: the device holds a partial image
  3  verification failed: the device does not read back what was written
EOF
}

say() { printf 'flash: %s\n' "$*" >&2; }
refuse() {
  printf 'flash: refused: %s\n' "$*" >&2
  exit "$EXIT_REFUSED"
}
usage_error() {
  printf 'flash: %s\n' "$*" >&2
  printf 'Try "flash.sh --help".\n' >&2
  exit "$EXIT_REFUSED"
}
human() { numfmt --to=iec-i --suffix=B --round=nearest --format='%.1f' "$1"; }

# --- arguments ---------------------------------------------------------------

assume_yes=0
dry_run=0
use_bmap=1
positional=()
while [ $# -gt 0 ]; do
  case $1 in
    -y | --yes) assume_yes=1 ;;
    -n | --dry-run) dry_run=1 ;;
    --no-bmap) use_bmap=0 ;;
    -h | --help)
      usage
      exit "$EXIT_OK"
      ;;
    --)
      shift
      positional+=("$@")
      break
      ;;
    -?*) usage_error "unknown option: $1" ;;
    *) positional+=("$1") ;;
  esac
  shift
done
if [ ${#positional[@]} -ne 2 ]; then
  usage_error "expected IMAGE and DEVICE, got ${#positional[@]} argument(s)"
fi
image=${positional[0]}
device_arg=${positional[1]}

if [ "$(id -u)" -ne 0 ]; then
  refuse "must run as root: it writes a raw block device"
fi
for tool in lsblk findmnt blockdev blkid dd sha256sum numfmt flock; do
  command -v "$tool" >/dev/null || refuse "required tool '$tool' is not installed"
done

# Everything that later phases need to clean up or report.
phase="checks"
child=""
tmpdir=$(mktemp -d)

# Runs "$@" in the background in a process group of its own and waits for it:
# a signal then reaches the trap at once (a foreground pipeline would delay it
# to its end) and the trap stops the whole pipeline, not only its first process.
run_job() {
  local rc=0
  set -m
  "$@" &
  child=$!
  set +m
  wait "$child" || rc=$?
  child=""
  return "$rc"
}

# shellcheck disable=SC2317  # both run from the traps below
on_exit() { rm -rf "$tmpdir"; }
# shellcheck disable=SC2317
on_signal() {
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
    # dd dies only when its write in flight returns; the device is not left
    # with a writer unless the disk hangs (then it says so).
    local waited=0
    while kill -0 -- "-$child" 2>/dev/null; do
      if [ "$waited" -ge 300 ]; then
        say "a writer to $device_arg (process group $child) is still stuck in I/O"
        break
      fi
      sleep 0.1
      waited=$((waited + 1))
    done
  fi
  case $phase in
    write)
      say "interrupted while writing: $device_arg holds a partial image"
      exit "$EXIT_WRITE"
      ;;
    verify)
      say "interrupted while verifying: the write finished but was not verified"
      exit "$EXIT_VERIFY"
      ;;
    *)
      say "interrupted before writing: nothing was written"
      exit "$EXIT_REFUSED"
      ;;
  esac
}
trap on_exit EXIT
trap on_signal INT TERM HUP

# --- the device ----------------------------------------------------------------

[ -e "$device_arg" ] || [ -L "$device_arg" ] || refuse "device $device_arg does not exist"
device=$(readlink -f -- "$device_arg")
[ -e "$device" ] || refuse "device $device_arg is a dangling link (to $device)"
if [ ! -b "$device" ]; then
  if [ -c "$device" ]; then kind="a character device"
  elif [ -d "$device" ]; then kind="a directory"
  elif [ -f "$device" ]; then kind="a regular file"
  else kind="not a device"
  fi
  refuse "$device_arg is $kind, not a block device; give a whole disk such as /dev/sdX, /dev/mmcblkN or /dev/loopN"
fi

# A disk plugged in (or a loop device attached) a moment ago may not be listed yet: lsblk
# hides a device until its size is known. Give it up to 3 s before calling it unknown.
dev_type=""
for _ in $(seq 30); do
  dev_type=$(lsblk -dno TYPE "$device" 2>/dev/null || true)
  [ -n "$dev_type" ] && break
  sleep 0.1
done
case $dev_type in
  disk | loop) ;;
  part)
    parent=$(lsblk -dno PKNAME "$device")
    refuse "$device_arg is a partition of /dev/$parent, not a whole disk; flash /dev/$parent instead"
    ;;
  "") refuse "lsblk does not know $device_arg (an unattached loop device or a removed disk?)" ;;
  *) refuse "$device_arg is a '$dev_type' device (device-mapper, RAID, ...), not a whole disk" ;;
esac


# The disks (or loop devices) under a block device, through partitions,
# device-mapper and RAID: lsblk --inverse walks from the device to its disks.
disks_under() {
  lsblk -nsrpo NAME,TYPE -- "$1" 2>/dev/null | awk '$2 == "disk" || $2 == "loop" { print $1 }'
}

# The disks that hold the running root filesystem, through partitions,
# device-mapper (LVM, LUKS) and RAID. Both the source path and the device
# number are tried: one of them can be /dev/root or an anonymous btrfs number.
root_disks() {
  local src majmin sysdev
  src=$(findmnt -no SOURCE / 2>/dev/null || true)
  src=${src%%\[*}
  if [ -b "$src" ]; then disks_under "$src"; fi
  majmin=$(findmnt -no MAJ:MIN / 2>/dev/null || true)
  majmin=${majmin// /}
  sysdev=/sys/dev/block/$majmin
  if [ -n "$majmin" ] && [ -e "$sysdev" ]; then
    disks_under "/dev/$(basename "$(readlink -f "$sysdev")")"
  fi
}

check_not_root() {
  local d
  while read -r d; do
    if [ -n "$d" ] && [ "$(readlink -f "$d")" = "$device" ]; then
      refuse "$device_arg holds the running root filesystem (/ is on $(findmnt -no SOURCE /))"
    fi
  done < <(root_disks | sort -u)
}

# A device is in use when it, a partition of it, or anything stacked on them
# (LVM, LUKS, RAID) is mounted or used as swap, or when anything is stacked on
# it at all: lsblk lists all of these as its descendants.
check_not_in_use() {
  local name type mnt used=()
  while read -r name type mnt; do
    mnt=$(printf '%b' "$mnt")
    if [ "$mnt" = "[SWAP]" ]; then
      used+=("$name is active swap")
    elif [ -n "$mnt" ]; then
      used+=("$name is mounted on $mnt")
    elif [ "$type" != part ] && [ "$name" != "$device" ]; then
      used+=("$name ($type) is stacked on it")
    fi
  done < <(lsblk -nrpo NAME,TYPE,MOUNTPOINT -- "$device")
  # Swap that lsblk could not attribute (a stale name, a device it skipped):
  # /proc/swaps names the device, its disks are compared.
  local swapdev disk
  while read -r swapdev _; do
    [ -b "$swapdev" ] || continue
    while read -r disk; do
      if [ "$(readlink -f "$disk")" = "$device" ] && [[ " ${used[*]} " != *" $swapdev is active swap"* ]]; then
        used+=("$swapdev is active swap")
      fi
    done < <(disks_under "$swapdev")
  done < <(tail -n +2 /proc/swaps)
  if [ ${#used[@]} -gt 0 ]; then
    refuse "$device_arg is in use: $(printf '%s; ' "${used[@]}")unmount it (or swapoff, vgchange -an, mdadm --stop) first"
  fi
}

check_not_root
check_not_in_use

# Only now is the device opened: everything above reads sysfs and mountinfo.
if ! dev_size=$(blockdev --getsize64 "$device") || ! ro=$(blockdev --getro "$device") ||
  ! sector=$(blockdev --getss "$device"); then
  refuse "cannot open $device_arg (see the error above)"
fi
[ "$dev_size" -gt 0 ] || refuse "$device_arg has size 0 (no medium inserted, or an unattached loop device)"
[ "$ro" = 0 ] || refuse "$device_arg is read-only (write-protect switch, or a read-only loop device)"

# --- the image -----------------------------------------------------------------

[ -e "$image" ] || refuse "image $image does not exist"
[ -f "$image" ] || refuse "image $image is not a regular file"
[ -r "$image" ] || refuse "image $image is not readable"
[ -s "$image" ] || refuse "image $image is empty"

if [ "$dev_type" = loop ]; then
  # Writing a loop device's own backing file into it would read what it writes.
  read -r back_ino back_dev < <(losetup -nO BACK-INO,BACK-MAJ:MIN "$device" 2>/dev/null || true)
  img_dev=$(stat -L -c '%Hd:%Ld' -- "$image")
  if [ "${back_ino:-}" = "$(stat -L -c %i -- "$image")" ] && [ "${back_dev:-}" = "$img_dev" ]; then
    refuse "image $image is the backing file of $device_arg itself"
  fi
fi

# decompress=(...) reads the image to stdout; empty for a raw image.
decompress=()
image_base=$image
case $image in
  *.xz) decompress=(xz -dc --) image_base=${image%.xz} ;;
  *.gz) decompress=(gzip -dc --) image_base=${image%.gz} ;;
  *.zst) decompress=(zstd -dcq --) image_base=${image%.zst} ;;
esac
if [ ${#decompress[@]} -gt 0 ] && ! command -v "${decompress[0]}" >/dev/null; then
  refuse "$image is compressed but '${decompress[0]}' is not installed"
fi

bmap=""
if [ "$use_bmap" = 1 ]; then
  for candidate in "$image.bmap" "$image_base.bmap"; do
    if [ -f "$candidate" ]; then bmap=$candidate; break; fi
  done
  if [ -n "$bmap" ] && ! command -v bmaptool >/dev/null; then
    say "found $bmap but bmaptool is not installed: writing the whole image with dd"
    bmap=""
  fi
fi

# The bmap's ranges become "checksum first_block last_block" lines.
bmap_field() { sed -n "s:.*<$1> *\([^ <]*\) *</$1>.*:\1:p" "$bmap" | head -n 1; }
if [ -n "$bmap" ]; then
  image_size=$(bmap_field ImageSize)
  bmap_bs=$(bmap_field BlockSize)
  bmap_sum=$(bmap_field ChecksumType)
  sed -n 's:.*<Range chksum="\([0-9a-fA-F]*\)"> *\([0-9]*\)-\{0,1\}\([0-9]*\) *</Range>.*:\1 \2 \3:p' \
    "$bmap" | awk '{ print $1, $2, ($3 == "" ? $2 : $3) }' >"$tmpdir/ranges"
  ranges=$(wc -l <"$tmpdir/ranges")
  if ! [[ $image_size =~ ^[0-9]+$ && $bmap_bs =~ ^[0-9]+$ ]] || [ "$bmap_bs" -eq 0 ] ||
    [ "$ranges" -ne "$(grep -c '<Range' "$bmap")" ]; then
    refuse "cannot read the block map $bmap (no ImageSize, BlockSize or checksummed ranges); pass --no-bmap to ignore it"
  fi
  case $bmap_sum in
    sha256 | sha1 | md5) ;;
    *) refuse "block map $bmap has checksum type '$bmap_sum' (sha256, sha1 or md5 needed); pass --no-bmap to ignore it" ;;
  esac
  if [ $((bmap_bs % sector)) -ne 0 ]; then
    refuse "block map block size $bmap_bs is not a multiple of the $sector-byte sectors of $device_arg"
  fi
  mapped=$(awk -v bs="$bmap_bs" '{ n += ($3 - $2 + 1) * bs } END { print n + 0 }' "$tmpdir/ranges")
else
  # One pass over the (decompressed) image before anything is written: its
  # length for the size check, its digest for the verification, and a broken
  # or truncated compressed file found while the device is still intact.
  say "reading $image to measure it and compute its sha256"
  if [ ${#decompress[@]} -gt 0 ]; then
    reader=("${decompress[@]}" "$image")
  else
    reader=(cat -- "$image")
  fi
  # shellcheck disable=SC2317  # run through run_job
  measure_image() {
    local rc=0 hasher
    mkfifo "$tmpdir/tap"
    sha256sum <"$tmpdir/tap" >"$tmpdir/sum" &
    hasher=$!
    "${reader[@]}" | dd bs="$BS" iflag=fullblock status=progress |
      tee "$tmpdir/tap" | wc -c >"$tmpdir/size" || rc=$?
    wait "$hasher" || rc=1
    return "$rc"
  }
  run_job measure_image || refuse "cannot read $image (see the error above)"
  image_size=$(tr -d ' \n' <"$tmpdir/size")
  image_sum=$(cut -d ' ' -f 1 "$tmpdir/sum")
  [ "$image_size" -gt 0 ] || refuse "image $image is empty once decompressed"
fi

if [ "$image_size" -gt "$dev_size" ]; then
  refuse "image is $image_size bytes ($(human "$image_size")) but $device_arg holds only $dev_size bytes ($(human "$dev_size"))"
fi

# --- show the target and confirm --------------------------------------------------

if [ "$dev_type" = loop ]; then
  backing=$(losetup -nO BACK-FILE "$device" 2>/dev/null || true)
  say "target $device_arg: loop device backed by ${backing:-?}, size $(human "$dev_size") ($dev_size bytes)"
else
  model=$(lsblk -dno MODEL "$device" || true)
  serial=$(lsblk -dno SERIAL "$device" || true)
  say "target $device_arg: model ${model:-?}, size $(human "$dev_size") ($dev_size bytes), serial ${serial:-?}"
fi
# blkid probes the disk itself: lsblk's FSTYPE needs a udev database, which
# an appliance build host or a container may lack.
while read -r name; do
  fstype=$(blkid -p -s TYPE -o value -- "$name" 2>/dev/null || true)
  label=$(blkid -p -s LABEL -o value -- "$name" 2>/dev/null || true)
  [ "$name" = "$device" ] && [ -z "$fstype" ] && continue
  say "  it holds $name: ${fstype:-no known filesystem}${label:+, label \"$label\"}"
done < <(lsblk -nrpo NAME -- "$device")
description="image $image: $image_size bytes ($(human "$image_size"))"
[ ${#decompress[@]} -eq 0 ] || description+=", ${decompress[0]}-compressed"
if [ -n "$bmap" ]; then
  description+=", block map $bmap: $(human "$mapped") mapped in $ranges ranges"
fi
say "$description"

if [ "$dry_run" = 1 ]; then
  say "dry run: every check passed, nothing was written"
  exit "$EXIT_OK"
fi

if [ "$assume_yes" != 1 ]; then
  say "ALL DATA ON $device_arg WILL BE LOST."
  printf 'flash: type the device name (%s) to write it, anything else aborts: ' "$device_arg" >&2
  answer=""
  if ! IFS= read -r answer; then
    printf '\n' >&2
    refuse "no confirmation given (end of input); nothing was written. Pass --yes to skip the question"
  fi
  # Piped answers are not echoed; end the prompt line for the next message.
  [ -t 0 ] || printf '\n' >&2
  if [ "$answer" != "$device_arg" ] && [ "$answer" != "$device" ]; then
    refuse "'$answer' is not $device_arg; nothing was written"
  fi
fi

# A second flash.sh (or a partitioning tool that honours the convention) on
# the same disk waits for this lock; udev does not probe a locked disk.
exec {lock_fd}<"$device"
flock -x -w 10 "$lock_fd" || refuse "$device_arg is locked by another program (another flash.sh?)"
# The operator may have mounted something while reading the question.
check_not_in_use

# --- write --------------------------------------------------------------------------

phase="write"
started=$(date +%s)
# shellcheck disable=SC2317  # run through run_job
write_image() {
  if [ -n "$bmap" ]; then
    bmaptool copy --bmap "$bmap" "$image" "$device" </dev/null
  elif [ ${#decompress[@]} -gt 0 ]; then
    "${decompress[@]}" "$image" |
      dd of="$device" bs="$BS" iflag=fullblock oflag=direct,sync conv=fsync status=progress
  else
    dd if="$image" of="$device" bs="$BS" oflag=direct,sync conv=fsync status=progress
  fi
}
if [ -n "$bmap" ]; then
  say "writing the mapped blocks of $image to $device_arg with bmaptool"
else
  say "writing $image to $device_arg ($(human "$image_size")) with synchronous direct writes"
fi
if ! run_job write_image; then
  say "write failed (see the error above); $device_arg holds a partial image"
  exit "$EXIT_WRITE"
fi
say "flushing $device_arg and dropping its cached blocks"
if ! blockdev --flushbufs "$device"; then
  say "write failed: flushing $device_arg failed"
  exit "$EXIT_WRITE"
fi
say "written in $(($(date +%s) - started)) s"

# --- verify ---------------------------------------------------------------------------

phase="verify"
# Reads LENGTH bytes at OFFSET of the device, bypassing the page cache, and
# writes their digest to $tmpdir/got. O_DIRECT reads must be whole sectors, so
# the read is rounded up and the surplus dropped before hashing.
# shellcheck disable=SC2317  # run through run_job
read_back_sum() {
  local offset=$1 length=$2 tool=$3 progress=$4 rounded
  rounded=$(((length + sector - 1) / sector * sector))
  dd if="$device" bs="$BS" iflag=direct,fullblock,skip_bytes,count_bytes \
    skip="$offset" count="$rounded" status="$progress" |
    {
      head -c "$length"
      cat >/dev/null
    } | "$tool" | cut -d ' ' -f 1 >"$tmpdir/got"
}

verify_failed() {
  say "VERIFY FAILED: $*"
  say "$device_arg does not hold a good copy of $image: the medium may be faulty; do not use it"
  exit "$EXIT_VERIFY"
}

if [ -n "$bmap" ]; then
  say "verifying: reading back the $ranges mapped ranges ($(human "$mapped")) and comparing their $bmap_sum"
  done_bytes=0
  index=0
  next_report=10
  while read -r want first last; do
    index=$((index + 1))
    offset=$((first * bmap_bs))
    end=$(((last + 1) * bmap_bs))
    [ "$end" -le "$image_size" ] || end=$image_size
    if ! run_job read_back_sum "$offset" $((end - offset)) "${bmap_sum}sum" none; then
      verify_failed "reading back range $index (bytes $offset-$((end - 1))) failed (see the error above)"
    fi
    got=$(cat "$tmpdir/got")
    if [ "${got,,}" != "${want,,}" ]; then
      verify_failed "range $index of $ranges (bytes $offset-$((end - 1))) reads back with $bmap_sum $got, the image has $want"
    fi
    done_bytes=$((done_bytes + end - offset))
    if [ $((done_bytes * 100 / mapped)) -ge "$next_report" ]; then
      say "verified $((done_bytes * 100 / mapped))% ($(human "$done_bytes") of $(human "$mapped"))"
      next_report=$((done_bytes * 100 / mapped / 10 * 10 + 10))
    fi
  done <"$tmpdir/ranges"
  say "verified: every mapped range of $device_arg matches the block map"
else
  say "verifying: reading back $(human "$image_size") from $device_arg and comparing sha256"
  if ! run_job read_back_sum 0 "$image_size" sha256sum progress; then
    verify_failed "reading back $device_arg failed (see the error above)"
  fi
  got=$(cat "$tmpdir/got")
  if [ "$got" != "$image_sum" ]; then
    verify_failed "the first $image_size bytes of $device_arg have sha256 $got, the image has $image_sum"
  fi
  say "verified: sha256 $got"
fi
phase="finished"
say "done: $image written to $device_arg and verified"
exit "$EXIT_OK"
