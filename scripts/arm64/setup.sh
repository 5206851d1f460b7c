#!/usr/bin/env bash
# Set up (once, cached) what runs the qwen-edge runtime as aarch64 on an x86-64 Linux host:
#   - a sysroot of Debian bookworm's arm64 python3.11 and the libraries it links (dpkg -x),
#   - the runtime's manylinux aarch64 wheels from requirements/arm64.txt (pip --require-hashes),
#   - qemu-aarch64 from Debian trixie's qemu-user 10.0 (static; bookworm's 7.2 crashes in onnxruntime 1.32).
# Every .deb is pinned by version and sha256 in scripts/arm64/debs.lock and fetched with apt-get from
# the mirrors this host's apt sources name, through a private apt configuration (the host's is untouched).
#   scripts/arm64/setup.sh            set up (a no-op when the cache matches the locks); prints the cache dir
#   scripts/arm64/setup.sh --relock   re-pin debs.lock to the mirrors' current versions
# Run the runtime with scripts/arm64/python (e.g. scripts/arm64/python -m qwen_edge.cli run ART "hi").
# Cache: $QWEN_EDGE_ARM64_CACHE, default ~/.cache/qwen-edge/arm64.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cache="${QWEN_EDGE_ARM64_CACHE:-$HOME/.cache/qwen-edge/arm64}"
lock="$here/debs.lock"
wheels="$repo/requirements/arm64.txt"

die() { echo "arm64/setup.sh: $*" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || die "this harness emulates aarch64 on an x86-64 Linux host; this is $(uname -m)"
for tool in apt-get dpkg sha256sum; do
  command -v "$tool" >/dev/null || die "needs $tool (a Debian or Ubuntu host)"
done

# The host's Debian mirrors (deb822 .sources or one-line sources.list), reused for arm64 and trixie.
mirror() {  # $1: debian | debian-security
  { grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | sed 's/^URIs:[[:space:]]*//' | tr ' ' '\n'
    grep -hsE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/' || true
  } | { grep -E "/$1/?\$" || true; } | head -n1 | sed 's:/$::'
}

apt_setup() {
  local debian security dir="$cache/apt"
  debian="$(mirror debian)"
  security="$(mirror debian-security)"
  [ -n "$debian" ] || die "no Debian mirror in /etc/apt/sources.list*; add one (Debian's own archive) and re-run"
  mkdir -p "$dir/lists/partial" "$dir/archives/partial" "$dir/prefs.d"
  : >"$dir/status"
  {
    echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $debian bookworm main"
    [ -z "$security" ] ||
      echo "deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $security bookworm-security main"
    echo "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $debian trixie main"
  } >"$dir/sources.list"
  cat >"$dir/apt.conf" <<EOF
Dir::State "$dir";
Dir::State::status "$dir/status";
Dir::Cache "$dir";
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::Etc::Preferences "$dir/preferences";
Dir::Etc::PreferencesParts "$dir/prefs.d";
APT::Architecture "arm64";
APT::Architectures { "arm64"; "amd64"; };
EOF
  export APT_CONFIG="$dir/apt.conf"
  apt-get -qq update || die "apt-get update failed for $dir/sources.list; check the network and re-run"
}

pins() { grep -vE '^[[:space:]]*(#|$)' "$lock"; }

if [ "${1:-}" = --relock ]; then
  apt_setup
  head="$(grep '^#' "$lock")"
  names="$(pins | awk '{print $1}' | sed 's/=.*//')"
  { echo "$head"
    for name in $names; do
      uri="$(apt-get download --print-uris "$name" 2>/dev/null)" || die "$name is no longer on the mirror"
      version="$(apt-cache policy "$name" | awk '/Candidate:/ {print $2}')"
      echo "$name=$version $(echo "$uri" | awk '{sub("SHA256:", "", $4); print $4}')"
    done
  } >"$lock.new"
  mv "$lock.new" "$lock"
  echo "re-pinned $lock; run scripts/arm64/setup.sh" >&2
  exit 0
fi
[ $# -eq 0 ] || die "usage: $0 [--relock]"

stamp="$cache/.stamp"
want="$(cat "$lock" "$wheels" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$cache"
  exit 0
fi

apt_setup
debs="$cache/debs"
part="$debs/partial"
mkdir -p "$debs"
cached() {  # the cached .deb of package $1 whose sha256 is $2, if any
  local f
  for f in "$debs/${1%%:*}"_*.deb; do
    if [ -f "$f" ] && [ "$(sha256sum "$f" | cut -d' ' -f1)" = "$2" ]; then echo "$f"; fi
  done
}
missing=()
while read -r pin sha; do
  [ -n "$(cached "${pin%%=*}" "$sha")" ] || missing+=("$pin")
done < <(pins)
if [ ${#missing[@]} -gt 0 ]; then
  rm -rf "$part" && mkdir -p "$part"
  (cd "$part" && apt-get -qq download "${missing[@]}") ||
    die "apt-get could not fetch every pinned package (one superseded on the mirror?); run: bash scripts/arm64/setup.sh --relock"
fi
while read -r pin sha; do
  name="${pin%%=*}"
  have="$(cached "$name" "$sha")"
  if [ -z "$have" ]; then
    f="$(echo "$part/${name%%:*}"_*.deb)"
    [ -f "$f" ] || die "apt-get wrote no .deb for $pin"
    got="$(sha256sum "$f" | cut -d' ' -f1)"
    [ "$got" = "$sha" ] || die "$pin: the .deb's sha256 is $got, debs.lock pins $sha"
    have="$debs/$(basename "$f")"
    mv "$f" "$have"
  fi
  echo "$have"
done < <(pins) >"$cache/debs.list"
rm -rf "$part"

# A fresh sysroot each time the locks change, swapped in whole: nothing half-unpacked stays behind.
new="$cache/sysroot.new"
rm -rf "$new"
mkdir -p "$new"
while read -r deb; do
  case "$deb" in
    # only the aarch64 emulator of the ~30 qemu-user ships
    */qemu-user_*) mkdir -p "$new/qemu" && dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$new/qemu" ./usr/bin/qemu-aarch64 ;;
    *) dpkg -x "$deb" "$new" ;;
  esac
done <"$cache/debs.list"
[ -x "$new/qemu/usr/bin/qemu-aarch64" ] || die "qemu-user's .deb has no usr/bin/qemu-aarch64"
"${PYTHON:-$repo/.venv/bin/python}" -m pip install -q --no-deps --require-hashes --only-binary=:all: \
  --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  --python-version 3.11 --implementation cp --target "$new/site-packages" -r "$wheels" ||
  die "pip could not install the aarch64 wheels of $wheels"
# Debian byte-compiles the standard library when the package is installed, which dpkg -x skips: compile it
# here (bytecode is the same on every CPU), or every emulated start compiles what it imports.
"${PYTHON:-$repo/.venv/bin/python}" -m compileall -q -j 0 "$new/usr/lib/python3.11" >/dev/null ||
  die "could not byte-compile the sysroot's standard library"
rm -rf "$cache/sysroot"
mv "$new" "$cache/sysroot"
echo "$want" >"$stamp"
echo "$cache"
