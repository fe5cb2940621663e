"""The remaining edges of issue 15, each tried the way a new user meets it: a
checkpoint kept beside the cache, pickles of tensors that are not plain dense
ones, outputs that cannot be directories, the order of chat's checks, and the
first hour's stumbles (a missing org/name path, an unknown size, the try-it path)."""

import builtins
import re
import shutil
import signal
from pathlib import Path

import pytest
from checkpoints import import_torch
from click.testing import CliRunner
from test_convert_cli import REPO, assert_clean_failure, run_convert

from bench.cli import main as bench_cli
from mobilemoe_mlx import load
from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.checkpoints import synthetic
from mobilemoe_mlx.checkpoints.convert import convert
from mobilemoe_mlx.checkpoints.synthetic import write_synthetic, write_tokenizer
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.planner import PREFILL_CHUNK


@pytest.fixture(scope="module")
def qat(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "qat"), "tiny", "qat")


def invoke(command, *args):
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return CliRunner().invoke(command, [str(a) for a in args])
    finally:
        signal.signal(signal.SIGTERM, handler)  # run_cli installs its own


def one_error_line(result, *fragments):
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines


# --- a weights directory that holds the cache ----------------------------------

@pytest.fixture
def home(qat, tmp_path, monkeypatch):
    """A home directory with the checkpoint's files directly in it, and the cache
    where it is by default: ~/.cache/mobilemoe-mlx."""
    home = tmp_path / "home"
    shutil.copytree(qat, home)
    monkeypatch.setenv("HOME", str(home))
    for name in ("MOBILEMOE_MLX_HOME", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.mark.parametrize("given", ["model.safetensors", "."])
def test_a_checkpoint_in_home_converts_into_the_cache_inside_it(home, given, capsys):
    source = str(home / given)
    before = {f.name: f.read_bytes() for f in home.iterdir() if f.is_file()}
    model, _ = load(source)
    assert "converting" in capsys.readouterr().err
    assert list((home / ".cache" / "mobilemoe-mlx" / "local").glob("*/model.safetensors"))
    (home / ".bash_history").write_text("ls\n")  # a file the conversion does not read
    load(source)
    assert "using the converted model cached" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in home.iterdir() if f.is_file()
            and f.name != ".bash_history"} == before


def test_chat_on_a_checkpoint_in_home_answers(home):
    result = invoke(chat_cli.main, "--model", "~/model.safetensors", "--max-tokens", "3",
                    "--prompt", "Hello")
    assert result.exit_code == 0, result.stderr
    assert "--out" not in result.stderr


def test_cache_errors_never_speak_of_out(qat, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "a-file" / "cache"))
    result = invoke(chat_cli.main, "--model", qat, "--prompt", "Hello")
    lines = one_error_line(result, "MOBILEMOE_MLX_HOME")
    assert "--out" not in result.stderr and "--force" not in result.stderr and len(lines) == 1


# --- pickles: only a dict from names to plain dense CPU tensors ------------------

def _state_dict_with(bf16_dir: Path, out: Path, change) -> Path:
    """A copy of a bf16 checkpoint as model.pt, with one entry changed."""
    torch = import_torch()
    from safetensors.torch import load_file

    out.mkdir()
    for f in bf16_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    state = load_file(str(bf16_dir / "model.safetensors"))
    change(state, torch, "model.layers.0.self_attn.q_proj.weight")
    torch.save(state, out / "model.pt")
    return out


def _replace(make):
    return lambda state, torch, name: state.__setitem__(name, make(state[name], torch))


PICKLES = {  # case: (the change, what the one line says)
    "sparse COO": (_replace(lambda t, torch: t.to_sparse()), "is a sparse_coo tensor"),
    "sparse CSR": (_replace(lambda t, torch: t.float().to_sparse_csr()), "is a sparse_csr tensor"),
    "meta device": (_replace(lambda t, torch: t.to("meta")), "is on the meta device"),
    "quantized": (_replace(lambda t, torch: torch.quantize_per_tensor(t.float(), 0.1, 0,
                                                                      torch.qint8)),
                  "is a quantized tensor"),
    "nested": (_replace(lambda t, torch: torch.nested.nested_tensor([t.float()[:2],
                                                                     t.float()[:3]])),
               "is a nested tensor"),
    "complex dtype": (_replace(lambda t, torch: t.to(torch.complex64)), "has dtype complex64"),
    "bool dtype": (_replace(lambda t, torch: t > 0), "has dtype bool"),
    "a list": (_replace(lambda t, torch: t.tolist()[:1]), "is a list, not a tensor"),
    "an int key": (lambda state, torch, name: state.__setitem__(7, state[name]),
                   "the state dict has the key 7 (int)"),
}


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return write_synthetic(str(tmp_path_factory.mktemp("ckpt") / "bf16"), "tiny", "bf16")


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: nested tensors are a prototype
@pytest.mark.parametrize("case", list(PICKLES))
def test_a_pickle_of_what_is_not_a_dense_tensor_is_one_line(bf16, tmp_path, case):
    change, says = PICKLES[case]
    src = _state_dict_with(bf16, tmp_path / "src", change)
    out = tmp_path / "out"
    assert_clean_failure(run_convert(src, "--out", out), out, says)


