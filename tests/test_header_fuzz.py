"""A seeded fuzzer of safetensors headers: every random mutation of a valid
checkpoint's header must end in an `error:` line with exit code 2, or in a
converted model byte-identical to the unmutated one. Never a traceback, an
internal error or a silently different model.

One mutation makes another valid checkpoint that no check can tell from a real
one: a small vector (a norm, the expert bias) relabelled between the two 2-byte
float dtypes. Small vectors may be stored in any float dtype (issue 29), so
that model must be exactly the one the new header describes: the vector's
bytes read in the new dtype, every other tensor unchanged.

The safetensors library is the independent referee: whatever it refuses to
read, the converter must refuse too.
"""

import json
import random
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from test_convert_cli import run_convert

from mobilemoe_mlx.checkpoints.synthetic import write_synthetic

DTYPES = ["F16", "BF16", "F32", "U8", "I8", "U32", "I64", "F64", "BOOL", "F8_E4M3", "Q4", ""]
JUNK = [None, True, -1, 2 ** 70, 1.5, "7", [], {}, [1, 2, 3], [-1, 4]]


def _split(path: Path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data[:8], data[8:8 + n], data[8 + n:]


def _json_mutation(rng: random.Random, header: dict):
    """A copy of the header with one JSON-level change, serialised (maybe with a duplicate)."""
    h = json.loads(json.dumps(header))
    names = [n for n in h if n != "__metadata__"]
    name = rng.choice(names)
    other = rng.choice(names)
    entry = h[name]
    kind = rng.randrange(12)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        shape = entry["shape"]
        if shape and rng.random() < 0.5:
            i = rng.randrange(len(shape))
            shape[i] = max(0, shape[i] + rng.choice([-1, 1, 2, -shape[i]]))
        else:
            entry["shape"] = shape[::-1] if rng.random() < 0.5 else shape + [1]
    elif kind == 2:
        i = rng.randrange(2)
        entry["data_offsets"][i] += rng.choice([-8, -1, 1, 2, 8, 4096])
    elif kind == 3:
        entry["data_offsets"] = list(h[other]["data_offsets"])  # overlap another tensor
    elif kind == 4:
        del entry[rng.choice(["dtype", "shape", "data_offsets"])]
    elif kind == 5:
        entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JUNK)
    elif kind == 6:
        h[name] = rng.choice(JUNK)
    elif kind == 7:
        del h[name]
    elif kind == 8:
        entry["extra"] = 1
    elif kind == 9:  # a second entry of the same name: only raw JSON can say it
        raw = json.dumps(h)[:-1] + ", " + json.dumps({name: h[other]})[1:]
        return raw.encode()
    elif kind == 10:  # the same entries in another order: a valid, identical file
        order = list(h.items())
        rng.shuffle(order)
        h = dict(order)
    else:
        h["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, None, [], "x"])
    return json.dumps(h).encode()


def _byte_mutation(rng: random.Random, prefix: bytes, raw: bytes, data: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # truncated anywhere
        whole = prefix + raw + data
        return whole[:rng.randrange(len(whole))]
    if kind == 1:  # a different length prefix
        n = int.from_bytes(prefix, "little")
        n = rng.choice([0, 1, n - 1, n + 1, n + 8, n // 2, 2 ** 63, len(raw) + len(data)])
        return n.to_bytes(8, "little") + raw + data
    if kind == 2:  # random bytes over part of the header
        raw = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return prefix + bytes(raw) + data
    if kind == 3:  # one ASCII digit changed (a shape or an offset)
        digits = [i for i, c in enumerate(raw) if chr(c).isdigit()]
        raw = bytearray(raw)
        raw[rng.choice(digits)] = ord(str(rng.randrange(10)))
        return prefix + bytes(raw) + data
    return prefix + raw + data + bytes(rng.randrange(1, 64))  # bytes after the data


def _mutated_file(rng: random.Random, prefix, raw, data) -> bytes:
    if rng.random() < 0.6:
        new = _json_mutation(rng, json.loads(raw))
        new += b" " * (-len(new) % 8)
        return len(new).to_bytes(8, "little") + new + data
    return _byte_mutation(rng, prefix, raw, data)


SMALL_VECTOR = re.compile(r"(layernorm\.weight|norm\.weight|expert_bias)$")


def _relabelled_vector(raw: bytes, mutated: bytes):
    """(name, new dtype, [start, end]) when the mutation only relabels one small
    vector between F16 and BF16, else None."""
    try:
        n = int.from_bytes(mutated[:8], "little")
        header = json.loads(mutated[8:8 + n])
    except ValueError:
        return None
    original = json.loads(raw)
    if not isinstance(header, dict) or set(header) != set(original):
        return None
    changed = [k for k in original if header[k] != original[k]]
    if len(changed) != 1 or not SMALL_VECTOR.search(changed[0]):
        return None
    old, new = original[changed[0]], header[changed[0]]
    if ({**new, "dtype": old["dtype"]} != old
            or {old["dtype"], new["dtype"]} != {"F16", "BF16"}):
        return None
    return changed[0], new["dtype"], old["data_offsets"]


def _as_float32(data: bytes, dtype: str) -> np.ndarray:
    if dtype == "F16":
        return np.frombuffer(data, np.float16).astype(np.float32)
    return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _assert_reads_relabelled(out: Path, reference: Path, relabel, data: bytes):
    """The converted model is the reference one but for the relabelled vector,
    which holds its bytes read as the new dtype (in the output's dtype)."""
    name, dtype, (start, end) = relabel
    got, want = mx.load(str(out / "model.safetensors")), mx.load(str(reference))
    assert set(got) == set(want)
    for key in got:
        if key != name:
            assert mx.array_equal(got[key], want[key]).item(), key
    value = _as_float32(data[start:end], dtype).astype(
        {mx.float16: np.float16, mx.float32: np.float32}[got[name].dtype])
    np.testing.assert_array_equal(np.array(got[name]), value)


def _library_reads(path: Path) -> bool:
    """Whether the safetensors library reads the file: its header, every
    tensor's entry, and the data of every tensor NumPy can hold (NumPy has no
    bfloat16; the library checks every tensor's extent when it opens a file)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                if f.get_slice(name).get_dtype() != "BF16":
                    f.get_tensor(name)
    except SafetensorError:
        return False
    except Exception:  # noqa: BLE001 - any other refusal of the reader, a Rust panic included
        return False
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    source = write_synthetic(str(root / "src"), "tiny", "qat")
    out = root / "reference"
    result = run_convert(source, "--out", out)
    assert result.returncode == 0, result.stderr
    return source, out / "model.safetensors"


def fuzz(reference, tmp_path, seed: int, count: int):
    source, reference_file = reference
    expected = reference_file.read_bytes()
    prefix, raw, data = _split(source / "model.safetensors")
    rng = random.Random(seed)
    outcomes = {"refused": 0, "identical": 0, "relabelled": 0}
    for i in range(count):
        src = tmp_path / f"m{i}"
        shutil.copytree(source, src)
        weights = src / "model.safetensors"
        mutated = _mutated_file(rng, prefix, raw, data)
        weights.write_bytes(mutated)
        library_reads = _library_reads(weights)
        out = tmp_path / f"out{i}"
        result = run_convert(src, "--out", out)
        what = f"mutation {i} of seed {seed}: {result.stderr[-500:]}"
        if result.returncode == 0:
            assert library_reads, "converted a file the safetensors library refuses: " + what
            relabel = _relabelled_vector(raw, mutated)
            if relabel is None:
                got = (out / "model.safetensors").read_bytes()
                assert got == expected, "a different model: " + what
                outcomes["identical"] += 1
            else:
                _assert_reads_relabelled(out, reference_file, relabel, data)
                outcomes["relabelled"] += 1
        else:
            assert result.returncode == 2, what
            lines = result.stderr.strip().splitlines()
            assert lines and lines[-1].startswith("error: "), what
            assert "Traceback" not in result.stderr and "internal error" not in result.stderr, what
            assert not out.exists(), what
            outcomes["refused"] += 1
        shutil.rmtree(src)
        shutil.rmtree(out, ignore_errors=True)
    # Both outcomes happen, or the fuzzer is not exercising what it claims to.
    assert outcomes["refused"] > count // 2 and outcomes["identical"] > 0, outcomes
    return outcomes


def test_header_fuzz(reference, tmp_path):
    fuzz(reference, tmp_path, seed=1, count=250)  # about 1.5 s on one CPU core


@pytest.mark.e2e
@pytest.mark.parametrize("seed", [2, 3, 4, 5])
def test_header_fuzz_more_seeds(reference, tmp_path, seed):
    fuzz(reference, tmp_path, seed=seed, count=250)
