"""Where users put the model (issue 30): loaded on one thread and run on
others, run by many threads at once, and deep-copied at any time.

Since MLX 0.31.2 a lazy array belongs to the stream of the thread that built
it, and MLX traces each compiled function once per thread. So a model must
leave nothing lazy once loaded, and the compiled decode step must trace
without touching the tree other threads are reading (model/mobilemoe.py,
TreeSlots.shadow). Every answer here is compared with the same prompt
generated alone on the main thread, greedy, token for token.
"""

import concurrent.futures
import copy
import pickle
import sys
import threading
from contextlib import contextmanager

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from bench.steps import graph_primitives
from mobilemoe_mlx import load
from mobilemoe_mlx.model.mobilemoe import held_arrays

COMPILED_MARK = "DynamicSliceUpdate"  # as in test_compiled_decode.py
KERNELS = ("composed", "fast")  # the CPU's branch of the compiled step, and the GPUs'
# A prompt that ends just short of mlx-lm's 256-position KV buffer, and an
# answer that runs past it: the cache grows and every thread traces again.
PROMPT, ANSWER = 244, 24


def prompts(vocab: int, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, PROMPT - (i % 4)).tolist() for i in range(n)]


def generate(model, prompt, tokens: int = ANSWER):
    """Greedy token ids, as mlx-lm's generate_step makes them."""
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=tokens)]


def on_fresh_thread(fn, *args):
    """fn(*args) on a thread of its own; its exception is raised here."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result()


@contextmanager
def switching_often():
    """Threads switch every 10 us instead of 5 ms, so their steps interleave
    (as they do when a service's threads wait on the device) and a race
    shows in a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


LOADERS = {
    "mobilemoe_mlx.load": lambda path: load(str(path), progress=False),
    "mlx_lm.load": lambda path: mlx_lm.load(str(path), trust_remote_code=True),
}


@pytest.mark.parametrize("loader", LOADERS)
def test_loaded_on_one_thread_generates_on_others(synthetic_tiny, loader):
    model, _ = LOADERS[loader](synthetic_tiny)
    prompt = prompts(model.args.vocab_size, 1)[0]
    # Other threads first: the main thread has evaluated nothing of the model yet.
    first = [on_fresh_thread(generate, model, prompt) for _ in range(3)]
    main = generate(model, prompt)
    # and again, now that the main thread has built the compiled step
    again = [on_fresh_thread(generate, model, prompt) for _ in range(3)]
    assert first == [main] * 3
    assert again == [main] * 3


def _chat_model(path):
    from mobilemoe_mlx.chat.loader import load_chat_model

    return load_chat_model(str(path), progress=False)[0]


def _bench_model(name):
    from bench.models import build_synthetic, load_checkpoint

    return lambda path: (load_checkpoint(str(path)) if name == "checkpoint"
                         else build_synthetic(name)).model


# Every way this project and mlx-lm hand out a model, and the bench's peers.
EVERY_LOADER = {
    "mobilemoe_mlx.load": lambda path: LOADERS["mobilemoe_mlx.load"](path)[0],
    "mlx_lm.load": lambda path: LOADERS["mlx_lm.load"](path)[0],
    "chat": _chat_model,
    **{f"bench {name}": _bench_model(name)
       for name in ("checkpoint", "tiny", "pro-tiny", "glm4-tiny")},
}


@pytest.mark.parametrize("loader", EVERY_LOADER)
def test_every_array_a_loaded_model_holds_evaluates_on_another_thread(synthetic_tiny, loader):
    """Parameters, the rope's frequencies, everything a module keeps (a lazy
    array built on this thread fails to evaluate on another)."""
    model = EVERY_LOADER[loader](synthetic_tiny)
    held = [a for _, a in held_arrays(model)]
    assert len(held) > len(model.layers)

    def evaluate_each(arrays):
        for a in arrays:
            mx.eval(a)

    on_fresh_thread(evaluate_each, held)


def test_the_compiled_steps_own_arrays_evaluate_on_another_thread(synthetic_tiny):
    model, _ = load(str(synthetic_tiny), progress=False)
    assert any(path.endswith("._freqs") for path, _ in held_arrays(model))
    generate(model, prompts(model.args.vocab_size, 1)[0], tokens=3)  # builds the step
    step = model.__dict__["_decode_step"]
    made_later = [a for rows in step.constants._rows.values() for a in rows]
    made_later += [a for table in step.constants._tables.values() for a in (table.unit, table.swap)]
    assert made_later
    on_fresh_thread(mx.eval, made_later)


@pytest.mark.parametrize("kernels", KERNELS)
def test_threads_generating_at_once_answer_as_each_alone(synthetic_tiny, kernels):
    model, _ = load(str(synthetic_tiny), progress=False)
    model.decode_kernels = kernels
    jobs = prompts(model.args.vocab_size, 8)
    alone = [generate(model, p) for p in jobs]
    assert len({tuple(a) for a in alone}) > 1, "the prompts must give different answers"
    for round_ in range(3):
        fresh, _ = load(str(synthetic_tiny), progress=False)  # nothing traced yet
        fresh.decode_kernels = kernels
        with switching_often(), concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(generate, [fresh] * len(jobs), jobs))
        assert answers == alone, f"round {round_}"


