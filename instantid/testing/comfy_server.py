"""A real ComfyUI server in a subprocess, driven only over HTTP and its websocket.

::

    from instantid.testing.comfy_server import comfy_server

    with comfy_server(root) as server:          # root: a base directory from comfy_install.make_comfy_root
        info = server.object_info()             # GET /object_info
        run = server.run(graph)                 # POST /prompt, then poll GET /history/<id>
        run.ok, run.error, run.seconds, run.node_seconds
        png = server.view(run.images()[0])      # GET /view

The server is ``main.py --cpu --listen 127.0.0.1 --port <free port>`` started by
``comfy_launcher.py`` in its own process group; leaving the ``with`` block (also by an exception)
stops the whole group (SIGTERM, then SIGKILL). Its output goes to ``root/server.log``.

Timings come from the websocket (``/ws?clientId=...``), which the server sends to the client that
submitted a prompt: ``execution_start``, then ``executing`` with each node id as it starts and
``node: None`` when the prompt is done; cached nodes are listed in ``execution_cached``.
:attr:`PromptRun.node_seconds` is the time from a node's ``executing`` message to the next one,
:attr:`PromptRun.seconds` from ``execution_start`` to the final ``executing``: the span ComfyUI logs
as "Prompt executed in" (read it from the log with :meth:`ComfyServer.executed_in`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("comfy_launcher.py")
EXECUTED_IN = re.compile(r"Prompt executed in ([0-9.]+) seconds")


class ServerError(RuntimeError):
    """The server did not start, exited, or answered an HTTP request with an error status."""


class PromptRejected(ServerError):
    """``POST /prompt`` refused the graph (validation): ``error`` and ``node_errors`` as the server sent them."""

    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = dict(body)
        super().__init__(f"the server refused the prompt: {json.dumps(self.body)[:2000]}")


@dataclass
class PromptRun:
    """One executed prompt: its history entry and the websocket events received for it."""

    prompt_id: str
    history: dict[str, Any]
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)

    @property
    def status(self) -> dict[str, Any]:
        return self.history.get("status", {})

    @property
    def ok(self) -> bool:
        return self.status.get("status_str") == "success"

    @property
    def messages(self) -> list[tuple[str, dict[str, Any]]]:
        return [(event, data) for event, data in self.status.get("messages", [])]

    @property
    def error(self) -> dict[str, Any] | None:
        """The ``execution_error`` message (``node_type``, ``node_id``, ``exception_type``, ``exception_message``...)."""
        return next((data for event, data in self.messages if event == "execution_error"), None)

    @property
    def cached(self) -> list[str]:
        """Ids of the nodes whose outputs the server reused from an earlier prompt."""
        return [
            node for event, data in self.messages if event == "execution_cached" for node in data["nodes"]
        ]

    @property
    def outputs(self) -> dict[str, Any]:
        return self.history.get("outputs", {})

    def images(self) -> list[dict[str, str]]:
        """The ``{"filename", "subfolder", "type"}`` of every image the output nodes reported."""
        return [image for output in self.outputs.values() for image in output.get("images", [])]

    @property
    def node_seconds(self) -> dict[str, float]:
        """Seconds per executed node id, from consecutive ``executing`` messages (empty without them)."""
        starts = [(t, data.get("node")) for t, event, data in self.events if event == "executing"]
        return {node: t1 - t0 for (t0, node), (t1, _) in itertools.pairwise(starts) if node is not None}

    @property
    def seconds(self) -> float | None:
        """Seconds from ``execution_start`` to the final ``executing`` message; ``None`` if either is missing."""
        start = next((t for t, event, _ in self.events if event == "execution_start"), None)
        end = next((t for t, event, d in self.events if event == "executing" and d.get("node") is None), None)
        return None if start is None or end is None else end - start


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _EventListener:
    """Collects the websocket's JSON messages, with their arrival time, in a background thread (aiohttp)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._listen())
        self._thread = threading.Thread(target=self._run, name="comfy-ws", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError, OSError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, heartbeat=30) as ws:
            self.connected.set()
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    body = json.loads(message.data)
                    self.events.append((time.perf_counter(), body.get("type", ""), body.get("data") or {}))
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def for_prompt(self, prompt_id: str) -> list[tuple[float, str, dict[str, Any]]]:
        return [e for e in list(self.events) if e[2].get("prompt_id") == prompt_id]

    def close(self) -> None:
        """Stop listening (cancels the listener; a closed connection has ended it already)."""
        with contextlib.suppress(RuntimeError):  # the loop has already finished and closed
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(timeout=5)


