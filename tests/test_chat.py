"""chat.py and its session on tiny synthetic checkpoints (float32, MLX's CPU backend).

The session tests count the tokens that actually reach the model through a thin
proxy around it; where a test needs to know the answer's text it fixes it with a
sampler that always picks one token, not by what random weights happen to say.
The CLI tests run chat.py in this process (click's test runner); the few that
need a real process (piped stdin end to end, a pseudo-terminal with a real
Ctrl-C) are marked e2e.

Nothing here depends on how fast the machine is (issue 19: a busy machine made
tests fail): a Ctrl-C is sent once the output shows the moment it is meant for
has come, never after a sleep, and every timeout only bounds a hang.
"""

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from mlx_lm.tokenizer_utils import TokenizerWrapper

from mobilemoe_mlx.chat import cli as chat_cli
from mobilemoe_mlx.chat.loader import load_chat_model
from mobilemoe_mlx.chat.session import ChatSession, Sampling
from mobilemoe_mlx.chat.stream import draft_acceptance
from mobilemoe_mlx.chat.terminal import Terminal
from mobilemoe_mlx.checkpoints.synthetic import write_tokenizer
from mobilemoe_mlx.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FRANCE = "What is the capital of France?"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # but newline and tab
# Seconds a real process may take for one step (a start loads MLX, mlx-lm and
# transformers: seconds when idle, minutes on a machine busy with other work).
# Only a hang should reach it.
HANG = 300


CHAT = chat_cli.main  # the click command behind chat.py and mobilemoe-chat


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, qat_int4):
    """The session's tiny converted checkpoint (conftest.py), and variants of it made by hand."""
    root = tmp_path_factory.mktemp("chat")
    tiny = qat_int4.path
    raw = root / "no-template"
    shutil.copytree(tiny, raw)
    write_tokenizer(raw, 512, with_chat_template=False)
    no_tokenizer = root / "no-tokenizer"
    shutil.copytree(tiny, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    return {"tiny": tiny, "unconverted": qat_int4.source.path, "raw": raw,
            "no_tokenizer": no_tokenizer, "kv": _with_head_dim_32(tiny, root / "head-dim-32"),
            "home": root / "home"}


def _lines(text: str):
    """Lines split on newlines only: random-weight answers can hold other
    characters that str.splitlines() also breaks on (\x1c-\x1e, \x85)."""
    return text.rstrip("\n").split("\n") if text else []


def _with_head_dim_32(src: Path, out: Path) -> Path:
    """The tiny model with 32-wide heads: MLX quantizes KV only in groups of 32 or more."""
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config["head_dim"] = hd = 32
    (out / "config.json").write_text(json.dumps(config))
    weights = mx.load(str(out / "model.safetensors"))
    d, h, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    shapes = {"q_proj": (h * hd, d), "k_proj": (kv * hd, d), "v_proj": (kv * hd, d),
              "o_proj": (d, h * hd)}
    key = mx.random.key(1)
    for i in range(config["num_hidden_layers"]):
        for name, shape in shapes.items():
            key, sub = mx.random.split(key)
            w = mx.random.normal(shape, key=sub) / shape[1] ** 0.5
            q, s, b = mx.quantize(w, group_size=32, bits=4)
            prefix = f"model.layers.{i}.self_attn.{name}"
            weights.update({f"{prefix}.weight": q, f"{prefix}.scales": s,
                            f"{prefix}.biases": b})
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    return out


@pytest.fixture(scope="module")
def loaded(dirs):
    return load_chat_model(str(dirs["tiny"]), progress=False)


class Counting:
    """The model, recording every token it is fed (mlx-lm calls `model(tokens, cache=...)`)."""

    def __init__(self, model):
        self.model, self.fed = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None):
        self.fed += inputs.reshape(-1).tolist()
        return self.model(inputs, cache=cache)


def _session(loaded, **kwargs):
    model, tokenizer = loaded
    counting = Counting(model)
    kwargs.setdefault("sampling", Sampling(max_tokens=20))
    return ChatSession(counting, tokenizer, **kwargs), counting, tokenizer


def _always(session, text: str):
    """Make every answer `text` repeated, whatever the random weights would say: mlx-lm's
    sampler is replaced by one that always picks `text`'s single token."""
    (token,) = session.tokenizer.encode(text, add_special_tokens=False)
    session._sampler = lambda logprobs: mx.full((logprobs.shape[0],), token, dtype=mx.uint32)
    return session


class Tty(io.StringIO):
    """An output stream that says it is a terminal."""

    def isatty(self):
        return True