def test_a_change_made_while_other_threads_hold_traces_is_decoded(synthetic_tiny):
    """A worker thread traces the step, the model changes on the main thread,
    and the worker's next answer is the changed model's (the plain path's)."""
    model, _ = load(str(synthetic_tiny), progress=False)
    prompt = prompts(model.args.vocab_size, 1)[0]
    with concurrent.futures.ThreadPoolExecutor(1) as worker:
        before = worker.submit(generate, model, prompt).result()
        for layer in model.layers:  # a change of structure: another step is built
            layer.feed_forward.update_modules({"router": copy.deepcopy(layer.feed_forward.router)})
            layer.feed_forward.expert_bias = -layer.feed_forward.expert_bias
        model.args.compiled_decode = False
        plain = generate(model, prompt)
        model.args.compiled_decode = True
        after = worker.submit(generate, model, prompt).result()
    assert plain != before
    assert after == plain


@pytest.mark.parametrize("kernels", KERNELS)
def test_the_compiled_step_builds_either_branch_here(synthetic_tiny, kernels):
    """The fast branch (GPUs') runs fast.rope in every layer; the composed one
    (the CPU's) rotates from one table a step: one Sin either way, or one a layer."""
    model, _ = load(str(synthetic_tiny), progress=False)
    model.decode_kernels = kernels
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[0, 5, 7, 9]]), cache=cache))
    step = model(mx.array([[3]]), cache=cache)
    primitives = graph_primitives(step)
    assert primitives[COMPILED_MARK] == len(model.layers) * 2
    assert primitives["Sin"] == (len(model.layers) if kernels == "fast" else 1)
    with pytest.raises(ValueError, match="decode_kernels"):
        model.decode_kernels = "metal"
        model(mx.array([[3]]), cache=cache)


def test_deep_copies_at_any_time_decode_like_the_original(synthetic_tiny):
    model, _ = load(str(synthetic_tiny), progress=False)
    prompt = prompts(model.args.vocab_size, 1)[0]
    copies = {"before decoding": copy.deepcopy(model)}
    want = generate(model, prompt)
    copies["after decoding"] = copy.deepcopy(model)
    copies["pickled after decoding"] = pickle.loads(pickle.dumps(model))
    # and while other threads decode with it (traces under way)
    stop = threading.Event()

    def keep_decoding():
        while not stop.is_set():
            fresh = copy.copy(model)  # a shallow copy traces a step of its own
            generate(fresh, prompt, tokens=4)

    with switching_often(), concurrent.futures.ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(keep_decoding) for _ in range(2)]
        try:
            copies["while threads decode"] = [copy.deepcopy(model) for _ in range(5)][-1]
        finally:
            stop.set()
        for f in busy:
            f.result()
    for when, c in copies.items():
        assert c is not model and c.layers[0] is not model.layers[0]
        assert generate(c, prompt) == want, when
