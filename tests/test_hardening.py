"""Damaged or hostile input to convert and load (issue 7): nothing of the user's
is lost, no damaged input becomes a silently wrong model, and everything a user
can fix is one `error:` line with exit code 2."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import import_torch
from mlx.utils import tree_flatten
from test_convert_cli import REPO, assert_clean_failure, run_convert
from tmpfs import mounted_tmpfs

from mobilemoe_mlx import convert, load
from mobilemoe_mlx.checkpoints import packing
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.runtime import current as current_runtime


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "bf16"), "tiny", "bf16")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "cache"
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(home))
    return home


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_header(path: Path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_header(path: Path, header, data: bytes, raw: bytes = None) -> None:
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def set_values(path: Path, name: str, change) -> None:
    """Rewrite tensor `name` of a safetensors file in place with change(numpy array)."""
    header, data = read_header(path)
    start, stop = header[name]["data_offsets"]
    bf16 = header[name]["dtype"] == "BF16"
    dtype = {"F16": np.float16, "F32": np.float32, "BF16": np.uint32, "U8": np.uint8}[
        header[name]["dtype"]]
    raw = data[start:stop]
    if bf16:  # numpy has no bfloat16: widen to float32 bits and back, exactly
        raw = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).tobytes()
    values = np.frombuffer(raw, dtype=dtype).copy()
    change(values.view(np.float32) if bf16 else values)
    raw = (values >> 16).astype(np.uint16).tobytes() if bf16 else values.tobytes()
    write_header(path, header, data[:start] + raw + data[stop:])


def edit_config(src: Path, **changes) -> None:
    config = json.loads((src / "config.json").read_text())
    config.update(changes)
    (src / "config.json").write_text(json.dumps(config))


# --- never delete what is not ours ---

def test_sweep_spares_a_users_directories_named_like_leftovers(qat, tmp_path):
    mine = [tmp_path / ".model.backup-2024", tmp_path / ".model.v2-99999",
            tmp_path / ".model.partial-99999999"]  # a dead pid's name, but no marker of ours
    for d in mine:
        d.mkdir()
        (d / "precious.txt").write_text("mine")
    assert run_convert(qat, "--out", tmp_path / "model").returncode == 0
    for d in mine:
        assert (d / "precious.txt").read_text() == "mine"


@pytest.mark.e2e
def test_sweep_removes_what_a_killed_conversion_left(qat, tmp_path):
    out = tmp_path / "model"
    script = ("import os, signal, sys\n"
              "from pathlib import Path\n"
              "from mobilemoe_mlx.checkpoints.output_dir import atomic_output_dir\n"
              "with atomic_output_dir(Path(sys.argv[1])) as tmp:\n"
              "    (tmp / 'model.safetensors').write_bytes(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    leftovers = list(tmp_path.glob(".model.partial-*"))
    assert len(leftovers) == 1
    assert run_convert(qat, "--out", out).returncode == 0
    assert not leftovers[0].exists()


def test_force_never_deletes_a_directory_holding_the_source(qat, tmp_path):
    out = tmp_path / "mlx"
    assert run_convert(qat, "--out", out).returncode == 0
    source = copy_of(qat, out / "orig")  # the user kept the checkpoint inside
    result = run_convert(source, "--out", out, "--force")
    assert result.returncode == 2 and "error:" in result.stderr
    assert (source / "model.safetensors").read_bytes() == (qat / "model.safetensors").read_bytes()


def test_force_never_deletes_the_directory_of_the_weights_file_given(qat, tmp_path):
    out = tmp_path / "mlx"
    assert run_convert(qat, "--out", out).returncode == 0
    weights = (out / "model.safetensors").read_bytes()
    result = run_convert(out / "model.safetensors", "--out", out, "--force")
    assert result.returncode == 2 and "contains the checkpoint" in result.stderr
    assert (out / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("name", ["mlx", "more.safetensors"])
def test_an_output_inside_the_checkpoint_directory_spares_its_files(qat, tmp_path, name):
    """The guard protects the files a conversion reads, not the tree around them
    (issue 15): an output beside them, even one named like a weights file, is
    written, replaced with --force, and never read back as input."""
    source = copy_of(qat, tmp_path / "ckpt")
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    for flags in ([], ["--force"]):
        result = run_convert(source, "--out", source / name, *flags)
        assert result.returncode == 0, result.stderr
    assert {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()} == before
    again = run_convert(source, "--out", tmp_path / "again")  # reads model.safetensors only
    assert again.returncode == 0, again.stderr
    assert ((tmp_path / "again" / "model.safetensors").read_bytes()
            == (source / name / "model.safetensors").read_bytes())


@pytest.mark.parametrize("files", [
    {"conversion.json": "{}", "thesis.tex": "mine"},  # a file named conversion.json is no proof
    {"conversion.json": json.dumps({"converter": "mobilemoe-mlx 0.1.0", "layout": "qat"}),
     "config.json": "{}", "notes.txt": "mine"},  # ours once, but the user keeps files in it
])
def test_force_never_replaces_a_directory_with_files_not_ours(qat, tmp_path, files):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    result = run_convert(qat, "--out", out, "--force")
    assert result.returncode == 2 and "is not a converted model" in result.stderr
    assert {p.name: p.read_text() for p in out.iterdir()} == files


def test_force_replaces_a_previous_conversion(qat, tmp_path):
    out = tmp_path / "out"
    assert run_convert(qat, "--out", out, "--dtype", "float32").returncode == 0
    assert run_convert(qat, "--out", out, "--force").returncode == 0
    assert json.loads((out / "conversion.json").read_text())["dtype"] == "float16"


# --- never build a silently wrong model: headers and index files ---

def _same_size_pair(header):
    by_size = {}
    for name, meta in header.items():
        if name != "__metadata__":
            start, stop = meta["data_offsets"]
            by_size.setdefault((stop - start, meta["dtype"], tuple(meta["shape"])), []).append(name)
    return next(names for names in by_size.values() if len(names) >= 2)[:2]


def _overlap(header, data):
    a, b = _same_size_pair(header)
    header[b]["data_offsets"] = list(header[a]["data_offsets"])  # b reads a's bytes
    return header, data, None


def _duplicate(header, data):
    a, b = _same_size_pair(header)
    raw = json.dumps(header).encode()[:-1]  # the same name again, pointing at b's bytes
    return header, data, raw + b"," + json.dumps({a: header[b]})[1:-1].encode() + b"}"


def _entry_change(key, value):
    def change(header, data):
        name = next(n for n in header if n != "__metadata__")
        if value is None:
            del header[name][key]
        else:
            header[name][key] = value
        return header, data, None
    return change


HEADER_DAMAGE = {
    "overlapping offsets": (_overlap, "overlap"),
    "duplicated name": (_duplicate, "appears twice"),
    "header is a list": (lambda h, d: (h, d, b"[1, 2]"), "not a JSON object"),
    "trailing bytes": (lambda h, d: (h, d + b"\0" * 64, None), "after the last tensor"),
    "no data_offsets": (_entry_change("data_offsets", None), "dtype, shape and data_offsets"),
    "shape of strings": (_entry_change("shape", ["2", 4]), "non-negative integers"),
    "boolean offsets": (_entry_change("data_offsets", [False, True]), "two increasing integers"),
    "dtype not a string": (_entry_change("dtype", 7), "not a name"),
    "header not UTF-8": (lambda h, d: (h, d, b'{"\xff": 1}' + b" " * 6), "not a valid safetensors"),
}


@pytest.mark.parametrize("case", list(HEADER_DAMAGE))
def test_damaged_header_is_refused(qat, tmp_path, case):
    damage, fragment = HEADER_DAMAGE[case]
    src = copy_of(qat, tmp_path / "src")
    header, data = read_header(src / "model.safetensors")
    write_header(src / "model.safetensors", *damage(header, data))
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, fragment)


def _sharded_by_index(qat, src: Path, shard: str, outside: Path) -> Path:
    src.mkdir()
    for f in qat.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, src / f.name)
    shutil.copy(qat / "model.safetensors", outside)
    header, _ = read_header(qat / "model.safetensors")
    weight_map = {name: shard for name in header if name != "__metadata__"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return src


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_index_may_only_name_shards_beside_it(qat, tmp_path, where):
    outside = tmp_path / "outside.safetensors"
    shard = {"parent": "../outside.safetensors", "absolute": str(outside),
             "subfolder": "sub/outside.safetensors"}[where]
    src = _sharded_by_index(qat, tmp_path / "src", shard, outside)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, "shards must be files in the "
                         "checkpoint directory itself")


@pytest.mark.parametrize("text, fragment", [
    ("{oops", "not a valid safetensors index"),
    ('{"weight_map": [1]}', "no weight_map object"),
    ('[1]', "no weight_map object"),
    ('{"weight_map": {"a": 3}}', "not a .safetensors file name"),
])
def test_malformed_index_is_refused(qat, tmp_path, text, fragment):
    src = copy_of(qat, tmp_path / "src")
    (src / "model.safetensors.index.json").write_text(text)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, fragment)


# --- NaN, infinity and zero scales ---

@pytest.mark.parametrize("layout, name, value", [
    ("qat", "model.layers.0.self_attn.q_proj.weight_scale", np.nan),
    ("qat", "model.layers.1.feed_forward.router.weight", np.inf),
    ("qat", "model.norm.weight", -np.inf),
    ("bf16", "model.layers.0.self_attn.q_proj.weight", np.nan),
    ("bf16", "model.layers.0.feed_forward.experts.down_proj", np.inf),
])
def test_non_finite_weight_is_refused_by_name(qat, bf16, tmp_path, layout, name, value):
    src = copy_of({"qat": qat, "bf16": bf16}[layout], tmp_path / "src")

    def poison(values):
        values[3] = value
    set_values(src / "model.safetensors", name, poison)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out, "--dtype", "float32"), out, name,
                         "NaN or infinite")


@pytest.mark.parametrize("key, value, named", [
    ("rms_norm_eps", float("nan"), "rms_norm_eps"),
    ("rope_theta", float("inf"), "rope_theta"),
    ("rope_scaling", {"rope_type": "llama3", "factor": float("-inf"),
                      "original_max_position_embeddings": 8192}, "rope_scaling.factor"),
])
def test_non_finite_config_value_is_refused_by_key(qat, tmp_path, key, value, named):
    src = copy_of(qat, tmp_path / "src")
    edit_config(src, **{key: value})  # json writes NaN / Infinity, which json.loads accepts
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, named, "NaN or infinity")


def test_quantization_error_never_hides_a_nan():
    w = mx.ones((4, 64))
    w[1, 5] = mx.nan
    *_, error = packing.quantize(w, 32, 4, mx.float32, chunk_elements=64)  # NaN in chunk 2
    assert np.isnan(error)


def test_all_zero_scales_are_reported_not_refused(qat, tmp_path):
    name = "model.layers.0.self_attn.q_proj"
    src = copy_of(qat, tmp_path / "src")

    def zero(values):
        values[:] = 0
    set_values(src / "model.safetensors", f"{name}.weight_scale", zero)
    out = tmp_path / "out"
    result = run_convert(src, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and name in result.stderr
    assert json.loads((out / "conversion.json").read_text())["all_zero_scales"] == [name]


def test_overflowing_output_dtype_is_refused(bf16, tmp_path):
    name = "model.layers.0.self_attn.v_proj.weight"
    src = copy_of(bf16, tmp_path / "src")

    def huge(values):
        values[0] = 65536.0  # finite in bfloat16, but past float16's largest value
    set_values(src / "model.safetensors", name, huge)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out, "--no-quantize", "--dtype", "float16"),
                         out, "model.layers.0.self_attn.v_proj", "--dtype float32")


# --- config sizes, checked before anything is built ---

def test_config_far_bigger_than_its_weights_is_refused_at_once(qat, tmp_path):
    src = copy_of(qat, tmp_path / "src")
    layers = 1_000_000
    edit_config(src, num_hidden_layers=layers, no_rope_layers=[1] * layers,
                layer_types=["full_attention"] * layers)
    out = tmp_path / "out"
    started = time.monotonic()
    result = run_convert(src, "--out", out)
    # Not a benchmark but a bound on the order of the checks: before the fix this
    # built the million-layer table (past 9 GB, minutes) before failing; the refusal
    # takes about 4 s on 2 shared cores, so 60 s fails only that way, not on a slow machine.
    assert time.monotonic() - started < 60
    assert_clean_failure(result, out, "does not belong to these weights")


@pytest.mark.parametrize("write, fragment", [
    (lambda p: p.write_text("[1, 2]"), "not a JSON object"),
    (lambda p: p.write_bytes(b'{"model_type": "mobil\xe9moe"}'), "not UTF-8"),
    (lambda p: (p.unlink(), p.mkdir()), "is a directory"),
])
def test_unreadable_config_is_one_line(qat, tmp_path, write, fragment):
    src = copy_of(qat, tmp_path / "src")
    write(src / "config.json")
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, fragment)


# --- full and read-only disks ---

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_while_writing_are_one_line(qat, tmp_path, monkeypatch, code):
    """The OS error is injected into the writer's file (a real full disk needs a
    tiny file system: see the tmpfs test below)."""
    from mobilemoe_mlx.checkpoints import safetensors_writer

    real_write_shard = safetensors_writer.write_shard

    def failing_write_shard(path, *args, **kwargs):
        real_write_shard(path, *args, **kwargs)  # half the model is on disk by now
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(safetensors_writer, "write_shard", failing_write_shard)
    out = tmp_path / "nested" / "out"
    result = run_convert(qat, "--out", out)
    assert_clean_failure(result, out, errno.errorcode[code], "nothing was left behind")
    assert not (tmp_path / "nested").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KB file system, where this machine lets us mount one (root on Linux)."""
    with mounted_tmpfs(tmp_path / "small", "size=64k") as mount:
        yield mount


