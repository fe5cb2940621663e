"""Issue 24, sections 3 and 4: what a new user meets in the first hour. Long work
says what it costs and shows progress; messages say what happened, in the
user's terms, once.

Default tier: every command runs in this process (click's test runner) on the
tiny shapes; nothing here waits on the network (HF_HUB_OFFLINE, or the Hub
client's own offline switch) or asserts a time."""

import io
import json

import huggingface_hub.constants
import mlx.core as mx
import pytest
from mlx_lm.generate import GenerationResponse
from test_edges import invoke

from bench.cli import main as bench_main
from bench.models import canonical
from bench.options import CPU_SHORT, FULL, QUICK, choose_protocol
from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.chat.commands import stats_line
from mobilemoe_mlx.chat.loader import load_chat_model
from mobilemoe_mlx.chat.session import ChatSession, Sampling
from mobilemoe_mlx.chat.stream import Generation, Turn
from mobilemoe_mlx.chat.terminal import Terminal
from mobilemoe_mlx.checkpoints import convert_cli, loading, synthetic
from mobilemoe_mlx.checkpoints.config import preset_name
from mobilemoe_mlx.checkpoints.hub import model_source
from mobilemoe_mlx.errors import UserError
from mobilemoe_mlx.model.runtime import CPU, CUDA, METAL


def error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    return lines[-1]


# -- one rule for model sizes --------------------------------------------------------

@pytest.mark.parametrize("typed, meant", [("s", "S"), ("S", "S"), ("m", "M"), ("l", "L"),
                                          ("TINY", "tiny"), ("Tiny", "tiny"), (" s ", "S"),
                                          ("SS", None), ("pro", None), ("", None)])
def test_a_size_is_the_same_name_in_any_case(typed, meant):
    assert preset_name(typed) == meant


def test_every_command_line_takes_the_sizes_in_any_case():
    assert model_source("s") == model_source("S") == "facebook/MobileMoE-S-QAT"
    assert model_source("l", "sft") == "facebook/MobileMoE-L-SFT"
    assert model_source("tiny") == "tiny"  # no release: a path or a repo id, as given
    assert [canonical(n) for n in ("s", "TINY", "glm4-s", "PRO", "Pro-Tiny", "mlx/s")] == \
        ["S", "tiny", "glm4-S", "pro", "pro-tiny", "mlx/s"]
    lower = invoke(bench_main, "plan", "--model", "l", "--json")
    upper = invoke(bench_main, "plan", "--model", "L", "--json")
    assert lower.exit_code == 0, lower.output
    assert json.loads(lower.stdout) == json.loads(upper.stdout)
    with pytest.raises(UserError, match="unknown preset 'x'"):
        synthetic.write_synthetic("/nonexistent/never-written", "x")


def test_synthetic_takes_any_case_and_shows_progress(tmp_path):
    result = invoke(synthetic.main, "--preset", "TINY", "--out", tmp_path / "t")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["synthetic"] is True
    assert "writing tiny's random weights" in result.stderr and "100%" in result.stderr
    assert result.stdout.strip() == str(tmp_path / "t")  # the bar is on stderr only
    quiet = invoke(synthetic.main, "--preset", "tiny", "--out", tmp_path / "q", "--no-progress")
    assert quiet.exit_code == 0 and "random weights" not in quiet.stderr


# -- one wording for a model this machine cannot get ---------------------------------