class SigintAfterAnswer(TokenizerWrapper):
    """The tokenizer, sending this process real SIGINTs (Ctrl-C) when the session
    renders the conversation without a generation prompt: only once an answer is
    over and its stream closed, while the cache and history are brought up to date."""

    def __init__(self, tokenizer: TokenizerWrapper, presses: int):
        self.__dict__.update(tokenizer.__dict__)
        self._presses = presses

    def apply_chat_template(self, *args, add_generation_prompt=False, **kwargs):
        if not add_generation_prompt:
            presses, self._presses = self._presses, 0
            for _ in range(presses):
                # raise_signal returns only after Python ran the handler: no timing involved.
                signal.raise_signal(signal.SIGINT)
        return super().apply_chat_template(
            *args, add_generation_prompt=add_generation_prompt, **kwargs)


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


# -- the session -------------------------------------------------------------------

def test_second_turn_prefills_only_its_new_tokens(loaded):
    session, counting, tok = _session(loaded)
    first = session.ask("Hello")
    eot = tok.convert_tokens_to_ids("<|eot|>")
    # mlx-lm feeds each sampled token before it checks for a stop, so an answer
    # that ended on <|eot|> has put that token in the cache too.
    first_stop = [eot] if first.finish == "stop" else []
    assert counting.fed == _encode(tok, tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False)
    ) + first.tokens + first_stop

    counting.fed = []
    second = session.ask(FRANCE)
    # What the template adds after the first answer: its <|eot|>, the new user
    # message and the assistant header. Nothing before it is fed again.
    full = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"},
         {"role": "assistant", "content": tok.decode(first.tokens)},
         {"role": "user", "content": FRANCE}], add_generation_prompt=True, tokenize=False)
    answer = tok.decode(first.tokens).strip()
    new = _encode(tok, full[full.index(answer) + len(answer):])
    assert new[0] == eot and len(new) < 40
    new = new[len(first_stop):]  # a cached <|eot|> is not fed again
    second_stop = [eot] if second.finish == "stop" else []
    assert counting.fed == new + second.tokens + second_stop
    assert second.prefilled == len(new)
    assert [c.offset for c in session.cache] == [len(session.cache_tokens)] * 2


def test_reset_clears_the_cache_and_the_conversation(loaded):
    session, counting, tok = _session(loaded)
    err = io.StringIO()
    Terminal(session, io.StringIO(f"Hello\n{FRANCE}\n/reset\n/stats\n"), io.StringIO(),
             err).run()
    assert "cleared" in err.getvalue()
    # /stats no longer shows the forgotten conversation's last answer as current.
    assert err.getvalue().rstrip().endswith("no answer since /reset")
    assert session.last is None
    assert session.messages == [] and session.cache_tokens == []
    assert all(c.offset == 0 for c in session.cache)

    fresh, _, _ = _session(loaded)
    counting.fed = []
    again, first = session.ask("Hello"), fresh.ask("Hello")
    assert again.tokens == first.tokens  # nothing of the old conversation is left
    assert again.prefilled == first.prefilled
    assert counting.fed[0] == tok.bos_token_id  # the whole prompt was fed again


def test_system_command_changes_the_system_prompt(loaded):
    session, counting, tok = _session(loaded, system="You are terse.")
    _always(session, "a")
    out, err = io.StringIO(), io.StringIO()
    terminal = Terminal(session, io.StringIO("Hello\n/system Answer in French.\n/system\n"
                                             f"{FRANCE}\n"), out, err)
    terminal.run()
    assert session.system == "Answer in French."
    assert "system prompt: 'Answer in French.'" in err.getvalue()
    assert out.getvalue() == "a" * 20 + "\n" + "a" * 20 + "\n"  # two answers, nothing else
    # The second turn re-read the conversation from the new system prompt on.
    second = session.last
    fed_prompt = counting.fed[len(counting.fed) - second.prefilled - len(second.tokens):][
        :second.prefilled]
    assert "Answer in French." in tok.decode(fed_prompt)
    assert "terse" not in tok.decode(session.cache_tokens)


def test_context_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(loaded):
    session, counting, tok = _session(loaded, system="Be brief.")
    session.context = 160  # the real models hold 8,192; the rule is the same
    notes = []
    for i in range(5):
        turn = session.ask(f"Question number {i}: {FRANCE}")
        notes += turn.notes
        assert len(session.cache_tokens) <= session.context
    assert any("dropped the oldest" in n for n in notes)
    assert session.conversation()[0] == {"role": "system", "content": "Be brief."}
    assert session.messages[-2]["content"].startswith("Question number 4")
    too_long = session.ask("word " * 400)
    assert too_long.finish == "skipped" and "shorten it" in too_long.notes[0]
    assert "/reset" not in too_long.notes[0]  # the message alone does not fit: no help there
    assert session.messages[-2]["content"].startswith("Question number 4")