def test_a_pickle_of_tensors_that_require_grad_converts(bf16, tmp_path):
    grad = _replace(lambda t, torch: t.float().to(torch.bfloat16).requires_grad_())
    src = _state_dict_with(bf16, tmp_path / "src", grad)
    assert run_convert(src, "--out", tmp_path / "out").returncode == 0


# --- an --out that cannot be a directory ----------------------------------------

def _long(tmp_path: Path, length: int) -> Path:
    return tmp_path / ("a" * length)


OUTS = {  # case: (the --out under tmp_path, what the one line says)
    "its parent is a file": (lambda t: t / "a-file" / "out", "a-file is a file, not a directory"),
    "a component is a file": (lambda t: t / "a-file" / "x" / "y", "is a file, not a directory"),
    "a name too long": (lambda t: _long(t, 250), "longer than this file system takes"),
    "a path too long": (lambda t: Path(str(t) + ("/" + "b" * 200) * 25), "path is longer"),
}


@pytest.mark.parametrize("case", list(OUTS))
def test_an_out_that_cannot_be_a_directory_is_one_line(qat, tmp_path, case):
    (tmp_path / "a-file").write_text("mine")
    where, says = OUTS[case]
    out = where(tmp_path)
    result = run_convert(qat, "--out", out)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert result.stderr.startswith("error: --out") and len(result.stderr.splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "mine"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_an_out_on_a_pseudo_file_system_is_one_line(qat):
    result = run_convert(qat, "--out", "/proc/mobilemoe-out")
    assert result.returncode == 2 and result.stderr.startswith("error: --out /proc/mobilemoe-out")


def test_every_writer_checks_its_out_alike(tmp_path):
    (tmp_path / "a-file").write_text("mine")
    result = invoke(synthetic.main, "--out", tmp_path / "a-file" / "syn")
    one_error_line(result, "a-file is a file, not a directory")
    with pytest.raises(UserError, match="not a usable path"):
        convert("unused", str(tmp_path / "nul\0byte"))
    # The benchmark's --out, written into rather than replaced, is checked by the
    # same code (mobilemoe_mlx/checkpoints/output_dir.py): word for word the same line.
    for out in (tmp_path / "a-file" / "x", "", tmp_path / ("a" * 300) / "x"):
        lines = [one_error_line(invoke(command, *args, "--out", out))[-1]
                 for command, args in ((synthetic.main, []), (bench_cli, ["run", "--quick"]),
                                       (bench_cli, ["export-parity"]))]
        assert len(set(lines)) == 1, lines
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


# --- chat checks what it can before it prints "converting" -----------------------

@pytest.fixture(scope="module")
def unconverted(qat, tmp_path_factory):
    """Copies of the unconverted checkpoint: without tokenizer.json, without a chat template."""
    root = tmp_path_factory.mktemp("variants")
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(qat, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    no_template = root / "no-template"
    shutil.copytree(qat, no_template)
    write_tokenizer(no_template, 512, with_chat_template=False)
    return {"no tokenizer.json": (no_tokenizer, [], "no tokenizer.json"),
            "no chat template": (no_template, [], "no chat template"),
            "--kv-bits the heads cannot take": (qat, ["--kv-bits", "8"], "head_dim divisible")}


@pytest.mark.parametrize("case", ["no tokenizer.json", "no chat template",
                                  "--kv-bits the heads cannot take"])
def test_chat_refuses_before_converting(unconverted, tmp_path, monkeypatch, case):
    source, flags, says = unconverted[case]
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "cache"))
    result = invoke(chat_cli.main, "--model", source, *flags, "--prompt", "Hello")
    lines = one_error_line(result, says)
    assert len(lines) == 1, result.stderr  # no "converting ... once into ..." before it
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


# --- a newcomer's first hour ------------------------------------------------------

def test_a_missing_org_name_path_says_the_directory_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and the Hub is out of reach
    result = invoke(chat_cli.main, "--model", "mlx/MobileMoE-S", "--prompt", "Hello")
    one_error_line(result, f"there is no directory mlx/MobileMoE-S in {tmp_path}",
                   "the Hugging Face Hub is unreachable")


def test_an_unknown_size_lists_the_sizes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke(chat_cli.main, "--model", "SS", "--prompt", "Hello")
    one_error_line(result, "--model SS", "S, M or L")


def test_the_readme_try_it_path_asks_for_a_short_answer():
    """A synthetic model never stops by itself (benchmarks need exactly the tokens
    asked for), so the README's try-it chat must bound the answer itself."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Try it without the Hub")[1].split("\n## ")[0]
    command = next(line for line in section.splitlines() if line.startswith("python chat.py"))
    tokens = re.search(r"--max-tokens (\d+)", command)
    assert tokens and int(tokens.group(1)) <= 64, command


def test_docs_give_the_prefill_chunk_the_code_uses():
    text = (REPO / "docs" / "chat.md").read_text()
    chunks = [int(n.replace(",", "")) for n in re.findall(r"chunks of ([\d,]+) tokens", text)]
    assert chunks and set(chunks) == {PREFILL_CHUNK}, chunks


# --- a cache hit reads each file once ---------------------------------------------

def test_a_cache_hit_reads_each_weights_header_once(qat, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "cache"))
    load(str(qat), progress=False)
    opened = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    load(str(qat), progress=False)  # the data itself MLX maps in C++, unseen here
    monkeypatch.setattr(builtins, "open", real_open)
    assert opened.count("model.safetensors") == 1, opened