def test_offline_chat_and_convert_say_the_same_sentence_in_the_users_terms(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read by checkpoints/hub.py when it runs
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    chat = error_line(invoke(chat_cli.main, "--model", "s", "--prompt", "Hello"))
    convert = error_line(invoke(convert_cli.main, "s", "--out", tmp_path / "out"))
    assert chat.startswith("error: S (facebook/MobileMoE-S-QAT) cannot be fetched: the Hugging "
                           "Face Hub is unreachable"), chat
    assert "there is no directory" not in chat  # the user typed a size, not a path
    # The same sentence, whoever met it first (chat asks for the commit, convert downloads).
    assert convert == chat
    assert not (tmp_path / "out").exists()


# -- --kv-bits refused from config.json, before loading --------------------------------

def test_kv_bits_the_heads_cannot_take_is_refused_before_loading(qat_int4, monkeypatch):
    assert json.loads((qat_int4.path / "config.json").read_text())["head_dim"] % 32
    loads = []
    monkeypatch.setattr(loading, "load", lambda *a, **k: loads.append(a))
    line = error_line(invoke(chat_cli.main, "--model", qat_int4.path, "--kv-bits", "8",
                             "--prompt", "Hello"))
    assert "--kv-bits needs a head_dim divisible by 32" in line
    assert loads == []  # refused from the config alone


# -- no rate from one token; the context's end said once ---------------------------------

@pytest.fixture(scope="module")
def loaded(qat_int4):
    return load_chat_model(str(qat_int4.path), progress=False)


def test_a_one_token_answer_has_no_generation_rate(loaded):
    session = ChatSession(*loaded, sampling=Sampling(max_tokens=1))
    turn = session.ask("Hello")
    assert turn.generation_tokens == 1 and turn.finish == "length"
    line = stats_line(turn)
    assert "no generation rate from one token" in line
    assert line.count("tok/s") == 1  # the prompt's (more than one token) only


def test_a_rate_counts_the_steps_it_timed():
    """mlx-lm's generation rate counts the first token, made before its clock
    starts: n tokens over n - 1 steps. The turn's is (n - 1) over the same time."""
    def response(n, tps):
        return GenerationResponse(text="", token=0, logprobs=None, from_draft=False,
                                  prompt_tokens=5, prompt_tps=50.0, generation_tokens=n,
                                  generation_tps=tps, peak_memory=0.0, finish_reason="length")

    turn = Turn()
    turn.take(Generation(response=response(4, 40.0)), 4, None)
    assert turn.generation_tps == pytest.approx(30.0)  # 3 steps in the 0.1 s mlx-lm timed
    turn.take(Generation(response=response(1, 4044.8)), 1, None)
    assert turn.generation_tps == 0.0


def test_an_answer_cut_by_the_context_says_so_once(loaded):
    session = ChatSession(*loaded, sampling=Sampling(max_tokens=500))
    session.context = 40  # the answer gets what is left of 40 tokens, far below 500
    err = io.StringIO()
    turn = Terminal(session, io.StringIO(), io.StringIO(), err).answer("Hello")
    assert turn.finish == "length"
    said = err.getvalue()
    assert said.count("reached the end of the 40-token context") == 1, said
    assert "max tokens reached" not in said


# -- a CPU runs a short benchmark unless asked; the run says which ------------------------

NOTHING = dict(prompt_lengths=None, decode_contexts=None, gen_tokens=None, repeats=None,
               warmup=None, routing_tokens=None)


def test_a_cpu_gets_the_short_protocol_unless_asked():
    defaults, line = choose_protocol(NOTHING, quick=False, full=False, backend=CPU)
    assert defaults is CPU_SHORT and "short CPU settings" in line and "--full" in line
    for backend in (METAL, CUDA):
        assert choose_protocol(NOTHING, False, False, backend)[0] is FULL
    defaults, line = choose_protocol(NOTHING, quick=False, full=True, backend=CPU)
    assert defaults is FULL and "--full" in line
    defaults, line = choose_protocol({**NOTHING, "repeats": 1}, False, False, CPU)
    assert defaults is FULL and "--repeats given" in line
    assert choose_protocol(NOTHING, quick=True, full=False, backend=CPU)[0] is QUICK
    with pytest.raises(UserError, match="--quick and --full"):
        choose_protocol(NOTHING, quick=True, full=True, backend=CPU)


def test_bench_run_says_which_protocol_runs(tmp_path):
    r = invoke(bench_main, "run", "--models", "tiny", "--prompt-lengths", "8",
               "--decode-contexts", "8", "--gen-tokens", "2", "--repeats", "1", "--warmup", "0",
               "--routing-tokens", "0", "--bandwidth", "100", "--no-plots", "--no-progress",
               "--out", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "protocol: the paper's (--prompt-lengths, --decode-contexts" in r.stderr
    assert r.stderr.index("protocol:") < r.stderr.index("estimated time:")


# -- bench profile: an estimate first, then progress --------------------------------------

def test_profile_prints_an_estimate_then_progress():
    r = invoke(bench_main, "profile", "--model", "TINY", "--context", "8", "--chunk", "4",
               "--repeats", "1")
    assert r.exit_code == 0, r.output
    assert r.stderr.startswith("estimated time:") and "after building tiny" in r.stderr
    assert "100% prefill: run 1/1, instrumented" in r.stderr
    assert "decode step: 1 token after 8" in r.stdout and "estimated" not in r.stdout
    quiet = invoke(bench_main, "profile", "--model", "tiny", "--context", "8", "--chunk", "0",
                   "--repeats", "1", "--no-progress")
    assert quiet.exit_code == 0 and quiet.stderr == ""


# -- load(): no float32 copy of a checkpoint in the cache ---------------------------------

def test_the_cache_entry_is_what_convert_writes_and_runs_in_float32_here(
        synthetic_qat, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "cache"))
    model, _ = loading.load(str(synthetic_qat), progress=False)
    (entry,) = [p.parent for p in (tmp_path / "cache").rglob("conversion.json")]
    assert json.loads((entry / "conversion.json").read_text())["dtype"] == "float16"
    expected = mx.float16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    assert model.model.norm.weight.dtype == expected  # cast in memory on the CPU only