def test_a_refused_message_still_writes_its_line_to_stdout(loaded):
    session, _, _ = _session(loaded, sampling=Sampling(max_tokens=4))
    session.context = 160
    out, err = io.StringIO(), io.StringIO()
    Terminal(session, io.StringIO(f"Hello\n{'word ' * 400}\n{FRANCE}\n"), out, err).run()
    answers = _lines(out.getvalue())
    assert len(answers) == 3 and answers[1] == "" and answers[0] and answers[2]
    assert "shorten it" in err.getvalue() and "shorten it" not in out.getvalue()


def test_a_system_prompt_that_cannot_fit_is_refused_and_the_old_one_kept(loaded):
    session, _, _ = _session(loaded, system="Be brief.")
    session.context = 160
    err = io.StringIO()
    Terminal(session, io.StringIO(f"/system {'word ' * 200}\n/system\n"), io.StringIO(),
             err).run()
    assert "system prompt alone does not fit" in err.getvalue()
    assert session.system == "Be brief." and "system prompt: 'Be brief.'" in err.getvalue()
    with pytest.raises(UserError, match="system prompt alone does not fit the 160-token"):
        session.set_system("word " * 200)
    with pytest.raises(UserError, match="system prompt alone does not fit the 8192-token"):
        ChatSession(*loaded, system="word " * 9000)


def test_stats_counts_distinct_experts_per_layer(loaded):
    session, _, _ = _session(loaded, sampling=Sampling(max_tokens=1))
    turn = session.ask(FRANCE)
    top_k = loaded[0].args.num_experts_per_tok
    # One answer token went through each layer, choosing top_k distinct experts.
    assert [a for a, _ in turn.experts] == [top_k] * len(loaded[0].layers)
    assert all(top_k < p <= loaded[0].args.num_local_experts for _, p in turn.experts)
    err = io.StringIO()
    Terminal(session, io.StringIO("/stats\n"), io.StringIO(), err).run()
    assert f"L0: {top_k}/" in err.getvalue() and "of 8192 tokens" in err.getvalue()


def test_stats_reports_what_a_rotating_cache_keeps(loaded):
    session, _, _ = _session(loaded, max_kv_size=64)
    for text in ("Hello", FRANCE, "Hi"):
        session.ask(text)
    read = len(session.cache_tokens)
    assert read > 64
    err = io.StringIO()
    Terminal(session, io.StringIO("/stats\n"), io.StringIO(), err).run()
    assert f"context: 64 kept of {read} tokens read (rotating KV cache of 64," in err.getvalue()
    assert session.cache_held() == 64


def test_control_characters_are_shown_as_question_marks_on_a_terminal_only(loaded):
    outputs = []
    for out in (io.StringIO(), Tty()):
        session, _, _ = _session(loaded, sampling=Sampling(max_tokens=3))
        _always(session, "\x1b")  # ESC: the start of every terminal escape sequence
        Terminal(session, io.StringIO(), out, io.StringIO()).answer("Hi")
        outputs.append(out.getvalue())
    piped, shown = outputs
    assert piped == "\x1b\x1b\x1b\n"  # a pipe gets the text as generated
    assert shown == "???\n"


def test_ctrl_c_after_the_answer_keeps_the_session(loaded):
    """Ctrl-C twice while the cache and the conversation are being brought up to date."""
    model, tokenizer = loaded
    # In the chat: the second press arrives when no token is being generated any more.
    session = _always(ChatSession(model, SigintAfterAnswer(tokenizer, 2),
                                  sampling=Sampling(max_tokens=6)), "a")
    terminal = Terminal(session, io.StringIO(), io.StringIO(), io.StringIO())
    try:
        first = terminal.answer("Hello")
    except KeyboardInterrupt:
        pytest.fail("a second Ctrl-C after the answer ended the session")
    assert first.finish == "length" and len(session.messages) == 2  # not even "stopped"
    second = terminal.answer(FRANCE)
    assert second.prefilled < 40 and len(session.messages) == 4
    assert [c.offset for c in session.cache] == [len(session.cache_tokens)] * 2

    # A library caller with Python's own handler: ask() returns, the state consistent.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        session = _always(ChatSession(model, SigintAfterAnswer(tokenizer, 1),
                                      sampling=Sampling(max_tokens=6)), "a")
        turn = session.ask("Hello")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C after the answer came out of ask()")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert turn.finish == "interrupted" and session.messages == []
    assert session.cache_tokens == [] and all(c.offset == 0 for c in session.cache)
    assert session.ask(FRANCE).finish == "length"


