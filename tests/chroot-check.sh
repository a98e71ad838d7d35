#!/bin/sh
# Runs the README's two commands, `make demo` then `make test`, as root with a fresh environment
# in a freshly debootstrapped Debian 12 (bookworm) chroot, on a clean clone of HEAD, and writes
# the raw transcript (commands, commit, date, full output) to tests/logs/chroot-<date>.log.
# Outside CI: needs root, debootstrap, and network access to the Debian mirror apt uses here.
#
# Usage: tests/chroot-check.sh [--worktree] [DIR]      (default DIR: /var/tmp/semoe-chroot)
#   --worktree                check the working tree as it is (tracked and untracked files that
#                             git does not ignore) instead of a clone of HEAD: a rehearsal before
#                             committing; its transcript says so and is not the one to commit
#   SEMOE_CHROOT_MIRROR=URL   use this mirror instead of the one in the apt sources
#   SEMOE_CHROOT_KEEP=1       leave DIR in place afterwards (it is always unmounted)
#
# The base system is debootstrap's minbase plus make and ca-certificates: what a person has after
# `apt install make` on a fresh Debian 12. Everything else must come from `make demo` itself
# (deploy/install-deps.sh). CUDA is not in the chroot, so the build there runs with it
# auto-disabled. Without --worktree only committed work is checked: uncommitted changes are not
# in the clone.
set -eu

die() { echo "chroot-check: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, mount, chroot)"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: apt-get install debootstrap"

here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel) || die "$here is not inside a git checkout"
shared="$repo/../shared"
[ -d "$shared" ] || die "$shared not found: the developer checkout needs ../shared beside it"
worktree=0
if [ "${1:-}" = "--worktree" ]; then worktree=1; shift; fi
case "${1:-}" in -*) die "unknown option $1 (usage: tests/chroot-check.sh [--worktree] [DIR])" ;; esac
root=${1:-/var/tmp/semoe-chroot}
case "$root" in
  /*) ;;
  *) root="$(pwd)/$root" ;;
esac
root=${root%/}
[ "$root" != "" ] && [ "$root" != "/" ] || die "refusing to use / as the chroot"
marker="$root/.semoe-chroot"

# The mirror apt already uses here: the first non-security URI in the sources, one-line
# (sources.list, *.list) or deb822 (*.sources) format.
find_mirror() {
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    case "$f" in
      *.sources) awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' "$f" ;;
      *) awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i !~ /^\[/ && $i !~ /\]$/) { print $i; break } }' "$f" ;;
    esac
  done | grep -v -e security -e '^cdrom:' -e '^file:' | head -n 1
}
mirror=${SEMOE_CHROOT_MIRROR:-$(find_mirror)}
[ -n "$mirror" ] || die "no Debian mirror in /etc/apt/sources.list{,.d}; set SEMOE_CHROOT_MIRROR"

# A fresh chroot every run. Only a folder this script made (it holds the marker) is removed, and
# never while anything is mounted below it (rm -rf through a bind mount of /dev would be a
# disaster).
is_mounted_below() { awk -v r="$root/" 'index($2 "/", r) == 1 { found = 1 } END { exit !found }' /proc/mounts; }
if [ -e "$root" ] && [ -n "$(ls -A "$root" 2>/dev/null)" ]; then
  [ -e "$marker" ] || die "$root exists, is not empty and was not made by this script; pick another DIR"
  is_mounted_below && die "something is still mounted under $root; unmount it (umount -R) first"
  rm -rf "$root"
fi
mkdir -p "$root"
touch "$marker"

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$repo/tests/logs"
if [ "$worktree" = 1 ]; then log="$repo/tests/logs/chroot-worktree-$stamp.log"
else log="$repo/tests/logs/chroot-$stamp.log"
fi
bootlog="$root.debootstrap.log"
commit=$(git -C "$repo" rev-parse HEAD)

mounted=""
cleanup() {
  rc=$?
  for m in $mounted; do umount -R "$m" 2>/dev/null || umount -R -l "$m" 2>/dev/null || true; done
  mounted=""
  if [ "${SEMOE_CHROOT_KEEP:-0}" != 1 ] && [ -e "$marker" ] && ! is_mounted_below; then
    rm -rf "$root"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Everything below goes to the transcript as well as the terminal.
say() { printf '%s\n' "$*" | tee -a "$log"; }
: >"$log"
say "# semoe chroot check: the README's commands on a fresh Debian 12"
say "# commit: $commit"
say "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
say "# host: $(uname -srm), $(nproc) cpus"
say "# chroot: $root, mirror $mirror"
if [ "$worktree" = 1 ]; then
  say "# source: the working tree (--worktree): commit $commit plus these uncommitted changes:"
  git -C "$repo" status --short | sed 's/^/#   /' | tee -a "$log"
elif [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  say "# note: the working tree has uncommitted changes; the chroot checks commit $commit only"
fi

t0=$(date +%s)
dbs="debootstrap --variant=minbase --include=make,ca-certificates bookworm $root $mirror"
say "# $dbs  (output in $bootlog)"
if ! $dbs >"$bootlog" 2>&1; then
  tail -n 20 "$bootlog" | tee -a "$log"
  say "# debootstrap failed after $(( $(date +%s) - t0 )) s"
  exit 1
fi
touch "$marker"
say "# debootstrap: $(( $(date +%s) - t0 )) s"

# The clone (HEAD only, no hard links into the host repository), or with --worktree the files
# git would commit, and ../shared beside it.
mkdir -p "$root/root/semoe/main"
if [ "$worktree" = 1 ]; then
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard |
     grep -zv '^tests/logs/chroot-' |
     tar --null --no-recursion --ignore-failed-read -T - -cf -) |
    tar -xf - -C "$root/root/semoe/main"
else
  git clone -q --no-hardlinks "$repo" "$root/root/semoe/main"
  git -C "$root/root/semoe/main" checkout -q "$commit"
fi
cp -a "$shared" "$root/root/semoe/shared"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

mount -t proc proc "$root/proc" && mounted="$root/proc $mounted"
mount -t sysfs sysfs "$root/sys" && mounted="$root/sys $mounted"
mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev" && mounted="$root/dev $mounted"

# One README command inside the chroot, as root, with nothing from this environment. Its
# output goes through tee, which hides its exit status in POSIX sh, so the command leaves its
# status in the chroot's /tmp and rc is read from there.
run_in_chroot() {
  say ""
  say "\$ cd /root/semoe/main && $1"
  t=$(date +%s)
  rm -f "$root/tmp/semoe-rc"
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/sh -c "cd /root/semoe/main && $1; echo \$? >/tmp/semoe-rc" </dev/null 2>&1 |
    tee -a "$log" || true
  rc=$(cat "$root/tmp/semoe-rc" 2>/dev/null || echo 255)
  say "# exit status of '$1': $rc, $(( $(date +%s) - t )) s"
}

run_in_chroot "make demo"; demo_rc=$rc
run_in_chroot "make test"; test_rc=$rc

say ""
say "# make demo: exit $demo_rc; make test: exit $test_rc; total $(( $(date +%s) - t0 )) s"
# The transcript is committed: it names the mirror by role, not by host.
sed -i "s#$mirror#<debian-mirror>#g" "$log"
echo "chroot-check: transcript in $log"
[ "$demo_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