class ComfyServer:
    """HTTP client of a running server (see the module docstring); build it with :func:`comfy_server`."""

    def __init__(self, root: Path, process: subprocess.Popen[bytes], port: int) -> None:
        self.root = root
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = root / "server.log"
        self._events: _EventListener | None = None

    # --- plain HTTP ------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> bytes:
        """``method path`` with an optional JSON ``body``; returns the response body, raises :class:`ServerError`."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            raise ServerError(f"{method} {path}: HTTP {err.code}: {err.read()[:4000]!r}") from err
        except urllib.error.URLError as err:
            raise ServerError(f"{method} {path}: no answer from {self.url}: {err.reason}") from err

    def get_json(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def object_info(self) -> dict[str, Any]:
        """``GET /object_info``: every node class with its inputs, outputs and display name."""
        return self.get_json("/object_info")

    def view(self, image: Mapping[str, str]) -> bytes:
        """``GET /view`` of one entry of :meth:`PromptRun.images`: the file's bytes."""
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.request("GET", f"/view?{query}")

    # --- prompts ---------------------------------------------------------------------------------

    def submit(self, graph: Mapping[str, Any]) -> str:
        """``POST /prompt`` with an API-format ``graph``; returns the prompt id. Raises :class:`PromptRejected`."""
        req = urllib.request.Request(
            self.url + "/prompt",
            data=json.dumps({"prompt": graph, "client_id": self.client_id}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return str(json.loads(response.read())["prompt_id"])
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                raise PromptRejected(json.loads(body)) from err
            except json.JSONDecodeError:
                raise ServerError(f"POST /prompt: HTTP {err.code}: {body[:4000]!r}") from err

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.05) -> PromptRun:
        """Poll ``GET /history/<prompt_id>`` until the prompt is done; raises :class:`ServerError` on timeout or exit."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                history = self.get_json(f"/history/{prompt_id}")
            except TimeoutError:  # a server slow to answer on a loaded machine: poll again until the deadline
                history = {}
            if prompt_id in history:
                break
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout} s\n{self.log_tail()}")
            time.sleep(poll)
        events: list[tuple[float, str, dict[str, Any]]] = []
        if self._events is not None:  # the final "executing" message follows the history entry closely
            done = time.monotonic() + 5
            while time.monotonic() < done:
                events = self._events.for_prompt(prompt_id)
                if any(e == "executing" and d.get("node") is None for _, e, d in events):
                    break
                time.sleep(0.01)
        return PromptRun(prompt_id, history[prompt_id], events)

    def run(self, graph: Mapping[str, Any], timeout: float = 300) -> PromptRun:
        """Submit ``graph`` and wait for it (:meth:`submit`, :meth:`wait`)."""
        return self.wait(self.submit(graph), timeout)

    # --- process ---------------------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def executed_in(self) -> list[float]:
        """Every "Prompt executed in N seconds" the server has logged, in order."""
        return [float(m) for m in EXECUTED_IN.findall(self.log_text())]

    def _check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"the ComfyUI server exited with code {code}; its log ends:\n{self.log_tail()}")

    def wait_ready(self, timeout: float) -> None:
        """Wait until the server answers ``GET /queue``, then connect the websocket listener."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                self.request("GET", "/queue", timeout=5)
                break
            except (OSError, ServerError):
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"no answer within {timeout} s; the log ends:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.2)
        self._events = _EventListener(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}")
        if not self._events.connected.wait(timeout=10):
            log.warning("the websocket did not connect: node timings will be missing")

    def stop(self, grace: float = 10) -> None:
        """Stop the server's process group: SIGTERM, then SIGKILL after ``grace`` seconds. Idempotent."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=grace)
        if self._events is not None:
            self._events.close()
            self._events = None


def start_server(
    root: Path,
    *,
    port: int | None = None,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 180,
    cpu: bool = True,
) -> ComfyServer:
    """Start ComfyUI from the base directory ``root`` on CPU and wait until it answers; the caller stops it.

    ``args`` are more ``main.py`` options; ``env`` more environment variables; ``cpu=False`` leaves
    out ``--cpu`` (ComfyUI then picks its accelerator). Prefer :func:`comfy_server`.
    """
    port = port or free_port()
    command = [
        sys.executable,
        str(LAUNCHER),
        str(root),
        *(("--cpu",) if cpu else ()),
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--output-directory",
        str(root / "output"),
        "--input-directory",
        str(root / "input"),
        "--temp-directory",
        str(root),
        *args,
    ]
    process_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with (root / "server.log").open("ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=process_env,
            start_new_session=True,
        )
    server = ComfyServer(root, process, port)
    try:
        server.wait_ready(timeout)
    except BaseException:
        server.stop()
        raise
    log.info("ComfyUI server on %s (pid %d, base directory %s)", server.url, process.pid, root)
    return server


@contextlib.contextmanager
def comfy_server(root: Path, **options: Any) -> Iterator[ComfyServer]:
    """:func:`start_server` for the ``with`` block; the server is stopped however the block ends."""
    server = start_server(root, **options)
    try:
        yield server
    finally:
        server.stop()
