"""The files of a checkpoint must agree (issue 19): no id the tokenizer can
produce, and none a config names, may lie past config.json's vocab_size, and
every special token a file names must be a token of tokenizer.json. Each case
changes one field of one file of a tiny checkpoint (tests/checkpoints.py: all
six files, as released) and of its converted directory: the conversion must
end in one `error:` line naming the file and the id or token, with nothing
written, and load() of the converted directory must refuse the same way,
before the model is built. Spellings a real checkpoint may use must pass.

Before this check a tokenizer from another model made `python chat.py` die
with a segmentation fault (exit 139, no message): MLX reads past the
embedding table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert_cli import assert_clean_failure, run_convert

from mobilemoe_mlx import load
from mobilemoe_mlx.checkpoints.consistency import read_tokenizer_ids
from mobilemoe_mlx.checkpoints.convert import check_conversion
from mobilemoe_mlx.checkpoints.loading import check_converted
from mobilemoe_mlx.errors import UserError

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # the tiny preset's vocab_size; its tokenizer has a token for each id
DELETE = object()  # a mutation's result: remove the file


def _plain(t: dict) -> str:
    """A token of the vocabulary that is no special token."""
    return next(k for k in t["model"]["vocab"] if not k.startswith("<|"))


def _vocab_id(value):
    def mutate(t):
        t["model"]["vocab"][_plain(t)] = value
        return t
    return mutate


def _added(index: int, **changes):
    def mutate(t):
        t["added_tokens"][index].update(changes)
        return t
    return mutate


def _another_models_tokenizer(t):
    """The case that found it: every id moved up as in a 128k-token tokenizer."""
    t["model"]["vocab"] = {k: v + 128000 for k, v in t["model"]["vocab"].items()}
    for token in t["added_tokens"]:
        token["id"] += 128000
    return t


def _set(**changes):
    def mutate(data):
        data.update(changes)
        return data
    return mutate


def _post_processor(processor):
    return _set(post_processor={"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
         "use_regex": True}, processor]})


def _template(text: str):
    return lambda _: text


TOKENIZER, TOKENIZER_CONFIG = "tokenizer.json", "tokenizer_config.json"
GENERATION, SPECIAL_MAP, CONFIG = "generation_config.json", "special_tokens_map.json", "config.json"

# case: (file, mutation, what the one line must name). Every file kind and field:
# ids past vocab_size, at it, negative, strings, true, floats, nested lists; token
# names that tokenizer.json lacks; values of the wrong kind.
REFUSED = {
    "tokenizer of another model": (TOKENIZER, _another_models_tokenizer,
                                   ["tokenizer.json's vocabulary holds token id(s) 128000 ",
                                    # every one of its ids, the 3 shown and the rest counted
                                    f"and {VOCAB - 3} more, up to {128000 + VOCAB - 1}",
                                    "vocab_size of 512"]),
    "vocabulary id past vocab_size": (TOKENIZER, _vocab_id(5_000_000),
                                      ["tokenizer.json's vocabulary", "5000000"]),
    "vocabulary id == vocab_size": (TOKENIZER, _vocab_id(VOCAB), ["tokenizer.json", "512"]),
    "vocabulary id negative": (TOKENIZER, _vocab_id(-1), ["tokenizer.json", "-1"]),
    "vocabulary id a string": (TOKENIZER, _vocab_id("7"), ["tokenizer.json", '"7"']),
    "vocabulary id true": (TOKENIZER, _vocab_id(True), ["tokenizer.json", "true"]),
    "added token id past vocab_size": (TOKENIZER, _added(2, id=600),
                                       ["tokenizer.json's added_tokens", "600", "<|eot|>"]),
    "added token id null": (TOKENIZER, _added(2, id=None), ["tokenizer.json", "added_tokens[2]"]),
    "added token id a string": (TOKENIZER, _added(2, id="2"),
                                ["tokenizer.json", "added_tokens[2]"]),
    "added token content not a string": (TOKENIZER, _added(3, content=3),
                                         ["tokenizer.json", "added_tokens[3]"]),
    "post-processor template id past vocab_size": (
        TOKENIZER, _post_processor({"type": "TemplateProcessing", "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [128000],
                                  "tokens": ["<|begin_of_text|>"]}}}),
        ["tokenizer.json", "post_processor", "128000"]),
    "post-processor sep id past vocab_size": (
        TOKENIZER, _set(post_processor={"type": "BertProcessing", "sep": ["<|eot|>", 9999],
                                        "cls": ["<|begin_of_text|>", 0]}),
        ["tokenizer.json", "post_processor.sep", "9999"]),
    "tokenizer.json not JSON": (TOKENIZER, lambda _: "{", ["tokenizer.json is not valid JSON"]),
    "config bos_token_id past vocab_size": (CONFIG, _set(bos_token_id=VOCAB),
                                            ["config.json: bos_token_id", "512"]),
    "config pad_token_id negative": (CONFIG, _set(pad_token_id=-1),
                                     ["config.json: pad_token_id", "-1"]),
    "config pad_token_id a string": (CONFIG, _set(pad_token_id="0"),
                                     ["config.json: pad_token_id", '"0"']),
    "config bos_token_id true": (CONFIG, _set(bos_token_id=True),
                                 ["config.json: bos_token_id", "true"]),
    "config bos_token_id a float": (CONFIG, _set(bos_token_id=0.0),
                                    ["config.json: bos_token_id", "0.0"]),
    "generation eos_token_id list past vocab_size": (
        GENERATION, _set(eos_token_id=[1, 600]), ["generation_config.json: eos_token_id", "600"]),
    "generation eos_token_id int past vocab_size": (
        GENERATION, _set(eos_token_id=128009), ["generation_config.json: eos_token_id", "128009"]),
    "generation eos_token_id negative": (GENERATION, _set(eos_token_id=-1),
                                         ["generation_config.json: eos_token_id", "-1"]),
    "generation eos_token_id a string": (GENERATION, _set(eos_token_id="2"),
                                         ["generation_config.json: eos_token_id", '"2"']),
    "generation eos_token_id [true]": (GENERATION, _set(eos_token_id=[True]),
                                       ["generation_config.json: eos_token_id", "true"]),
    "generation eos_token_id nested": (GENERATION, _set(eos_token_id=[[1]]),
                                       ["generation_config.json: eos_token_id", "[[1]]"]),
    "generation bos_token_id past vocab_size": (GENERATION, _set(bos_token_id=VOCAB),
                                                ["generation_config.json: bos_token_id", "512"]),
    "generation pad_token_id past vocab_size": (GENERATION, _set(pad_token_id=1000),
                                                ["generation_config.json: pad_token_id", "1000"]),
    "generation config not an object": (GENERATION, lambda _: "[1, 2]",
                                        ["generation_config.json is not a JSON object"]),
    "tokenizer config eos_token missing": (
        TOKENIZER_CONFIG, _set(eos_token="<|eom_id|>"),
        ["tokenizer_config.json: eos_token", "<|eom_id|>", "not a token of tokenizer.json"]),
    "tokenizer config bos_token object missing": (
        TOKENIZER_CONFIG, _set(bos_token={"content": "<s>", "special": True}),
        ["tokenizer_config.json: bos_token", '"<s>"']),
    "tokenizer config unk_token missing": (TOKENIZER_CONFIG, _set(unk_token="<unk>"),
                                           ["tokenizer_config.json: unk_token", "<unk>"]),
    "tokenizer config pad_token an id": (TOKENIZER_CONFIG, _set(pad_token=5),
                                         ["tokenizer_config.json: pad_token", "must be a token"]),
    "tokenizer config pad_token_id past vocab_size": (
        TOKENIZER_CONFIG, _set(pad_token_id=VOCAB), ["tokenizer_config.json: pad_token_id", "512"]),
    "tokenizer config additional special token missing": (
        TOKENIZER_CONFIG, _set(additional_special_tokens=["<|eot|>", "<|python_tag|>"]),
        ["tokenizer_config.json: additional_special_tokens", "<|python_tag|>"]),
    "tokenizer config added_tokens_decoder id past vocab_size": (
        TOKENIZER_CONFIG, _set(added_tokens_decoder={"128009": {"content": "<|eot|>"}}),
        ["tokenizer_config.json's added_tokens_decoder", "128009"]),
    "tokenizer config added_tokens_decoder token missing": (
        TOKENIZER_CONFIG, _set(added_tokens_decoder={"5": {"content": "<|eom_id|>"}}),
        ["tokenizer_config.json: added_tokens_decoder[5]", "<|eom_id|>"]),
    "chat template token missing": (
        TOKENIZER_CONFIG, _set(chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                             "<|eot|>{% endfor %}"),
        ["tokenizer_config.json's chat_template", "<|im_start|>"]),
    "named chat template token missing": (
        TOKENIZER_CONFIG, _set(chat_template=[{"name": "tool_use", "template": "<|python_tag|>"}]),
        ["tokenizer_config.json's chat_template \"tool_use\"", "<|python_tag|>"]),
    "chat template not a string": (TOKENIZER_CONFIG, _set(chat_template=7),
                                   ["tokenizer_config.json's chat_template", "got 7"]),
    "tokenizer config not JSON": (TOKENIZER_CONFIG, lambda _: "not json",
                                  ["tokenizer_config.json is not valid JSON"]),
    "special tokens map eos_token missing": (
        SPECIAL_MAP, _set(eos_token={"content": "<|eom_id|>"}),
        ["special_tokens_map.json: eos_token", "<|eom_id|>"]),
    "special tokens map bos_token string missing": (
        SPECIAL_MAP, _set(bos_token="<s>"), ["special_tokens_map.json: bos_token", "<s>"]),
    "special tokens map pad_token a list": (
        SPECIAL_MAP, _set(pad_token=["<|eot|>"]),
        ["special_tokens_map.json: pad_token", "must be a token"]),
    "special tokens map additional token missing": (
        SPECIAL_MAP, _set(additional_special_tokens=[{"content": "<|eom_id|>"}]),
        ["special_tokens_map.json: additional_special_tokens", "<|eom_id|>"]),
    "chat_template.jinja token missing": (
        "chat_template.jinja", _template("{{ bos_token }}<|im_start|>user"),
        ["chat_template.jinja", "<|im_start|>"]),
    "chat_template.json token missing": (
        "chat_template.json", lambda _: json.dumps({"chat_template": "<|im_end|>"}),
        ["chat_template.json's chat_template", "<|im_end|>"]),
}

# Spellings a real checkpoint may use: refusing them would be a bug.
ACCEPTED = {
    "a token at the last id (vocab_size - 1)": (
        TOKENIZER, lambda t: {**t, "added_tokens": t["added_tokens"] + [
            {"id": VOCAB - 1, "content": "<|reserved_special_token_0|>", "special": True}]}),
    "a post-processor inserting the bos id": (
        TOKENIZER, _post_processor({"type": "TemplateProcessing", "special_tokens": {
            "<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [0],
                                  "tokens": ["<|begin_of_text|>"]}}})),
    "config pad_token_id null": (CONFIG, _set(pad_token_id=None)),
    "config pad_token_id in range": (CONFIG, _set(pad_token_id=1)),
    "generation eos_token_id one int": (GENERATION, _set(eos_token_id=2)),
    "generation eos_token_id empty": (GENERATION, _set(eos_token_id=[])),
    "generation pad_token_id null": (GENERATION, _set(pad_token_id=None)),
    "no generation_config.json": (GENERATION, lambda _: DELETE),
    "no special_tokens_map.json": (SPECIAL_MAP, lambda _: DELETE),
    "no tokenizer_config.json": (TOKENIZER_CONFIG, lambda _: DELETE),
    "tokenizer config pad_token null": (TOKENIZER_CONFIG, _set(pad_token=None)),
    "tokenizer config tokens as objects": (
        TOKENIZER_CONFIG, _set(eos_token={"__type": "AddedToken", "content": "<|eot|>"},
                               additional_special_tokens=[{"content": "<|header_start|>"}])),
    "tokenizer config extra_special_tokens object": (
        TOKENIZER_CONFIG, _set(extra_special_tokens={"header": "<|header_start|>"})),
    "tokenizer config added_tokens_decoder as released": (
        TOKENIZER_CONFIG, _set(added_tokens_decoder={"2": {"content": "<|eot|>",
                                                           "special": True}})),
    "named chat templates of known tokens": (
        TOKENIZER_CONFIG, _set(chat_template=[{"name": "default",
                                               "template": "<|header_start|><|eot|>"}])),
    "a template writing <| as text": (TOKENIZER_CONFIG, _set(chat_template="a <| b |> c")),
    "special tokens map as strings": (SPECIAL_MAP, _set(bos_token="<|begin_of_text|>",
                                                        eos_token="<|eot|>", pad_token=None)),
    "chat_template.jinja of known tokens": (
        "chat_template.jinja", _template("<|header_start|>{{ m }}<|header_end|>")),
}


def _mutated(src: Path, dst: Path, name: str, mutate) -> Path:
    """The directory `src` at `dst` with the file `name` changed by `mutate`
    (parsed JSON in; JSON, raw text or DELETE out). The other files are links
    to `src`'s, which is read-only here: copying them made these tests slow."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != name:
            (dst / f.name).symlink_to(f)
    original = src / name
    if name.endswith(".json") and original.exists():
        data = mutate(json.loads(original.read_text()))
    else:
        data = mutate(original.read_text() if original.exists() else None)
    if data is not DELETE:
        (dst / name).write_text(data if isinstance(data, str) else json.dumps(data))
    return dst


