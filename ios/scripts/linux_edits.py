#!/usr/bin/env python3
"""The edits linux-deps.sh makes to mlx-swift 0.31.6 and mlx-swift-lm 3.31.4 so
that ios/ builds and runs on Linux's CPU, written as operations on the
upstream sources (what to wrap, what to remove, what to add), and the SwiftPM
state of ios/.build that must go when the pinned tags move.

No upstream file or diff context is kept here: each operation names its anchor,
a single line (matched whole, leading and trailing blanks ignored), and fails
unless that anchor is found exactly once. The new file and the lines put in
`#else` branches are ours.

    linux_edits.py apply mlx-swift CLONE --preamble FILE
    linux_edits.py apply mlx-swift-lm CLONE
    linux_edits.py state IOS_DIR NAME=REVISION...   prints the stale NAMEs
    linux_edits.py clear IOS_DIR NAME...            drops their state

Python 3.8 or later, standard library only.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence


class EditError(Exception):
    """An anchor was missing or ambiguous: the upstream sources are not the
    ones these operations were written for."""


# --- anchors ---------------------------------------------------------------

@dataclass(frozen=True)
class Line:
    """A line whose text, blanks at either end ignored, is `text`, or starts
    with it when `prefix` is set."""
    text: str
    prefix: bool = False

    def matches(self, line: str) -> bool:
        s = line.strip()
        return s.startswith(self.text) if self.prefix else s == self.text

    def __str__(self) -> str:
        return f"{self.text!r}" + (" (as a prefix)" if self.prefix else "")


def _find_once(lines: Sequence[str], anchor: Line, path: Path,
               start: int = 0) -> int:
    hits = [i for i in range(start, len(lines)) if anchor.matches(lines[i])]
    if len(hits) != 1:
        where = f" after line {start}" if start else ""
        raise EditError(f"{path}: expected exactly one line {anchor}{where}, "
                        f"found {len(hits)}")
    return hits[0]


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _read(path: Path) -> List[str]:
    if not path.is_file():
        raise EditError(f"{path}: no such file")
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path: Path, lines: Sequence[str]) -> None:
    path.write_text("".join(lines), encoding="utf-8")


# --- operations --------------------------------------------------------------

@dataclass(frozen=True)
class RemoveLine:
    """Remove the one line matching `anchor`."""
    path: str
    anchor: Line
    why: str

    def apply(self, root: Path) -> None:
        p = root / self.path
        lines = _read(p)
        del lines[_find_once(lines, self.anchor, p)]
        _write(p, lines)


@dataclass(frozen=True)
class Wrap:
    """Put `#if condition` before the line matching `first` and `#endif`
    after the first line matching `last` that follows it (`first` itself
    when `last` is None); `otherwise`, if given, goes in an `#else` branch,
    indented as `first`."""
    path: str
    condition: str
    first: Line
    why: str
    last: Optional[Line] = None
    otherwise: Sequence[str] = ()

    def apply(self, root: Path) -> None:
        p = root / self.path
        lines = _read(p)
        i = _find_once(lines, self.first, p)
        j = i
        if self.last is not None:
            hits = [k for k in range(i, len(lines)) if self.last.matches(lines[k])]
            if not hits:
                raise EditError(f"{p}: no line {self.last} after {self.first}")
            j = hits[0]
        ind = _indent(lines[i])
        block = [f"{ind}#if {self.condition}\n"] + lines[i:j + 1]
        if self.otherwise:
            block.append(f"{ind}#else\n")
            block += [f"{ind}    {o}\n" if o else "\n" for o in self.otherwise]
        block.append(f"{ind}#endif\n")
        lines[i:j + 1] = block
        _write(p, lines)


@dataclass(frozen=True)
class NewFile:
    """Add a file of ours; fails if the path exists upstream."""
    path: str
    text: str
    why: str

    def apply(self, root: Path) -> None:
        p = root / self.path
        if p.exists():
            raise EditError(f"{p}: already exists upstream")
        if not p.parent.is_dir():
            raise EditError(f"{p.parent}: no such directory")
        p.write_text(self.text, encoding="utf-8")


@dataclass(frozen=True)
class GuardWholeFile:
    """Keep the file as the `#else` branch of `#if condition`, whose branch is
    the contents of a file made at run time. `first` must be the file's first
    non-blank line (so a changed upstream file is noticed)."""
    path: str
    condition: str
    first: Line
    why: str

    def apply(self, root: Path, replacement: Path) -> None:
        p = root / self.path
        lines = _read(p)
        nonblank = [s for s in lines if s.strip()]
        if not nonblank or not self.first.matches(nonblank[0]):
            raise EditError(f"{p}: does not start with {self.first}")
        if sum(1 for s in lines if self.first.matches(s)) != 1:
            raise EditError(f"{p}: {self.first} is not there exactly once")
        new = replacement.read_text(encoding="utf-8")
        if not new.strip():
            raise EditError(f"{replacement}: empty")
        if not new.endswith("\n"):
            new += "\n"
        old = "".join(lines)
        if not old.endswith("\n"):
            old += "\n"
        p.write_text(f"#if {self.condition}\n{new}#else\n{old}#endif\n",
                     encoding="utf-8")


# --- mlx-swift 0.31.6 ------------------------------------------------------

MLX_SWIFT_PACKAGE = [
    RemoveLine(
        "Package.swift", Line('"mlx-c/mlx/c/fast.cpp",', prefix=True),
        why="Linux CPU branch: build mlx-c's fast.cpp; it links, because mlx's "
            "no_metal.cpp and no_cuda.cpp stub metal_kernel and cuda_kernel"),
    RemoveLine(
        "Package.swift", Line('"MLXFast.swift",'),
        why="Linux CPU branch: without MLXFast, MLXNN's RMSNorm and RoPE and "
            "mlx-swift-lm do not compile"),
    RemoveLine(
        "Package.swift", Line('"MLXFastKernel.swift",'),
        why="Linux CPU branch: MLXFast's kernel API, which mlx-swift-lm names"),
]

PREAMBLE = GuardWholeFile(
    "Source/Cmlx/mlx-generated/compiled_preamble.cpp",
    "defined(__linux__) && defined(__x86_64__)",
    Line("const char* get_kernel_preamble() {"),
    why="the shipped preamble was made on macOS arm64, where float16_t is a "
        "native type: every compiled CPU kernel fails in the run-time g++ with "
        "\"'float16_t' has not been declared\"; on Linux x86-64 use the one "
        "mlx's own CMake build writes")


# --- mlx-swift-lm 3.31.4 ---------------------------------------------------

COMMON = "Libraries/MLXLMCommon"

STAND_INS = '''\
// Linux stand-ins for the Apple media types that MLXLMCommon names. Added by
// mobilemoe-mlx's ios/scripts/linux-deps.sh; not part of mlx-swift-lm.
//
// Text-only use needs none of them. Where CoreImage or AVFoundation is missing
// no image, video or audio can be read: an image from a URL is nil, an image
// from an array and audio from a URL throw, and a video asset is only a URL.

import Foundation

#if !canImport(CoreImage)
    /// Opaque: nothing can decode or make an image here.
    public final class CIImage: @unchecked Sendable {
        /// Always nil (no image decoder without CoreImage).
        public init?(contentsOf url: URL) {
            return nil
        }
    }
#endif

#if !canImport(AVFoundation)
    /// A media time as a rational number of seconds, value / timescale.
    public struct CMTime: Sendable, Hashable {
        public var value: Int64
        public var timescale: Int32

        public init(value: Int64, timescale: Int32) {
            self.value = value
            self.timescale = timescale
        }
    }

    /// Opaque: it keeps its URL; nothing can read it here.
    public final class AVAsset: @unchecked Sendable {
        public let url: URL

        public init(url: URL) {
            self.url = url
        }
    }

    /// Core Audio's four-character format codes.
    public typealias AudioFormatID = UInt32

    /// 'lpcm', as in Core Audio.
    public let kAudioFormatLinearPCM: AudioFormatID = 0x6C70_636D
#endif

#if !canImport(Darwin)
    extension String {
        /// No localization outside Apple's Foundation: the text itself.
        /// Public because MLXLLM calls it too.
        public init(localized text: String) {
            self = text
        }
    }
#endif
'''

MLX_SWIFT_LM = [
    Wrap(f"{COMMON}/UserInput.swift", "canImport(AVFoundation)",
         Line("@preconcurrency import AVFoundation"),
         why="AVFoundation is Apple-only (the stand-ins name AVAsset and CMTime)"),
    Wrap(f"{COMMON}/UserInput.swift", "canImport(CoreImage)",
         Line("import CoreImage"),
         why="CoreImage is Apple-only (the stand-ins name CIImage)"),
    Wrap(f"{COMMON}/UserInput.swift", "canImport(CoreImage)",
         Line("let arrayData = array.asData()"),
         last=Line("format: .RGBA8, colorSpace: cs)"),
         otherwise=['throw UserInputError.arrayError(',
                    '    "an image from an array needs CoreImage, which this '
                    'platform lacks")'],
         why="an image from an array is a CIImage in a CGColorSpace: it throws "
             "without CoreImage"),
    Wrap(f"{COMMON}/UserInput+Audio.swift", "canImport(AVFoundation)",
         Line("@preconcurrency import AVFoundation"),
         why="AVFoundation is Apple-only"),
    Wrap(f"{COMMON}/UserInput+Audio.swift", "canImport(AVFoundation)",
         Line("let asset = AVURLAsset(url: url)"),
         last=Line("return MLXArray(samples)"),
         otherwise=["throw UserInputError.notImplemented"],
         why="audio is decoded with AVAssetReader: it throws without AVFoundation"),
    Wrap(f"{COMMON}/ChatSession.swift", "canImport(CoreGraphics)",
         Line("import CoreGraphics"),
         why="CoreGraphics is Apple-only; Foundation has CGSize on Linux"),
    Wrap(f"{COMMON}/ParoQuant/ParoQuantLoader.swift", "canImport(os)",
         Line("import os"),
         why="os.Logger is Apple-only"),
    Wrap(f"{COMMON}/ParoQuant/ParoQuantLoader.swift", "canImport(os)",
         Line('private let logger = Logger(', prefix=True),
         otherwise=[
             "/// Without os.Logger, ParoQuant's progress goes to standard error.",
             "private struct StandardErrorLogger: Sendable {",
             "    func info(_ message: String) {",
             '        FileHandle.standardError.write(Data("[paroquant] \\(message)\\n".utf8))',
             "    }",
             "}",
             "private let logger = StandardErrorLogger()",
         ],
         why="os.Logger is Apple-only: log to standard error instead"),
    Wrap(f"{COMMON}/SpeculativeDecoding.swift", "canImport(Metal)",
         Line("guard let bytes = GPU.maxRecommendedWorkingSetBytes(), bytes > 0 else {"),
         last=Line("return bytes"),
         otherwise=["return nil"],
         why="GPU is not built without Metal: no default memory limit, as "
             "WiredMemoryPolicies.swift already does"),
    NewFile(f"{COMMON}/LinuxMediaStandIns.swift", STAND_INS,
            why="CIImage, CMTime, AVAsset, AudioFormatID, kAudioFormatLinearPCM "
                "and String(localized:), only where the Apple modules are missing"),
]


def _require_pristine(clone: Path) -> None:
    """The operations are written for the upstream files: refuse a work tree
    with changes (e.g. edits made already)."""
    r = subprocess.run(["git", "-C", str(clone), "status", "--porcelain"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise EditError(f"{clone}: not a git work tree")
    if r.stdout.strip():
        raise EditError(f"{clone}: has changes; check out the upstream commit first")


def apply(repo: str, clone: Path, preamble: Optional[Path]) -> None:
    _require_pristine(clone)
    if repo == "mlx-swift":
        if preamble is None:
            raise EditError("mlx-swift needs --preamble FILE")
        for op in MLX_SWIFT_PACKAGE:
            op.apply(clone)
            print(f"  {op.path}: {op.why}")
        PREAMBLE.apply(clone, preamble)
        print(f"  {PREAMBLE.path}: {PREAMBLE.why}")
    elif repo == "mlx-swift-lm":
        for op in MLX_SWIFT_LM:
            op.apply(clone)
            print(f"  {op.path}: {op.why}")
    else:
        raise EditError(f"no edits for {repo}")


# --- ios/.build state ------------------------------------------------------

def _resolved_pins(ios: Path) -> Dict[str, str]:
    p = ios / "Package.resolved"
    if not p.is_file():
        return {}
    data = json.loads(p.read_text())
    pins = data.get("pins") or data.get("object", {}).get("pins", [])
    out = {}
    for pin in pins:
        name = pin.get("identity") or pin.get("package", "").lower()
        out[name] = pin.get("state", {}).get("revision", "")
    return out


def _checkout_head(ios: Path, name: str) -> Optional[str]:
    d = ios / ".build" / "checkouts" / name
    if not d.is_dir():
        return None
    r = subprocess.run(["git", "-C", str(d), "rev-parse", "HEAD"],
                       capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def state(ios: Path, expected: Dict[str, str]) -> Dict[str, List[str]]:
    """The packages whose Package.resolved pin or checkout is not at the
    expected revision, with what was found (empty: all fresh)."""
    pins = _resolved_pins(ios)
    stale: Dict[str, List[str]] = {}
    for name, rev in expected.items():
        found = []
        if pins.get(name) != rev:
            found.append(f"Package.resolved: {pins.get(name) or 'no pin'}")
        head = _checkout_head(ios, name)
        if head != rev:
            found.append(f".build/checkouts/{name}: {head or 'none'}")
        if found:
            stale[name] = found
    return stale


def clear(ios: Path, names: Sequence[str]) -> None:
    """Drop Package.resolved and, for each package, its checkout, its
    repository clone and its workspace-state entry, so that SwiftPM clones
    the moved tags again instead of keeping the commit it saw first."""
    resolved = ios / "Package.resolved"
    if resolved.exists():
        resolved.unlink()
        print(f"  removed {resolved}")
    build = ios / ".build"
    for name in names:
        d = build / "checkouts" / name
        if d.exists():
            shutil.rmtree(d)
            print(f"  removed {d}")
        repos = build / "repositories"
        if repos.is_dir():
            for r in repos.iterdir():
                if re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", r.name):
                    shutil.rmtree(r)
                    print(f"  removed {r}")
    ws = build / "workspace-state.json"
    if ws.is_file():
        try:
            data = json.loads(ws.read_text())
            deps = data["object"]["dependencies"]
            keep = [d for d in deps
                    if d.get("packageRef", {}).get("identity") not in names]
            if len(keep) != len(deps):
                data["object"]["dependencies"] = keep
                ws.write_text(json.dumps(data, indent=2))
                print(f"  dropped {len(deps) - len(keep)} entries from {ws}")
        except (ValueError, KeyError, TypeError):
            ws.unlink()
            print(f"  removed {ws} (not in the expected form)")


def main(argv: Sequence[str]) -> int:
    if len(argv) >= 3 and argv[0] == "apply":
        preamble = None
        rest = list(argv[3:])
        if rest[:1] == ["--preamble"] and len(rest) == 2:
            preamble = Path(rest[1])
        elif rest:
            print(__doc__, file=sys.stderr)
            return 2
        try:
            apply(argv[1], Path(argv[2]), preamble)
        except EditError as e:
            print(f"linux_edits.py: {e}", file=sys.stderr)
            return 1
        return 0
    if len(argv) >= 2 and argv[0] == "state":
        expected = dict(a.split("=", 1) for a in argv[2:])
        for name, found in state(Path(argv[1]), expected).items():
            print(f"  {name} is not at {expected[name]} ({'; '.join(found)})",
                  file=sys.stderr)
            print(name)
        return 0
    if len(argv) >= 2 and argv[0] == "clear":
        clear(Path(argv[1]), argv[2:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
