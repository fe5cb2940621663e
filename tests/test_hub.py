"""Hub failures become one clear sentence.

A small HTTP server on loopback stands in for the Hub (HF_ENDPOINT), answering
the way huggingface.co answers a gated or unknown repo, so the real
huggingface_hub client code and our error handling run end to end.
"""

import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# huggingface_hub reads HF_ENDPOINT at import: each case needs a process of its own.
pytestmark = pytest.mark.e2e

ANSWERS = {
    "gated": (403, "GatedRepo", "Access to model facebook/MobileMoE-S-QAT is restricted."),
    "unknown": (401, "RepoNotFound", "Repository Not Found for url."),
}


@pytest.fixture(scope="module")
def fake_hub():
    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            mode = self.server.mode
            status, code, message = ANSWERS[mode]
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def convert_from(hub, mode, tmp_path):
    hub.mode = mode
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    env.pop("HF_TOKEN", None)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "facebook/MobileMoE-S-QAT", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    return result.stderr.strip().splitlines()[-1]


def test_gated_repo_says_accept_the_license_and_log_in(fake_hub, tmp_path):
    line = convert_from(fake_hub, "gated", tmp_path)
    assert "is gated" in line
    assert "https://huggingface.co/facebook/MobileMoE-S-QAT" in line
    assert "hf auth login" in line


def test_unknown_or_unauthenticated_repo(fake_hub, tmp_path):
    line = convert_from(fake_hub, "unknown", tmp_path)
    assert "not found, or you are not logged in" in line
    assert "hf auth login" in line
