"""`bench`'s edges: --out that cannot hold a run, the question before a run of
hours, Ctrl-C inside a long MLX computation, help that matches what the
commands accept, and the plots' axes.

The real-process tests (a signal, a pseudo-terminal) are in the e2e tier.
"""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tmpfs import mounted_tmpfs

from bench import schema
from bench.cli import main as bench_cli
from bench.models import MODEL_NAMES, model_config
from bench.options import Settings
from bench.run import run_benchmark
from mobilemoe_mlx.model.runtime import current as current_runtime

ROOT = Path(__file__).resolve().parents[1]
ON_GPU = current_runtime().on_gpu  # the paper's settings take minutes on a GPU
# Settings that take hours on MLX's CPU backend (the paper's, see bench/options.py).
HOURS = dict(dtype="float32", bandwidth_gbps=100.0)


def _bench(*args):
    return CliRunner().invoke(bench_cli, [str(a) for a in args])


def _one_line_error(r, *says: str) -> None:
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert all(s in lines[0] for s in says), r.stderr


def _tree(path: Path) -> list:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# -- --out that cannot hold a run ------------------------------------------------

@pytest.fixture
def read_only_fs(tmp_path):
    """A read-only file system (a tmpfs mounted ro), where this machine lets us mount one."""
    with mounted_tmpfs(tmp_path / "ro", "ro") as mount:
        yield mount


@pytest.mark.parametrize("where", ["itself", "below"])
def test_run_out_on_a_read_only_file_system(read_only_fs, where):
    out = read_only_fs if where == "itself" else read_only_fs / "results"
    _one_line_error(_bench("run", "--quick", "--out", out), f"--out {out}",
                    "the file system is read-only (EROFS)")
    assert _tree(read_only_fs) == []


@pytest.mark.parametrize("out, says", [
    ("/proc/mobilemoe-bench-out", "cannot be created"),  # procfs: ENOENT
    ("/proc/self", "cannot be written to"),  # an existing directory no file can be created in
    ("/sys/mobilemoe-bench-out", "cannot be created"),  # sysfs: EPERM
])
def test_run_out_on_a_pseudo_file_system(out, says):
    if not Path(out).parent.is_dir() or sys.platform != "linux":
        pytest.skip("no such pseudo file system here")
    # Named as resolved (/proc/self is this process's /proc/PID), as every writer names it.
    _one_line_error(_bench("run", "--quick", "--out", out), f"--out {Path(out).resolve()}", says)
    assert not Path(out, "results.json").exists()


