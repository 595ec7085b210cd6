"""Server-sent events read the way an event-stream client reads them."""

import json

import httpx


def read_events(response: httpx.Response) -> list[tuple[str, dict[str, object]]]:
    """(event, data) pairs by the server-sent events rules: a blank line ends an event, and an
    event without a name is a `message`."""
    events: list[tuple[str, dict[str, object]]] = []
    data: list[str] = []
    name = "message"
    for line in response.iter_lines():
        if not line:
            if data:
                events.append((name, json.loads("\n".join(data))))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data.append(line.removeprefix("data:").strip())
    return events
