#!/usr/bin/env bash
# Prepares ios/'s dependencies for a build on Linux's CPU (x86-64) and points
# SwiftPM at them. See ios/README.md, "Building on Linux (CPU)".
#
#   ios/scripts/linux-deps.sh [--mirror-root DIR] [--ios DIR] [--build [--fixture DIR]] WORKDIR
#
# 1. Clones, under WORKDIR/src, each pinned version (only its tag):
#    mlx-swift 0.31.6, mlx-swift-lm 3.31.4, mlx v0.31.1 and mlx-c v0.6.0 (the
#    commits mlx-swift 0.31.6 records for its submodules), swift-numerics 1.1.1,
#    swift-argument-parser 1.8.2, swift-syntax 603.0.2. Each commit is checked
#    against the one below. Source: https://github.com/<owner>/<name>, or with
#    --mirror-root DIR a local clone DIR/<owner>+<name>/repo, DIR/<owner>+<name>,
#    DIR/<name>.git or DIR/<name> (all must be there: nothing falls back to
#    the network).
# 2. Applies our edits to mlx-swift and mlx-swift-lm (linux_edits.py: each one
#    an operation on an anchor line that must be there exactly once), with the
#    compiled-CPU-kernel preamble made by mlx v0.31.1's own
#    make_compiled_preamble.sh and g++; commits them (fixed author and date, so
#    a rerun makes the same commit) and moves the tags 0.31.6 and 3.31.4 there.
# 3. Writes WORKDIR/gitconfig: url.<clone>.insteadOf for every repository,
#    and protocol.file.allow = always (git 2.38.1 and later refuse local
#    submodules without it). It is used through GIT_CONFIG_GLOBAL.
# 4. In ios/: where Package.resolved or .build/checkouts holds another commit
#    of a dependency (e.g. before the tags moved), removes Package.resolved and
#    that dependency's checkout, repository clone and workspace-state entry,
#    then resolves with SwiftPM caches under WORKDIR/swiftpm and checks that
#    every pin is the expected commit. Nothing is removed when all are.
# 5. Prints the build and test commands, or runs them with --build.
#
# Installs nothing: it says which Debian packages are missing.
# Rerunning is safe: clones are kept, edits are made again from the upstream
# commit (branch "upstream" in each clone).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
edits="$here/linux_edits.py"
ios="$(cd "$here/.." && pwd)"
mirror_root=""
build=0
fixture=""
work=""

usage() {
    sed -n '2,5p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

  WORKDIR            where the clones, the git config and SwiftPM's caches go
                     (outside the repository; created if missing)
  --mirror-root DIR  clone from local repositories under DIR, not GitHub
  --ios DIR          the Swift package to resolve (default: this script's ios/)
  --build            also run the build and the tests
  --fixture DIR      with --build: the parity fixture (python -m bench
                     export-parity --out DIR); without it those tests skip
EOF
}

die() { echo "linux-deps.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        --mirror-root) [ $# -ge 2 ] || die "--mirror-root needs a directory"
                       mirror_root="$(cd "$2" && pwd)" || die "no directory $2"; shift 2 ;;
        --ios) [ $# -ge 2 ] || die "--ios needs a directory"
               ios="$(cd "$2" && pwd)" || die "no directory $2"; shift 2 ;;
        --build) build=1; shift ;;
        --fixture) [ $# -ge 2 ] || die "--fixture needs a directory"
                   fixture="$(cd "$2" && pwd)" || die "no directory $2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1" ;;
        *) [ -z "$work" ] || die "one WORKDIR only"; work="$1"; shift ;;
    esac
done
[ -n "$work" ] || { usage >&2; exit 2; }
[ -z "$fixture" ] || [ "$build" = 1 ] || die "--fixture goes with --build"
[ -f "$ios/Package.swift" ] || die "$ios has no Package.swift"
mkdir -p "$work"
work="$(cd "$work" && pwd)"

# name owner tag commit. mlx and mlx-c are also checked against the submodule
# commits mlx-swift's tag records.
repos=(
    "mlx-swift ml-explore 0.31.6 0bb916c67f4b9e5c682cbe02a42c701c93ab5021"
    "mlx-swift-lm ml-explore 3.31.4 bd4b7434e6bdb588c7ef55706ff8904cb7fd4c57"
    "mlx ml-explore v0.31.1 ce45c52505c8158ea48d2a54e8caae05efd86bfe"
    "mlx-c ml-explore v0.6.0 0726ca922fc902c4c61ef9c27d94132be418e945"
    "swift-numerics apple 1.1.1 0c0290ff6b24942dadb83a929ffaaa1481df04a2"
    "swift-argument-parser apple 1.8.2 6a52f3251125d74daf04fcbd5e6f08a75d074382"
    "swift-syntax swiftlang 603.0.2 79e4b74a295b6eb74a8b585e3a39d29e70c1dbd1"
)
# The packages SwiftPM resolves for ios/ (mlx and mlx-c are submodules).
swiftpm_packages="mlx-swift mlx-swift-lm swift-numerics swift-argument-parser swift-syntax"
debs="libopenblas-dev liblapack-dev libblas-dev libgfortran-12-dev liblapacke-dev"

