"""mlx-lm's OpenAI-compatible server runs a converted directory (loopback only).

End-to-end tier: a real server process (`python -m pytest -m e2e`)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_a_chat_completion(synthetic_tiny):
    model = synthetic_tiny
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(model),
         "--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.5)
        # the synthetic model never emits a stop token, so it answers exactly max_tokens
        assert answer["usage"]["completion_tokens"] == 4
        assert answer["choices"][0]["message"]["role"] == "assistant"
        assert answer["choices"][0]["finish_reason"] == "length"
    finally:
        server.terminate()
        server.wait(timeout=30)