def test_run_out_whose_parent_is_a_file_or_that_is_empty_or_too_long(tmp_path):
    (tmp_path / "file").write_text("mine")
    _one_line_error(_bench("run", "--quick", "--out", tmp_path / "file" / "a" / "b"),
                    f"{tmp_path / 'file'} is a file")
    _one_line_error(_bench("run", "--quick", "--out", ""), "--out is empty")
    long = tmp_path / ("x" * 300) / "out"
    _one_line_error(_bench("run", "--quick", "--out", long), f"--out {long}",
                    "a name in it is longer than this file system takes")
    assert _tree(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_run_out_without_write_permission(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: no permission to refuse")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "new"):
            _one_line_error(_bench("run", "--quick", "--out", out), f"--out {out}",
                            "permission denied (EACCES)")
        assert _tree(locked) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.e2e
def test_run_out_without_write_permission_as_nobody():
    """As root (which writes anywhere), the same refusal for an unprivileged user."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run as nobody")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    if subprocess.run([*as_nobody, "-c", "import click, bench.cli"], cwd=ROOT,
                      capture_output=True, timeout=60).returncode != 0:
        # A checkout or virtual environment under a private directory (mktemp -d's
        # 700) is out of nobody's reach: there is nothing to run as nobody.
        pytest.skip("nobody cannot read this checkout or its Python environment")
    # Not under pytest's tmp_path (mode 700): nobody must reach the directory, and
    # be refused only the writing.
    base = Path(tempfile.mkdtemp(prefix="bench-locked-"))
    try:
        base.chmod(0o755)  # root's: nobody may enter it but not write in it
        outs = [str(base), str(base / "new")]
        script = ("import json, sys\n"
                  "from click.testing import CliRunner\n"
                  "from bench.cli import main\n"
                  "runs = [CliRunner().invoke(main, ['run', '--quick', '--out', o])\n"
                  "        for o in sys.argv[1:]]\n"
                  "print(json.dumps([[r.exit_code, r.stderr] for r in runs]))\n")
        r = subprocess.run([*as_nobody, "-c", script, *outs], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        for out, (code, stderr) in zip(outs, json.loads(r.stdout)):
            lines = stderr.strip().splitlines()
            assert code == 2 and len(lines) == 1, stderr
            assert lines[0].startswith(f"error: --out {out} cannot"), lines[0]
            assert "permission denied (EACCES)" in lines[0]
        assert _tree(base) == []
    finally:
        shutil.rmtree(base)


# -- the question before a run of hours ------------------------------------------

def test_a_run_of_hours_is_asked_about_and_no_writes_nothing(tmp_path):
    if ON_GPU:
        pytest.skip("the paper's settings take minutes on a GPU: nothing to ask")
    from bench.run import NotStarted

    asked, seen = [], []
    out = tmp_path / "new" / "out"
    with pytest.raises(NotStarted) as e:
        run_benchmark(["S", "pro"], Settings(**HOURS), out, progress=False, plots=False,
                      log=seen.append, confirm=lambda q: asked.append(q) or False)
    assert len(asked) == 1 and "hours" in asked[0]
    # How to shorten it, with the options' names and a shorter command's estimate.
    for option in ("--prompt-lengths", "--decode-contexts", "--repeats", "--gen-tokens"):
        assert option in str(e.value)
    assert re.search(r"--repeats 1 --gen-tokens 32 --routing-tokens 512: "
                     r"(\d+ minutes|under a minute|[\d.]+ hours)", str(e.value))
    assert _tree(tmp_path) == []  # --out was created to check it, then removed
    assert not any(m.startswith("MobileMoE-S") for m in seen)


def test_a_short_run_is_not_asked_about(tmp_path):
    asked = []
    s = Settings(prompt_lengths=[8], decode_contexts=[8], gen_tokens=1, repeats=1, warmup=0,
                 routing_tokens=0, **HOURS)
    run_benchmark(["tiny"], s, tmp_path, progress=False, plots=False, log=lambda m: None,
                  confirm=asked.append)
    assert asked == [] and json.loads((tmp_path / "results.json").read_text())["models"]


# -- help that matches the commands ----------------------------------------------

def test_the_group_help_names_all_its_commands_or_none():
    """A description that enumerates commands ("run, report, plan") names every one."""
    text = " ".join(bench_cli.help.split())
    names = "|".join(re.escape(n) for n in sorted(bench_cli.commands, key=len, reverse=True))
    for listing in re.findall(rf"(?:`?(?:{names})`?(?:, | and | or ))+`?(?:{names})`?", text):
        assert set(re.findall(names, listing)) == set(bench_cli.commands), listing


def _names_in(help_text: str) -> set:
    return set(re.findall(r"[A-Za-z0-9][\w-]*", help_text))


def _swift_names():
    from bench.export import swift_names

    return swift_names()


@pytest.mark.parametrize("command, option, accepted", [
    ("run", "models", lambda: MODEL_NAMES), ("plan", "model", lambda: MODEL_NAMES),
    ("export-synthetic", "name", _swift_names)])
def test_model_help_lists_exactly_the_models_the_command_accepts(command, option, accepted):
    """The preset names in the help are exactly those the command accepts: every
    one model_config() takes, for export-synthetic those the Swift side loads."""
    from bench.export import check_swift_loads

    help_text = {p.name: p for p in bench_cli.commands[command].params}[option].help
    assert set(MODEL_NAMES) & _names_in(help_text) == set(accepted()), f"bench {command} -h"
    for name in accepted():
        model_config(name)  # accepted
        if command == "export-synthetic":
            check_swift_loads(name)


def test_plan_accepts_every_model_its_help_lists():
    for name in MODEL_NAMES:
        r = _bench("plan", "--model", name, "--context", "16", "--json")
        assert r.exit_code == 0, (name, r.stderr)


def test_help_imports_no_heavy_module():
    """`bench -h` and every `bench COMMAND -h` import neither mlx-lm (which loads
    transformers and torch) nor matplotlib: help answers at once."""
    script = ("import sys\n"
              "from click.testing import CliRunner\n"
              "from bench.cli import main\n"
              "assert CliRunner().invoke(main, ['-h']).exit_code == 0\n"
              "for c in main.commands:\n"
              "    assert CliRunner().invoke(main, [c, '-h']).exit_code == 0, c\n"
              "heavy = ('mlx_lm', 'matplotlib', 'transformers', 'torch')\n"
              "print(sorted(m for m in heavy if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_export_protocol_defaults_are_bench_runs():
    """export-prompts writes the plan the Swift benchmark follows: its defaults are run's."""
    run = {p.name: p.default for p in bench_cli.commands["run"].params}
    for command in ("export-prompts", "export-synthetic"):
        params = {p.name: p.default for p in bench_cli.commands[command].params}
        for name in ("prefill_step", "prompts", "seed"):
            assert params[name] == run[name], (command, name)


# -- plots -----------------------------------------------------------------------

def _results(contexts, mb):
    entries = [{"context": c, "context_filled": c, "tokens_per_s": {"median": 1.0},
                "peak_memory_bytes": m * 1e6} for c, m in zip(contexts, mb)]
    return {"machine": {"chip": "test", "backend": "CPU"},
            "models": [{"label": "m", "decode": entries, "prefill": []}]}


def test_plot_axes_label_the_contexts_measured_and_start_at_zero():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.plots import SPECS, figure

    fig = figure(_results([16, 48, 1000], [0.300, 0.276, 0.290]), SPECS[2])
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["16", "48", "1,000"]
        assert list(ax.get_xticks()) == [16, 48, 1000]
        assert ax.get_ylim()[0] == 0  # 0.276 against 0.300 MB is drawn as close as it is
    finally:
        plt.close(fig)


# -- results.json: the harness's entries and their description --------------------

def test_every_key_the_harness_writes_is_described():
    doc = (ROOT / "docs" / "results-schema.md").read_text()
    lists = (schema.TOP_KEYS, schema.MODEL_KEYS, schema.MEMORY_ENTRY, schema.PREFILL_ENTRY,
             schema.DECODE_ENTRY, schema.DECODE_BOUND, schema.ROUTING_ENTRY,
             schema.ROUTING_PROMPT_ENTRY)
    for keys in lists:
        for key in keys:
            assert re.search(rf"`{key}(\[\])?`", doc), key  # a list is `name[]`
    # What every writer must include is part of what the harness writes.
    assert set(schema.PREFILL_KEYS) <= set(schema.PREFILL_ENTRY)
    assert set(schema.DECODE_KEYS) <= set(schema.DECODE_ENTRY)


def test_an_entry_has_exactly_the_schema_keys():
    keys = schema.MEMORY_ENTRY
    assert list(schema.entry(keys, rss_bytes=1, weights_bytes=2, active_after_load_bytes=3)) == \
        list(keys)
    with pytest.raises(ValueError, match="missing \\['rss_bytes'\\]"):
        schema.entry(keys, weights_bytes=2, active_after_load_bytes=3)
    with pytest.raises(ValueError, match="not in the schema \\['extra'\\]"):
        schema.entry(keys, rss_bytes=1, weights_bytes=2, active_after_load_bytes=3, extra=4)


# -- real processes: Ctrl-C inside MLX, the question at a terminal ------------------

def _bench_process(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "bench", "run", "--no-progress", *args],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _wait_for(process, prefix: str, timeout: float = 300) -> list:
    """stderr lines up to the first that starts with `prefix`."""
    lines, t0 = [], time.monotonic()
    for line in process.stderr:
        lines.append(line)
        if line.startswith(prefix):
            return lines
        assert time.monotonic() - t0 < timeout, lines
    raise AssertionError(f"the run ended before {prefix!r}: {lines}")


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the running process `pid` has used."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # Linux: utime, stime in clock ticks
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:  # no /proc (macOS): ps's [[DD-]HH:]MM:SS.ss
        text = subprocess.run(["ps", "-o", "time=", "-p", str(pid)], capture_output=True,
                              text=True, timeout=60).stdout.strip()
        days, _, clock = text.rpartition("-")
        seconds = 0.0
        for part in clock.split(":"):
            seconds = 60 * seconds + float(part)
        return seconds + 86400 * int(days or 0)


# A stop within a second (bench/interrupt.py) is judged by the work the process does
# after the Ctrl-C, not by the wall clock: on a busy machine a process waits for a core
# for as long as the machine is busy, which says nothing about the process, while the
# work it does in that second depends on it alone. What it may do after the signal:
# a second of computing at the pace it computed before (its MLX threads go on while
# the watcher waits its grace and writes) and the saving and exiting itself
# (results.json, report.md, the interpreter's exit: 0.2-1.0 CPU-seconds measured on
# a 2-core machine, idle and with both cores busy). A run that waited for the
# computation in progress would do all of that computation's remaining work instead.
STOP_S = 1.0
FINISHING_CPU_S = 1.5


def _interrupt(process, after_cpu: float):
    """Ctrl-C once the process has done `after_cpu` more CPU-seconds of work (a sleep
    of wall time may pass before a busy machine runs it at all). Returns (the rest
    of stderr, CPU-seconds it used from the signal to its exit, the most it may use
    for a stop within STOP_S, wall seconds it took)."""
    start, t0 = _cpu_seconds(process.pid), time.monotonic()
    while (used := _cpu_seconds(process.pid) - start) < after_cpu:
        assert process.poll() is None, "the run ended before the Ctrl-C"
        assert time.monotonic() - t0 < 600, f"{used:.1f} CPU-seconds in 10 minutes"
        time.sleep(0.02)
    pace = used / (time.monotonic() - t0)  # CPU-seconds per second: its threads, its share
    at_signal = _cpu_seconds(process.pid)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # those reaped so far
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    rest = process.communicate(timeout=300)[1]  # a hang fails here, whatever the load
    wall = time.monotonic() - sent
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = (reaped.ru_utime + reaped.ru_stime) - (children.ru_utime + children.ru_stime)
    return rest, total - at_signal, pace * STOP_S + FINISHING_CPU_S, wall


@pytest.mark.e2e
def test_ctrl_c_inside_a_long_prefill_stops_at_once(tmp_path):
    """One prefill chunk of 8191 tokens (one mx.eval, about 9 CPU-seconds here): before,
    Ctrl-C waited for it to end. Judged by the work done after the signal (STOP_S),
    which a run that waited for the chunk would exceed several times over."""
    if ON_GPU:
        pytest.skip("a GPU finishes the 8k-token prefill before the Ctrl-C")
    out = tmp_path / "out"
    p = _bench_process("--models", "tiny", "--prompt-lengths", "8192", "--prefill-step", "8192",
                       "--decode-contexts", "16", "--gen-tokens", "1", "--repeats", "1",
                       "--warmup", "0", "--routing-tokens", "0", "--bandwidth", "100",
                       "--no-plots", "--out", out)
    try:
        _wait_for(p, "MobileMoE-tiny:")
        # Inside the chunk's mx.eval by then: what comes before it is milliseconds of work.
        rest, used, most, wall = _interrupt(p, after_cpu=1.5)
    finally:
        p.kill()
    assert p.returncode == 130, rest
    assert used < most, f"{used:.2f} CPU-seconds after the Ctrl-C ({wall:.1f} s), not < {most:.2f}"
    assert "interrupted: keeping the results measured so far" in rest
    results = json.loads((out / "results.json").read_text())
    assert results["interrupted"] and results["models"][0]["prefill"] == []
    report = (out / "report.md").read_text()
    assert "interrupted" in report and "(No prefill" in report
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]


@pytest.mark.e2e
def test_without_a_terminal_a_run_of_hours_starts_and_ctrl_c_stops_it(tmp_path):
    """A script is not asked: it gets the estimate and the run starts (Ctrl-C while
    MobileMoE-S's synthetic weights are built, seconds of MLX work per layer)."""
    if ON_GPU:
        pytest.skip("the paper's settings take minutes on a GPU")
    out = tmp_path / "out"
    p = _bench_process("--full", "--out", out, "--bandwidth", "100", "--dtype", "float32")
    try:
        lines = _wait_for(p, "warning: these settings will take hours")
        rest, used, most, wall = _interrupt(p, after_cpu=2.0)
    finally:
        p.kill()
    assert any(line.startswith("estimated time: about") for line in lines)
    assert "Start anyway" not in "".join(lines) + rest
    assert p.returncode == 130 and used < most, (used, most, wall, rest)
    assert json.loads((out / "results.json").read_text())["interrupted"]


@pytest.mark.e2e
@pytest.mark.parametrize("answer", ["", "n"])
def test_at_a_terminal_a_run_of_hours_is_asked_about_first(tmp_path, answer):
    if ON_GPU:
        pytest.skip("the paper's settings take minutes on a GPU")
    pexpect = pytest.importorskip("pexpect")
    out = tmp_path / "out"
    child = pexpect.spawn(sys.executable, ["-m", "bench", "run", "--full", "--out", str(out),
                                           "--bandwidth", "100", "--dtype", "float32"],
                          cwd=str(ROOT), env=dict(os.environ, TERM="dumb"), encoding="utf-8",
                          timeout=120)
    try:
        child.expect_exact("Start anyway (about ")
        child.expect_exact("[y/N]: ")
        child.sendline(answer)  # Enter alone: the default, no
        child.expect_exact("not started: nothing was measured or written")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 1
    assert not out.exists()
