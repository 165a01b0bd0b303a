"""From the engine's thread to the event loop: the outputs of a group of engine requests on one asyncio queue.

The engine calls `on_output` on its own stepping thread; asyncio objects are not thread-safe, so each output
is handed to the loop with `call_soon_threadsafe` and lands on the queue in the order the engine produced it.
One HTTP request (n choices, several prompts) shares one stream: outputs carry their request_id.
`client_gone` watches an ASGI connection for the client's disconnect, so a waiting request can be aborted.
"""

from __future__ import annotations

import asyncio

from longcat_jax.serving.params import RequestOutput


class OutputStream:
    """An asyncio queue of RequestOutputs fed from any thread; create it inside the event loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._getter: asyncio.Future[RequestOutput] | None = None

    def on_output(self, output: RequestOutput) -> None:
        """The engine's callback (engine thread): never raises, since an exception there would hurt the
        whole batch."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, output)
        except RuntimeError:  # the loop is closed: the server is gone and nobody is listening
            pass

    async def get(self, unless: asyncio.Future | None = None) -> RequestOutput | None:
        """The next output, or None if `unless` (a client-disconnect watch, say) completes first. The pending
        get survives that (a cancelled Queue.get could drop an item that arrived at the same moment)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({self._getter} | ({unless} if unless is not None else set()),
                           return_when=asyncio.FIRST_COMPLETED)
        if not self._getter.done():
            return None
        getter, self._getter = self._getter, None
        return getter.result()

    def close(self) -> None:
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


async def client_gone(receive) -> None:
    """Returns when the client disconnects: call it after the request body has been read, when the server's
    receive() has nothing left to deliver but `http.disconnect`."""
    while (await receive())["type"] != "http.disconnect":
        pass