def test_a_really_full_disk_is_one_line(qat, tiny_tmpfs):
    out = tiny_tmpfs / "model"
    assert_clean_failure(run_convert(qat, "--out", out), out, "ENOSPC")
    assert list(tiny_tmpfs.iterdir()) == []


# --- damaged converted directories ---

def _truncate(path: Path, by: int = 5000) -> None:
    path.write_bytes(path.read_bytes()[:-by])


def test_truncated_cache_entry_is_converted_again(qat, cache, capsys):
    source = str(qat)
    model, _ = load(source)
    ids = mx.array([[1, 2, 3, 4]])
    expected = model(ids)
    entry = next(p for p in (cache / "local").iterdir() if not p.name.startswith("."))
    _truncate(entry / "model.safetensors")
    capsys.readouterr()
    again, _ = load(source)
    assert "damaged" in capsys.readouterr().err
    assert mx.array_equal(again(ids), expected)


def test_truncated_user_directory_names_what_to_do(qat, tmp_path):
    out = convert(str(qat), str(tmp_path / "mlx"), dtype="float32", progress=False)
    _truncate(out / "model.safetensors")
    with pytest.raises(UserError, match="damaged.*convert the checkpoint again with --force"):
        load(str(out))


@pytest.mark.parametrize("changes", [
    {"hidden_size": 128},
    {"num_local_experts": 4, "num_experts_per_tok": 2},
    {"vocab_size": 1024},
])
def test_converted_config_that_no_longer_matches_is_one_line(qat, tmp_path, changes):
    out = convert(str(qat), str(tmp_path / "mlx"), dtype="float32", progress=False)
    edit_config(out, **changes)
    with pytest.raises(UserError) as refused:
        load(str(out))
    message = str(refused.value)
    assert "\n" not in message and len(message) < 600
    assert "convert the checkpoint again" in message or "does not belong" in message