# --- what this machine needs -------------------------------------------------
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] \
    || die "made for Linux x86-64 (the preamble is generated for it); this is $(uname -sm)"
for tool in git swift g++ python3; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH"
done
missing=""
if command -v dpkg-query >/dev/null; then
    for d in $debs; do
        dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q 'install ok installed' \
            || missing="$missing $d"
    done
else
    echo "linux-deps.sh: no dpkg-query: cannot check for the Debian packages$debs" >&2
fi
if [ -n "$missing" ]; then
    echo "linux-deps.sh: missing Debian packages (the build links OpenBLAS, LAPACK and" >&2
    echo "  gfortran, and mlx includes <lapack.h>): sudo apt-get install$missing" >&2
    [ "$build" = 0 ] || die "install them first"
fi

# git with settings that make commits the same on every run, whatever the
# user's own config says.
g() { git -c commit.gpgsign=false -c tag.gpgsign=false -c core.autocrlf=false "$@"; }

source_of() { # name owner -> where to clone from
    local name="$1" owner="$2" c
    if [ -z "$mirror_root" ]; then
        echo "https://github.com/$owner/$name"
        return
    fi
    for c in "$mirror_root/$owner+$name/repo" "$mirror_root/$owner+$name" \
             "$mirror_root/$name.git" "$mirror_root/$name"; do
        if [ -d "$c" ] && git -C "$c" rev-parse --git-dir >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    die "no clone of $owner/$name under $mirror_root (tried $owner+$name/repo, $owner+$name, $name.git, $name)"
}

# --- 1. clones -----------------------------------------------------------------
mkdir -p "$work/src"
for entry in "${repos[@]}"; do
    read -r name owner tag commit <<<"$entry"
    dir="$work/src/$name"
    [ -d "$dir/.git" ] || g init -q "$dir"
    if ! g -C "$dir" rev-parse -q --verify refs/heads/upstream >/dev/null; then
        src="$(source_of "$name" "$owner")"
        echo "== $name $tag from $src"
        g -C "$dir" fetch -q --no-tags "$src" "+refs/tags/$tag:refs/tags/$tag" \
            || die "cannot fetch tag $tag of $name from $src"
        got="$(g -C "$dir" rev-parse "refs/tags/$tag^{commit}")"
        [ "$got" = "$commit" ] || die "$name $tag is $got at $src, not $commit"
        g -C "$dir" branch upstream "$commit"
    fi
    [ "$(g -C "$dir" rev-parse upstream)" = "$commit" ] \
        || die "$dir: branch upstream is not $commit; remove $dir and rerun"
    g -C "$dir" checkout -q -f -B linux-cpu upstream
    g -C "$dir" clean -q -ffdx
    # Unedited ones keep their tag; edited ones get it back below.
    g -C "$dir" tag -f "$tag" upstream >/dev/null
done

for sub in mlx mlx-c; do
    want="$(g -C "$work/src/mlx-swift" rev-parse "upstream:Source/Cmlx/$sub")"
    have="$(g -C "$work/src/$sub" rev-parse upstream)"
    [ "$want" = "$have" ] || die "mlx-swift records $sub at $want, the clone is $have"
done

# --- 2. edits --------------------------------------------------------------
commit_edits() { # name tag: commit the edits with a fixed author and date
    local dir="$work/src/$1" date
    date="$(g -C "$dir" log -1 --format=%cI upstream)"
    g -C "$dir" add -A
    GIT_AUTHOR_NAME=linux-deps.sh GIT_AUTHOR_EMAIL=linux-deps@localhost \
    GIT_COMMITTER_NAME=linux-deps.sh GIT_COMMITTER_EMAIL=linux-deps@localhost \
    GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" \
        g -C "$dir" commit -q --no-verify \
            -m "Linux CPU build (mobilemoe-mlx ios/scripts/linux-deps.sh)"
    g -C "$dir" tag -f "$2" HEAD >/dev/null
    echo "   $1 $2 -> $(g -C "$dir" rev-parse HEAD)"
}