def test_the_test_checkpoints_carry_every_file_kind(qat_ckpt, qat_int4):
    for folder in (qat_ckpt.path, qat_int4.path):
        for name in (TOKENIZER, TOKENIZER_CONFIG, GENERATION, SPECIAL_MAP, CONFIG):
            assert (folder / name).is_file(), (folder, name)


@pytest.mark.parametrize("case", list(REFUSED))
def test_conversion_refuses_files_that_disagree(qat_ckpt, tmp_path, case):
    name, mutate, fragments = REFUSED[case]
    src = _mutated(qat_ckpt.path, tmp_path / "src", name, mutate)
    out = tmp_path / "out"
    result = run_convert(src, "--out", out, "--dtype", "float32")
    assert_clean_failure(result, out, *fragments)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("case", list(REFUSED))
def test_loading_refuses_a_converted_directory_whose_files_disagree(qat_int4, tmp_path, case):
    name, mutate, fragments = REFUSED[case]
    path = _mutated(qat_int4.path, tmp_path / "mlx", name, mutate)
    with pytest.raises(UserError) as refused:
        load(str(path), progress=False)
    message = str(refused.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_consistent_spellings_pass(qat_ckpt, qat_int4, tmp_path, case):
    name, mutate = ACCEPTED[case]
    src = _mutated(qat_ckpt.path, tmp_path / "src", name, mutate)
    check_conversion(str(src), str(tmp_path / "out"))  # every check, nothing written
    assert not (tmp_path / "out").exists()
    check_converted(_mutated(qat_int4.path, tmp_path / "mlx", name, mutate))


@pytest.mark.parametrize("vocab_size", [1024, 256])
def test_loading_refuses_an_embedding_with_other_than_vocab_size_rows(qat_int4, tmp_path,
                                                                      vocab_size):
    """A converted config.json whose vocab_size was edited: more ids than the
    embedding has rows would read past it."""
    path = _mutated(qat_int4.path, tmp_path / "mlx", CONFIG, _set(vocab_size=vocab_size))
    with pytest.raises(UserError, match=rf"model\.safetensors: model\.embed_tokens\.\w+ has "
                                        rf"512 rows but config\.json's vocab_size is {vocab_size}"):
        check_converted(path)


def test_loading_an_inconsistent_checkpoint_converts_nothing(qat_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILEMOE_MLX_HOME", str(tmp_path / "home"))
    src = _mutated(qat_ckpt.path, tmp_path / "src", GENERATION, _set(eos_token_id=[1, 9999]))
    with pytest.raises(UserError, match="generation_config.json: eos_token_id"):
        load(str(src), progress=False)
    assert not list((tmp_path / "home").rglob("*.safetensors"))


def test_chat_on_a_foreign_tokenizer_is_one_line_and_exit_2_not_a_crash(qat_int4, tmp_path):
    """`python chat.py --model DIR` with another model's tokenizer: before
    issue 19 a segmentation fault (exit 139) as the prompt was embedded."""
    path = _mutated(qat_int4.path, tmp_path / "mlx", TOKENIZER, _another_models_tokenizer)
    result = subprocess.run(
        [sys.executable, str(REPO / "chat.py"), "--model", str(path), "--prompt", "Hello",
         "--max-tokens", "2"], capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "MOBILEMOE_MLX_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: tokenizer.json"), result.stderr
    assert "128000" in lines[0] and result.stdout == ""


def test_a_128k_token_vocabulary_is_read_whole(tmp_path):
    """Llama-3's size, checked on every load (one JSON parse plus vectorised
    passes; its time is not asserted here: tests check results, and hold on a
    busy machine)."""
    vocab = {f"t{i}": i for i in range(128_000)}
    added = [{"id": 128_000 + i, "content": f"<|reserved_special_token_{i}|>"}
             for i in range(256)]
    (tmp_path / TOKENIZER).write_text(json.dumps(
        {"added_tokens": added, "model": {"type": "BPE", "vocab": vocab, "merges": []}}))
    ids = read_tokenizer_ids(tmp_path / TOKENIZER, 128_256)
    assert ids.has("<|reserved_special_token_7|>") and ids.has("t5") and not ids.has("t-1")
