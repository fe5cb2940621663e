"""mlx-lm's OpenAI-compatible server runs a converted directory (loopback only)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

from mobilemoe_mlx import convert
from mobilemoe_mlx.synthetic import write_synthetic


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_answers_a_chat_completion(tmp_path):
    src = write_synthetic(str(tmp_path / "ckpt"), "tiny", "qat")
    model = convert(str(src), str(tmp_path / "mlx"), dtype="float32", progress=False)
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
        assert answer["usage"]["completion_tokens"] == 4
        assert answer["choices"][0]["message"]["role"] == "assistant"
    finally:
        server.terminate()
        server.wait(timeout=30)