echo "== preamble: mlx v0.31.1's make_compiled_preamble.sh with $(g++ --version | head -1)"
preamble="$work/compiled_preamble.linux-x86_64.cpp"
rm -f "$preamble"
# Arguments as mlx's CMakeLists (mlx/backend/cpu) passes them off Apple:
# output, compiler, source dir, CLANG (not set), processor.
bash "$work/src/mlx/mlx/backend/cpu/make_compiled_preamble.sh" \
    "$preamble" g++ "$work/src/mlx" FALSE x86_64
# The script drops the compiler's errors: an empty preamble means it failed.
grep -q 'namespace mlx::core' "$preamble" \
    || die "$preamble has no mlx code: g++ -E failed on mlx/backend/cpu/compiled_preamble.h"

echo "== edits to mlx-swift"
python3 "$edits" apply mlx-swift "$work/src/mlx-swift" --preamble "$preamble"
commit_edits mlx-swift 0.31.6
echo "== edits to mlx-swift-lm"
python3 "$edits" apply mlx-swift-lm "$work/src/mlx-swift-lm"
commit_edits mlx-swift-lm 3.31.4

# --- 3. git config ---------------------------------------------------------
gitconfig="$work/gitconfig"
{
    echo "# Written by ios/scripts/linux-deps.sh; used as GIT_CONFIG_GLOBAL."
    echo "[protocol \"file\"]"
    echo "	allow = always"
    for entry in "${repos[@]}"; do
        read -r name owner _ _ <<<"$entry"
        echo "[url \"$work/src/$name\"]"
        echo "	insteadOf = https://github.com/$owner/$name"
        echo "	insteadOf = https://github.com/$owner/$name.git"
    done
} >"$gitconfig"
# Git takes the longest matching insteadOf, so .../mlx does not catch
# .../mlx-swift; check that each URL lands on its own clone.
for entry in "${repos[@]}"; do
    read -r name owner _ _ <<<"$entry"
    for url in "https://github.com/$owner/$name" "https://github.com/$owner/$name.git"; do
        got="$(GIT_CONFIG_GLOBAL="$gitconfig" GIT_CONFIG_NOSYSTEM=1 \
               git ls-remote --get-url "$url")"
        [ "$got" = "$work/src/$name" ] || die "$url maps to $got"
    done
done

# --- 4. ios/'s SwiftPM state -------------------------------------------------
expect=""
for entry in "${repos[@]}"; do
    read -r name _ tag _ <<<"$entry"
    case " $swiftpm_packages " in *" $name "*)
        expect="$expect $name=$(g -C "$work/src/$name" rev-parse "refs/tags/$tag^{commit}")" ;;
    esac
done
# shellcheck disable=SC2086
stale="$(python3 "$edits" state "$ios" $expect)"
if [ -n "$stale" ]; then
    echo "== resolving $ios (stale:" $stale")"
    # shellcheck disable=SC2086
    python3 "$edits" clear "$ios" $stale
    rm -rf "$work/swiftpm"
    (cd "$ios" && GIT_CONFIG_GLOBAL="$gitconfig" SPM_CUDA=0 \
        swift package --cache-path "$work/swiftpm/cache" \
            --security-path "$work/swiftpm/security" \
            --config-path "$work/swiftpm/config" resolve)
    # shellcheck disable=SC2086
    still="$(python3 "$edits" state "$ios" $expect)"
    [ -z "$still" ] || die "after resolving, not at the expected commits:" $still
else
    echo "== $ios is resolved to these commits already"
fi

# --- 5. build and test -------------------------------------------------------
fixture_shown="${fixture:-DIR}"
cat <<EOF

Dependencies ready. In $ios:

  export GIT_CONFIG_GLOBAL=$gitconfig   # needed only if SwiftPM resolves again
  SPM_CUDA=0 swift build -c release
  SPM_CUDA=0 MOBILEMOE_PARITY_FIXTURE=$fixture_shown swift test -c release

SPM_CUDA=0 belongs on every swift command: without it mlx-swift's manifest
takes its CUDA settings on Linux, fails on cublasLt.h and drops the CPU build.
(The fixture: python -m bench export-parity --out DIR, from the repository root.)
EOF

if [ "$build" = 1 ]; then
    cd "$ios"
    export GIT_CONFIG_GLOBAL="$gitconfig"
    echo "== SPM_CUDA=0 swift build -c release"
    time SPM_CUDA=0 swift build -c release
    echo "== SPM_CUDA=0 MOBILEMOE_PARITY_FIXTURE=$fixture swift test -c release"
    if [ -n "$fixture" ]; then
        time SPM_CUDA=0 MOBILEMOE_PARITY_FIXTURE="$fixture" swift test -c release
    else
        time SPM_CUDA=0 swift test -c release
    fi
fi