def test_converted_config_of_a_million_layers_is_refused_at_once(qat, tmp_path):
    out = convert(str(qat), str(tmp_path / "mlx"), dtype="float32", progress=False)
    layers = 1_000_000
    edit_config(out, num_hidden_layers=layers, no_rope_layers=[1] * layers,
                layer_types=["full_attention"] * layers)
    with pytest.raises(UserError, match="does not belong to these weights"):
        load(str(out))


# --- pickles ---

def test_pickle_with_code_is_refused_without_running_it(qat, tmp_path):
    torch = import_torch()
    ran = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (ran,))

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(qat / "config.json", src)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": Payload()},
               src / "model.pt")
    out = tmp_path / "out"
    result = run_convert(src, "--out", out)
    assert_clean_failure(result, out, "could run code", "will not load it")
    assert "weights_only" not in result.stderr
    assert not ran.exists()


# --- float16 directories on MLX's CPU backend ---

@pytest.mark.skipif(current_runtime().half_precision_fast,
                    reason="GPU backends run float16 at full speed")
@pytest.mark.parametrize("quantize", [True, False])
def test_float16_directory_runs_in_float32_on_cpu(qat, tmp_path, quantize):
    flag = "--quantize" if quantize else "--no-quantize"
    half, full = tmp_path / "f16", tmp_path / "f32"
    for out, dtype in ((half, "float16"), (full, "float32")):
        assert run_convert(qat, "--out", out, flag, "--dtype", dtype).returncode == 0
    header, _ = read_header(half / "model.safetensors")
    assert {m["dtype"] for n, m in header.items() if n != "__metadata__"} >= {"F16"}  # on disk

    model, _ = load(str(half))
    dtypes = {str(v.dtype) for _, v in tree_flatten(model.parameters())}
    assert dtypes == ({"mlx.core.float32", "mlx.core.uint32"} if quantize
                      else {"mlx.core.float32"})
    after, _ = read_header(half / "model.safetensors")
    assert after == header  # the directory stays as converted: portable to Metal
    reference, _ = load(str(full))
    ids = mx.array([[0, 5, 9, 200, 17, 3, 3, 42]])
    # The QAT scales are float16 values already; only norms and biases round.
    assert np.allclose(np.array(model(ids)), np.array(reference(ids)), atol=2e-2, rtol=1e-2)


