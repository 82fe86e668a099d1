#!/usr/bin/env bash
# A device call sends the working tree: tracked files, untracked files git does not ignore and the carried paths, at
# most 64 MiB together. The two committed proxy snapshots are 48 MB of it (the checkout alone: ~68 MB), so before a
# device call they are parked: moved into the git-ignored .dev/parked/, so they stay behind unless the call carries
# .dev/parked/NAME (train.py --vae-init/--dit-init .dev/parked). A symbolic link left in their place would not help:
# the device tool counts the tracked files through it. While parked, nothing here can read the snapshots (the
# release build embeds none), so park for the call only.
#
#   tools/device_tree.sh size [CARRY...]   # MiB that would travel (tree + carried paths), against the 64 MiB limit
#   tools/device_tree.sh park              # before the call
#   tools/device_tree.sh unpark            # right after it (`git status` is clean again); commit nothing in between
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
SNAPSHOTS=crates/qwen-image-proxy/snapshots
PARKED=.dev/parked
NAMES=(qwen-image-edit-proxy qwen-image-edit-plus-proxy)

# move_all FROM TO VERB: each snapshot folder found in FROM into TO, refusing to overwrite one there
move_all() {
  for n in "${NAMES[@]}"; do
    [ -d "$1/$n" ] || continue
    [ -e "$2/$n" ] && { echo "$2/$n exists: $1/$n left as it is" >&2; exit 1; }
    mv "$1/$n" "$2/$n"
    echo "$3 $n"
  done
}

case "${1:-}" in
  size)
    shift
    # a parked folder's files are still in git's index but missing here: stat skips them, as the device tool does
    tree=$( { git ls-files -z --cached --others --exclude-standard
              for c in "$@"; do find "$c" -type f -print0; done; } \
      | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
    awk -v b="$tree" 'BEGIN {printf "%.1f MiB of 64 MiB would travel%s\n", b / 2^20, (b > 64 * 2^20 ? " (OVER)" : "")}'
    ;;
  park)
    mkdir -p "$PARKED"
    move_all "$SNAPSHOTS" "$PARKED" parked
    ;;
  unpark)
    move_all "$PARKED" "$SNAPSHOTS" unparked
    # A build made while parked embedded no snapshot, and cargo does not notice their return by itself: make the
    # proxy crate's build script run again (otherwise the proxy tests fail with "not bundled in this build").
    touch crates/qwen-image-proxy/build.rs
    git status --short -- "$SNAPSHOTS"
    ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
