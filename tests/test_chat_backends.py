"""Chat turns against a backend that is not our echo: chunked answers, closed
connections, a base path, and headers passed on (a stdlib HTTP server in a thread)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
import pytest
import requests
from conftest import ServerProc, start_server

from rollout_sessions.echo import EOT, body_tokens, prompt_tokens

SEEN: list[dict] = []


class Backend(BaseHTTPRequestHandler):
    """SGLang-like answers under /api; alternates chunked and Connection: close."""

    protocol_version = "HTTP/1.1"
    calls = 0

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        SEEN.append(
            {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": orjson.loads(body),
            }
        )
        if self.path != "/api/v1/chat/completions":
            self.send_error(404)
            return
        req = orjson.loads(body)
        message = {"role": "assistant", "content": f"turn {len(req['messages'])}"}
        completion = [*body_tokens(message), EOT]
        answer = orjson.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 1,
                "model": "stdlib",
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "stop",
                        "prompt_token_ids": prompt_tokens(req["messages"]),
                        "meta_info": {
                            "output_token_logprobs": [[-0.5, t] for t in completion],
                            "completion_tokens": len(completion),
                        },
                    }
                ],
            }
        )
        Backend.calls += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        if Backend.calls % 2:
            # Chunked, in three pieces.
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            third = len(answer) // 3
            for piece in (answer[:third], answer[third : 2 * third], answer[2 * third :]):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
        else:
            # Content-Length, then the server closes the connection.
            self.send_header("Content-Length", str(len(answer)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(answer)
            self.close_connection = True


@pytest.fixture(scope="module")
def backend_url() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/api"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def srv(backend_url: str) -> Iterator[ServerProc]:
    proc = start_server("--upstream", backend_url)
    yield proc
    proc.cleanup()


def test_chunked_and_closing_backend_under_a_base_path(srv: ServerProc):
    sid = "conversation-1"
    messages: list[dict] = [{"role": "user", "content": "hello"}]
    for turn in range(6):
        resp = requests.post(
            f"{srv.url}/sessions/{sid}/v1/chat/completions",
            json={"messages": messages},
            headers={"Authorization": "Bearer secret", "X-Trace": f"t{turn}"},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        assistant = resp.json()["choices"][0]["message"]
        messages = [*messages, assistant, {"role": "tool", "content": f"r{turn}"}]
        seen = SEEN[-1]
        assert seen["path"] == "/api/v1/chat/completions"
        assert seen["headers"]["authorization"] == "Bearer secret"
        assert seen["headers"]["x-trace"] == f"t{turn}"
        assert seen["body"]["logprobs"] is True
    session = requests.get(f"{srv.url}/sessions/{sid}", timeout=10).json()
    assert session["metadata"]["num_assistant"] == 6
    assert [r["response"]["choices"][0]["message"]["content"] for r in session["records"]] == [
        f"turn {1 + 2 * i}" for i in range(6)
    ]


def test_general_client_path_for_non_http_upstreams():
    """HTTPS upstreams go through aiohttp instead of the lean pool: same results."""
    import asyncio

    from rollout_sessions.config import Settings
    from rollout_sessions.echo import start_echo_backend
    from rollout_sessions.errors import ApiError
    from rollout_sessions.proxy import Upstream

    async def main() -> None:
        echo = await start_echo_backend()
        upstream = Upstream(Settings(upstream=echo.url, upstream_timeout_s=0.5))
        try:
            await upstream.start()
            upstream._chat_pool = None  # what start() leaves for an https:// base
            body = orjson.dumps({"messages": [{"role": "user", "content": "x"}]})
            status, _, raw = await upstream.chat(body, b"x-extra: 1\r\n")
            assert status == 200
            assert orjson.loads(raw)["choices"][0]["message"]["content"] == "echo: x"
            assert echo.stats.log[-1]["messages"][0]["content"] == "x"
            hang = orjson.dumps(
                {"messages": [{"role": "user", "content": "x"}], "echo": {"fault": "hang"}}
            )
            with pytest.raises(ApiError) as err:
                await upstream.chat(hang, b"")
            assert err.value.status == 504
        finally:
            await upstream.close()
            await echo.close()

    asyncio.run(main())


def test_lean_pool_reads_an_answer_framed_by_connection_close():
    """No Content-Length, no chunking: the answer ends when the server closes."""
    import asyncio

    from rollout_sessions.config import Settings
    from rollout_sessions.proxy import Upstream

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n")
            writer.write(b'{"answer": ')
            await writer.drain()
            writer.write(b"42}")
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        upstream = Upstream(Settings(upstream=f"http://127.0.0.1:{port}"))
        try:
            await upstream.start()
            for _ in range(2):
                status, _, raw = await upstream.chat(b"{}", b"")
                assert (status, raw) == (200, b'{"answer": 42}')
        finally:
            await upstream.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
