"""Run the app with uvicorn in a background thread on a free 127.0.0.1 port, for the tests that need a
real server (real sockets, real streaming, real disconnects).

    with ServerThread(create_app(load)) as server:
        httpx.get(server.url + "/health")
"""

import socket
import threading
import time

import uvicorn


class ServerThread:
    def __init__(self, app, startup_timeout_s: float = 10.0):
        self.app, self.startup_timeout_s = app, startup_timeout_s
        self.url = None

    def __enter__(self) -> "ServerThread":
        # Bind the socket first and hand it over: the port is ours before the server starts, no race.
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info):
        self._server.should_exit = True
        self._thread.join()
        self._socket.close()