def test_draft_acceptance_counts_rounds():
    # Rounds of 2 drafts: 2 accepted + own, 1 accepted + own, then cut after 1 draft.
    assert draft_acceptance([True, True, False, True, False, True], 2, 100) == (4, 5)
    # max_tokens=3 leaves room for 2 drafts, then for 0 in a round of its own.
    assert draft_acceptance([True, True, False], 2, 3) == (2, 2)


def test_draft_of_the_same_model_accepts_every_token_and_changes_nothing(loaded, dirs):
    draft, _ = load_chat_model(str(dirs["tiny"]), progress=False)
    session, _, _ = _session(loaded, draft_model=draft, num_draft_tokens=3)
    plain, _, _ = _session(loaded)
    for text in ("Hello", FRANCE):
        turn, reference = session.ask(text), plain.ask(text)
        assert turn.tokens == reference.tokens
        assert turn.drafted > 0 and turn.accepted == turn.drafted
    # The draft model's cache lags the model's by up to two tokens when an answer
    # ends (its last draft and the model's own token); both re-read those.
    assert plain.last.prefilled <= session.last.prefilled <= plain.last.prefilled + 2


def test_kv_bits_needs_heads_quantization_can_take(loaded):
    with pytest.raises(UserError, match="head_dim divisible by 32"):
        ChatSession(*loaded, kv_bits=8)
    with pytest.raises(UserError, match="4 or 8"):  # click checks the CLI; not a library call
        ChatSession(*loaded, kv_bits=3)


