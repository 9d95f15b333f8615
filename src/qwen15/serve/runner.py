"""The engine in a thread of its own, and the hand-over of its events to the HTTP handlers (asyncio).

`Runner.submit` queues a request's sequences (any thread; raises QueueFull at once for a 503) and returns an
asyncio queue that receives (choice index, TokenEvent) as the engine produces them. The engine thread steps
while there is work and sleeps otherwise. Under tensor parallel (torchrun) rank 0 runs the server and this
thread; every other rank runs `follow`, which steps its own engine on the commands rank 0 broadcasts, so each
step's batch is the same everywhere.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from qwen15.engine.engine import Engine, TokenEvent
from qwen15.engine.scheduler import SequenceParams

IDLE_TICK = 1.0  # seconds between steps of an idle engine (under tensor parallel: the other ranks' heartbeat)


class Runner:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop
        self._routes: dict[int, tuple[asyncio.Queue, int]] = {}
        self._lock = threading.Lock()  # routes are set before the engine thread can deliver to them
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.throughput: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, generated tokens so far)
        self.error: BaseException | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="qwen15-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: list[int], params: SequenceParams, n: int, queue: asyncio.Queue, first: int = 0):
        """Queue n choices of one prompt; their events go to `queue` as (first + i, event). Their ids."""
        with self._lock:
            ids = self.engine.add(prompt, params, n)
            for i, sid in enumerate(ids):
                self._routes[sid] = (queue, first + i)
        self._wake.set()
        return ids

    def cancel(self, ids: list[int]) -> None:
        """The client is gone or has what it wanted: the engine frees the slots at its next step."""
        with self._lock:
            for sid in ids:
                self._routes.pop(sid, None)
        self.engine.cancel(ids)
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.busy:
                    self._wake.wait(IDLE_TICK)
                    self._wake.clear()
                    if self.engine.sync is None and not self.engine.busy:
                        continue
                events = self.engine.step()
                self.throughput.append((time.monotonic(), self.engine.stats.generated_tokens))
                if events:
                    self._deliver(events)
        except BaseException as e:  # noqa: BLE001 (reported by /health and every later request)
            self.error = e
            with self._lock:
                queues = {id(q): q for q, _ in self._routes.values()}.values()
            for queue in queues:
                self.loop.call_soon_threadsafe(queue.put_nowait, None)  # None: the engine is gone
            raise
        finally:
            if self.engine.sync is not None:
                self.engine.sync([("shutdown",)])

    def _deliver(self, events: list[TokenEvent]) -> None:
        batches: dict[int, tuple[asyncio.Queue, list]] = {}
        with self._lock:
            for event in events:
                route = self._routes.get(event.seq_id)
                if route is None:
                    continue
                queue, index = route
                batches.setdefault(id(queue), (queue, []))[1].append((index, event))
                if event.finish is not None:
                    del self._routes[event.seq_id]
        for queue, items in batches.values():
            self.loop.call_soon_threadsafe(queue.put_nowait, items)

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        samples = [s for s in list(self.throughput) if now - s[0] <= window]
        if len(samples) < 2:
            return 0.0
        (t0, n0), n1 = samples[0], samples[-1][1]
        return (n1 - n0) / (now - t0) if now > t0 else 0.0


def broadcast_commands(group=None):
    """An Engine.sync for tensor parallel: rank 0's commands of this step, on every rank."""
    import torch.distributed as dist

    def sync(commands: list) -> list:
        box = [commands]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    return sync


def follow(engine: Engine) -> None:
    """A rank other than 0: step on rank 0's commands until it shuts down."""
    while not engine.closed:
        engine.step()