# --- many processes loading one source at once ---

@pytest.mark.e2e
def test_concurrent_first_loads_all_get_the_model(qat, tmp_path):
    """Processes that finished importing start load() together (a go-file), so
    their conversions really overlap; on main 2 of 50 failed with ENOTEMPTY."""
    source = copy_of(qat, tmp_path / "src")
    go = tmp_path / "go"
    script = ("import os, sys, time\n"
              "from pathlib import Path\n"
              "import mlx.core as mx\n"
              "from mobilemoe_mlx import load\n"
              "import mlx_lm.utils, transformers\n"
              "Path(sys.argv[2] + '.ready.' + str(os.getpid())).touch()\n"
              "while not Path(sys.argv[2]).exists():\n"
              "    time.sleep(0.001)\n"
              "model, _ = load(sys.argv[1], progress=False)\n"
              "print(model(mx.array([[1, 2, 3, 4]])).sum().item())\n")
    env = {**os.environ, "MOBILEMOE_MLX_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": str(REPO)}
    count = 12
    procs = [subprocess.Popen([sys.executable, "-c", script, str(source), str(go)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("go.ready.*"))) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    assert [r for r in results if r[0] != 0] == []
    assert len({r[1] for r in results}) == 1
    entries = [p for p in (tmp_path / "cache" / "local").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    assert not [p for p in entries[0].parent.iterdir() if ".partial-" in p.name
                or ".old-" in p.name]