@pytest.fixture(scope="module")
def small_vocab(loaded):
    """(model, tokenizer, vocab_size): a random model whose vocabulary is smaller than its
    tokenizer's, made directly (load() is for checkpoints whose files agree). The prompt
    of "Hi" lies within it; that of "Hello" holds the id vocab_size, one past the end."""
    from mobilemoe_mlx.checkpoints.config import preset_config
    from mobilemoe_mlx.model.mobilemoe import Model, ModelArgs

    tokenizer = loaded[1]

    def prompt(message):
        return _encode(tokenizer, tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False))

    vocab = max(prompt("Hello"))
    assert max(prompt("Hi")) < vocab and max(prompt(FRANCE)) < vocab
    config = dict(preset_config("tiny"), vocab_size=vocab)
    model = Model(ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    return model, tokenizer, vocab


def test_token_ids_outside_the_vocabulary_are_refused_before_they_are_fed(small_vocab):
    """MLX reads past the embedding table for such an id (a segmentation fault): the
    session checks every prompt on the host first, the first turn and every later one."""
    model, tokenizer, vocab = small_vocab
    out_of_range = rf"token id\(s\) {vocab} outside this model's vocabulary \(0 to {vocab - 1}\)"
    counting = Counting(model)
    session = _always(ChatSession(counting, tokenizer, sampling=Sampling(max_tokens=4)), "a")
    with pytest.raises(UserError, match="this message's prompt holds " + out_of_range):
        session.ask("Hello")  # the first turn
    assert counting.fed == [] and session.messages == [] and session.cache_tokens == []

    first = session.ask("Hi")  # the session goes on
    assert counting.fed and first.text == "aaaa" and len(session.messages) == 2
    state = (list(session.messages), list(session.cache_tokens), list(session.history_tokens))
    counting.fed = []
    with pytest.raises(UserError, match=out_of_range):
        session.ask("Hello")  # a later turn: nothing fed, nothing forgotten
    assert counting.fed == [] and all(c.offset == len(state[1]) for c in session.cache)
    assert (session.messages, session.cache_tokens, session.history_tokens) == state
    assert session.ask(FRANCE).prefilled < 40  # and the cache is still used

    # A system prompt is checked when it is set: by /system, and at the start.
    with pytest.raises(UserError, match="the system prompt .* holds " + out_of_range):
        session.set_system("Hello")
    assert session.system is None
    with pytest.raises(UserError, match=out_of_range):
        ChatSession(model, tokenizer, system="Hello")

    # Raw continuation feeds its prompts the same way.
    raw = ChatSession(Counting(model), tokenizer, raw=True, sampling=Sampling(max_tokens=2))
    with pytest.raises(UserError, match=out_of_range):
        raw.ask(tokenizer.decode([vocab]))
    assert raw.model.fed == []


def test_a_message_with_ids_outside_the_vocabulary_gets_a_note_and_an_empty_line(small_vocab):
    model, tokenizer, vocab = small_vocab
    session = _always(ChatSession(model, tokenizer, sampling=Sampling(max_tokens=3)), "a")
    out, err = io.StringIO(), io.StringIO()
    Terminal(session, io.StringIO("Hi\nHello\n/system Hello\n/system\nHi\n"), out,
             err).run()
    assert out.getvalue() == "aaa\n\naaa\n"  # one line per message, the refused one empty
    notes = err.getvalue().splitlines()
    assert sum(f"token id(s) {vocab} outside" in n for n in notes) == 2
    assert any(n.endswith("the message is skipped") for n in notes)
    assert any(n.endswith("the system prompt stays as it was") for n in notes)
    assert "no system prompt" in err.getvalue() and len(session.messages) == 4


def test_prompt_with_ids_outside_the_vocabulary_exits_2(small_vocab, dirs, chat, monkeypatch):
    import mlx_lm.sample_utils

    from mobilemoe_mlx.chat import loader as chat_model

    model, tokenizer, vocab = small_vocab
    # load() will refuse a directory whose tokenizer and model disagree; the chat's
    # own check is for the ids it is about to feed, so it gets the model directly,
    # and answers "a" whatever its random weights say (see _always).
    monkeypatch.setattr(chat_model, "load_models", lambda *a: (model, tokenizer, None))
    (token,) = _encode(tokenizer, "a")

    def always_a(*args, **kwargs):
        return lambda logprobs: mx.full((logprobs.shape[0],), token, dtype=mx.uint32)

    monkeypatch.setattr(mlx_lm.sample_utils, "make_sampler", always_a)
    r = chat("--model", dirs["tiny"], "--max-tokens", "3", "--prompt", "Hello")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith("error: this message's prompt holds token id(s) ")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = chat("--model", dirs["tiny"], "--max-tokens", "3", stdin="Hi\nHello\nHi\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "aaa\n\naaa\n" and r.stderr.count("3 tokens, prompt") == 2
    assert "the message is skipped" in r.stderr


# -- the command line, in-process --------------------------------------------------

@pytest.fixture
def chat(dirs, monkeypatch):
    """chat(*args, stdin=...) -> click's Result of chat.py run in this process."""
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(dirs["home"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def run(*args, stdin=""):
        return CliRunner().invoke(CHAT, [str(a) for a in args], input=stdin)

    return run


def test_prompt_answers_once_and_exits(dirs, chat):
    r = chat("--model", dirs["tiny"], "--max-tokens", "8", "--prompt", "Hello",
             "--system", "Be brief.", "--temp", "0.7", "--top-p", "0.9", "--top-k", "50",
             "--min-p", "0.05", "--repetition-penalty", "1.15", "--seed", "3",
             stdin="not read\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.endswith("\n") and "not read" not in r.stdout
    stats = [line for line in r.stderr.splitlines() if "tok/s" in line]
    assert len(stats) == 1 and re.match(r"\d+ tokens, prompt \d+ tok", stats[0])


def test_raw_mode_on_a_checkpoint_without_chat_template(dirs, chat):
    r = chat("--model", dirs["raw"], "--prompt", "The quick brown")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no chat template" in r.stderr and "--raw" in r.stderr
    r = chat("--model", dirs["raw"], "--raw", "--max-tokens", "6",
             stdin="The quick brown\nA mixture of experts\n")
    assert r.exit_code == 0, r.stderr
    # Raw continuation has no stop token in the template: both run to --max-tokens.
    assert r.stderr.count("6 tokens, prompt") == 2


ERRORS = {  # case: (arguments, what the one line says)
    "bad model path": (["--model", "{home}/nowhere"], "nowhere"),
    "bad flag value": (["--model", "{tiny}", "--top-p", "2"], "--top-p"),
    "missing tokenizer": (["--model", "{no_tokenizer}"], "tokenizer"),
    "--system with --raw": (["--model", "{raw}", "--raw", "--system", "Be brief."],
                            "--system has no effect with --raw"),
    "system prompt too long": (["--model", "{tiny}", "--system", "word " * 9000],
                               "system prompt alone does not fit the 8192-token context"),
    "empty --prompt": (["--model", "{tiny}", "--prompt", ""], "--prompt is empty"),
    "empty --model": (["--model", ""], "--model is empty"),
    # An unconverted --model would print "converting ..." first if these got that far:
    "config file as --model": (["--model", "{unconverted}/config.json"],
                               "neither a directory nor a weights file"),
    "bad --draft path": (["--model", "{unconverted}", "--draft", "{home}/no-draft"],
                         "--draft {home}/no-draft is neither an existing path"),
    # Sampling options that pass a range check but cannot be sampled with (issue 7).
    "nan --temp": (["--model", "{unconverted}", "--temp", "nan"], "'nan' is not a finite"),
    "inf --temp": (["--model", "{unconverted}", "--temp", "inf"], "--temp"),
    "nan --top-p": (["--model", "{unconverted}", "--top-p", "nan"], "--top-p"),
    "nan --min-p": (["--model", "{unconverted}", "--min-p", "nan"], "--min-p"),
    "nan --repetition-penalty": (["--model", "{unconverted}", "--repetition-penalty", "nan"],
                                 "--repetition-penalty"),
    "inf --repetition-penalty": (["--model", "{unconverted}", "--repetition-penalty", "inf"],
                                 "--repetition-penalty"),
    # mx.random.seed takes 0 .. 2**64-1; anything else was an internal error.
    "negative --seed": (["--model", "{unconverted}", "--seed", "-1"], "--seed"),
    "--seed of 2**64": (["--model", "{unconverted}", "--seed", str(2**64)], "--seed"),
    "zero --max-kv-size": (["--model", "{unconverted}", "--max-kv-size", "0"], "--max-kv-size"),
    "negative --max-kv-size": (["--model", "{unconverted}", "--max-kv-size", "-5"],
                               "--max-kv-size"),
    "--prompt not UTF-8": (["--model", "{unconverted}", "--prompt", "caf\udce9"],
                           "--prompt is not valid UTF-8"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_are_one_line_and_exit_2(dirs, chat, case):
    args, says = ERRORS[case]
    args = [a.format(**dirs) for a in args]
    r = chat(*args, *([] if "--prompt" in args else ["--prompt", "Hello"]))
    assert r.exit_code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr
    assert says.format(**dirs) in r.stderr and r.stdout == ""
    # All of them are refused before anything is loaded or converted.
    assert not dirs["home"].exists() or not any(dirs["home"].rglob("*.safetensors"))


LONG_SYSTEM = "word " * 9000  # 9,000 tokens and more: past the 8,192-token context


def _one_error_line(r, says: str) -> None:
    assert r.exit_code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert says in r.stderr and r.stdout == ""


@pytest.mark.parametrize("what", ["directory", "weights file"])
def test_a_system_prompt_too_long_is_refused_before_converting(dirs, chat, tmp_path,
                                                              monkeypatch, what):
    """Measured with the checkpoint's own tokenizer and config before anything is done:
    the cache stays empty (it used to be converted first, then refused)."""
    home = tmp_path / "home"
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(home))
    model = dirs["unconverted"] / ("model.safetensors" if what == "weights file" else "")
    r = chat("--model", model, "--system", LONG_SYSTEM, "--prompt", "Hello")
    _one_error_line(r, "the system prompt alone does not fit the 8192-token context")
    assert not home.exists() or not any(home.iterdir())


def test_a_system_prompt_too_long_for_a_hub_repo_in_the_hub_cache(dirs, chat, tmp_path,
                                                                  monkeypatch):
    """A Hub repo whose files are in the Hub's cache is measured before anything is
    fetched, resolved or converted (offline here: without the check, the repo would be
    refused as unreachable)."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--someone--MobileMoE-tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in dirs["unconverted"].iterdir():
        if f.suffix == ".json":  # config and tokenizer; no weights needed
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    home = tmp_path / "home"
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(home))
    r = chat("--model", "someone/MobileMoE-tiny", "--system", LONG_SYSTEM, "--prompt", "Hello")
    _one_error_line(r, "the system prompt alone does not fit the 8192-token context")
    assert not home.exists() or not any(home.iterdir())


def test_a_system_prompt_too_long_is_measured_once_downloaded_before_converting(
        dirs, chat, tmp_path, monkeypatch):
    """Where the files were not on this machine before (a Hub repo downloaded just
    now), it is measured before the conversion starts."""
    from mobilemoe_mlx.chat import loader as chat_model

    monkeypatch.setattr(chat_model, "_files_on_this_machine", lambda source, revision: None)
    home = tmp_path / "home"
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(home))
    r = chat("--model", dirs["unconverted"], "--system", LONG_SYSTEM, "--prompt", "Hello")
    _one_error_line(r, "the system prompt alone does not fit the 8192-token context")
    assert "converting" not in r.stderr and not any(home.rglob("*.safetensors"))


def test_the_largest_seed_is_taken(dirs, chat):
    r = chat("--model", dirs["tiny"], "--seed", str(2**64 - 1), "--temp", "1",
             "--max-tokens", "2", "--prompt", "Hello")
    assert r.exit_code == 0, r.stderr


def test_library_callers_get_the_same_checks(loaded):
    for sampling, says in ((Sampling(temp=math.nan), "--temp must be a finite number"),
                           (Sampling(min_p=math.inf), "--min-p must be a finite number"),
                           (Sampling(top_p=1.5), "--top-p"),
                           (Sampling(repetition_penalty=0.0), "--repetition-penalty")):
        with pytest.raises(UserError, match=says):
            ChatSession(*loaded, sampling=sampling)
    with pytest.raises(UserError, match="--max-kv-size must be at least 8"):
        ChatSession(*loaded, max_kv_size=0)


NOT_UTF8 = b"Hello\n\xff\xfe bad\n/system caf\xe9\n\"\"\"two\n\xc3(\"\"\"\nHi\n"


def test_lines_that_are_not_utf8_are_skipped_with_a_note(dirs, chat):
    r = chat("--model", dirs["tiny"], "--max-tokens", "3", stdin=NOT_UTF8)
    assert r.exit_code == 0, r.stderr
    notes = [line for line in r.stderr.splitlines() if "not valid UTF-8" in line]
    assert len(notes) == 3 and "internal error" not in r.stderr
    assert r.stderr.count("3 tokens, prompt") == 2  # the session went on after them


def test_a_line_that_is_not_utf8_keeps_one_stdout_line_per_message(loaded):
    session, _, _ = _session(loaded, sampling=Sampling(max_tokens=3))
    _always(session, "a")
    stdin = io.TextIOWrapper(io.BytesIO(NOT_UTF8), encoding="utf-8", errors="surrogateescape")
    out, err = io.StringIO(), io.StringIO()
    Terminal(session, stdin, out, err).run()
    # An empty line for each message skipped (the two below), none for /system.
    assert out.getvalue() == "aaa\n\n\naaa\n"
    assert err.getvalue().count("not valid UTF-8") == 3 and session.system is None


def test_a_strict_stream_that_cannot_decode_a_line_is_skipped_too(loaded):
    session, _, _ = _session(loaded, sampling=Sampling(max_tokens=2))
    stdin = io.TextIOWrapper(io.BytesIO(b"\xff\n"), encoding="utf-8", errors="strict")
    out, err = io.StringIO(), io.StringIO()
    Terminal(session, stdin, out, err).run()
    assert "not valid UTF-8" in err.getvalue() and out.getvalue() == "\n"


def test_every_option_has_help_and_h_works(chat):
    r = chat("-h")
    assert r.exit_code == 0 and "--max-kv-size" in r.stdout
    for option in CHAT.params:
        assert option.help and "\n" not in option.help.strip(), option.name


def test_draft_reports_acceptance(dirs, chat):
    r = chat("--model", dirs["tiny"], "--draft", dirs["tiny"], "--num-draft-tokens", "3",
             "--max-tokens", "17", "--prompt", "Hello")
    assert r.exit_code == 0, r.stderr
    # 4 rounds of 3 drafts and one token of the model's own, then 1 draft for the 17th
    # (the tiny model does not stop on its own within 17 tokens).
    assert "17 tokens" in r.stderr and "draft accepted 13/13 (100%)" in r.stderr


def test_kv_bits_8_runs(dirs, chat):
    r = chat("--model", dirs["kv"], "--kv-bits", "8", "--max-tokens", "10",
             stdin=f"Hello\n{FRANCE}\n/stats\n")
    assert r.exit_code == 0, r.stderr
    assert len([line for line in r.stderr.splitlines() if "tok/s" in line]) == 3
    assert "8-bit" in r.stderr


# -- the command line in a real process: piped stdin, signals, a pseudo-terminal ----

def _run(dirs, *args, stdin="", timeout=HANG):
    env = dict(os.environ, MOBILEMOE_MLX_HOME=str(dirs["home"]), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _expected_stdout(loaded, messages, max_tokens: int) -> str:
    """What chat.py must print for `messages`: each greedy answer of the same model,
    computed here, ending with a newline."""
    session = ChatSession(*loaded, sampling=Sampling(max_tokens=max_tokens))
    texts = [session.ask(m).text for m in messages]
    return "".join(t if t.endswith("\n") else t + "\n" for t in texts)


@pytest.mark.e2e
def test_piped_two_turn_conversation(dirs, loaded):
    r = _run(dirs, "--model", str(dirs["tiny"]), "--max-tokens", "12",
             stdin=f"Hello\n{FRANCE}\n/stats\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == _expected_stdout(loaded, ["Hello", FRANCE], 12)  # answers only
    stats = [line for line in r.stderr.splitlines() if "tok/s" in line]
    assert len(stats) == 3  # two answers + /stats
    assert "distinct routed experts per layer" in r.stderr
    assert "\x1b[" not in r.stderr  # no colour codes into a pipe


@pytest.mark.e2e
def test_ctrl_c_stops_the_answer_and_keeps_the_session(dirs):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, MOBILEMOE_MLX_HOME=str(dirs["home"]), HF_HUB_OFFLINE="1",
               TERM="dumb")
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(dirs["tiny"]),
                                           "--max-tokens", "8000"],
                          env=env, cwd=str(ROOT), encoding="utf-8", timeout=HANG)
    # The random tiny model talks until --max-tokens unless greedy decoding runs
    # into one of its end-of-sequence ids, which depends on the conversation so
    # far (and so on when the last Ctrl-C came): an answer that ends by itself
    # before the Ctrl-C is not a failure of Ctrl-C, and the next message is tried.
    stopped, tried = 0, 0
    try:
        child.expect_exact(">>> ")
        for message in ("Hello", FRANCE, "Tell me more.", "And then?", "Why?", "Go on."):
            tried += 1
            child.sendline(message)
            child.expect_exact(message)  # the terminal's echo of the line, then its end
            child.expect("\n")
            # The answer's first visible character: its Ctrl-C handler is in place and
            # tokens are coming, however long the machine took to get there.
            child.expect(r"\S")
            child.sendintr()
            i = child.expect([r"(\d+) tokens, prompt \d+ tok.*stopped", "Ctrl-C again"])
            if i == 0:
                assert 0 < int(child.match.group(1)) < 8000
                stopped += 1
            child.expect_exact(">>> ")
            if stopped == 2:
                break
        assert stopped == 2, f"only {stopped} of {tried} answers were still running at Ctrl-C"
        child.sendline("/stats")
        child.expect("exchange")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


@pytest.mark.e2e
def test_typed_input_with_stdout_redirected_keeps_stdout_to_answers(dirs, loaded, tmp_path):
    """Prompts, and the newlines after Ctrl-C or Ctrl-D at them, go to the terminal;
    Ctrl-C at the "... " of a multi-line message drops the message."""
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, MOBILEMOE_MLX_HOME=str(dirs["home"]), HF_HUB_OFFLINE="1",
               TERM="dumb")
    answers = tmp_path / "answers.txt"
    command = (f"exec {sys.executable} {ROOT / 'chat.py'} --model {dirs['tiny']} "
               f"--max-tokens 3 > {answers}")
    child = pexpect.spawn("bash", ["-c", command], env=env, cwd=str(ROOT), encoding="utf-8",
                          timeout=HANG)
    try:
        child.expect_exact(">>> ")
        child.sendline("Hello")
        child.expect_exact("3 tokens")
        child.expect_exact(">>> ")
        child.sendline('"""Two')
        child.expect_exact("... ")
        child.sendline('lines"""')
        child.expect_exact("3 tokens")
        child.expect_exact(">>> ")
        child.sendline('"""Dropped')
        child.expect_exact("... ")
        child.sendintr()  # drops the message being typed, not the session
        child.expect_exact("(message dropped)")
        child.expect_exact(">>> ")
        child.sendintr()
        child.expect_exact("Ctrl-C again")
        child.expect_exact(">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    text = answers.read_text(encoding="utf-8")
    assert text == _expected_stdout(loaded, ["Hello", "Two\nlines"], 3), repr(text)


@pytest.mark.e2e
def test_typed_bytes_that_are_not_utf8_get_a_note_and_the_session_goes_on(dirs):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, MOBILEMOE_MLX_HOME=str(dirs["home"]), HF_HUB_OFFLINE="1",
               TERM="dumb")
    child = pexpect.spawn(sys.executable, [str(ROOT / "chat.py"), "--model", str(dirs["tiny"]),
                                           "--max-tokens", "3"], env=env, cwd=str(ROOT),
                          timeout=HANG)
    try:
        child.expect_exact(b">>> ")
        child.send(b"caf\xe9 \xff\r")  # Latin-1 bytes typed into a UTF-8 session
        assert child.expect([b"not valid UTF-8", b"internal error", pexpect.EOF]) == 0
        child.expect_exact(b">>> ")
        child.sendline(b"Hello")
        child.expect_exact(b"3 tokens")
        child.expect_exact(b">>> ")
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
