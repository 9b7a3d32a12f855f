"""The engine-to-Textual bridge: an engine subscriber that hands events to the UI thread.

It runs on the engine's (or follower's) thread and must never block it: it appends the event to a queue and
posts an `EventsPending` message (non-blocking). Pending notifications coalesce through `can_replace`, so
at thousands of steps per second the UI gets one message per frame, yet no event is lost: the handler drains
the whole queue. `call_from_thread` is never used here, as it would wait for the UI in the step path.
"""
from __future__ import annotations

from collections import deque

from textual.message import Message
from textual.message_pump import MessagePump

from engine.events import Event


class EventsPending(Message):
    """Some events wait in `bridge`; call `bridge.drain()` in the handler."""

    def __init__(self, bridge: EventBridge) -> None:
        super().__init__()
        self.bridge = bridge

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, EventsPending) and message.bridge is self.bridge


class EventBridge:
    """Subscriber callable for `engine.runner.run` and for the attach follower."""

    def __init__(self, target: MessagePump) -> None:
        self._target = target
        self._queue: deque[Event] = deque()  # append/popleft are atomic: no lock on the step path

    def __call__(self, event: Event) -> None:
        self._queue.append(event)
        self._target.post_message(EventsPending(self))

    def drain(self) -> list[Event]:
        events: list[Event] = []
        while True:
            try:
                events.append(self._queue.popleft())
            except IndexError:
                return events
