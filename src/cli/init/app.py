"""Your adapter: pitboss calls these commands from gRPC (pitboss.v1.Bridge).

Try it:  pitboss call hello --payload '{"name": "you"}'
         pitboss call words --stream --payload '"one two three"'
"""

import logging

from pitboss_worker import Adapter, InvalidRequest, Request

adapter = Adapter("app")
log = logging.getLogger("app")


@adapter.command
def hello(req: Request) -> dict:
    """Greets {"name": ...}; the reply is JSON."""
    body = req.json()
    name = body.get("name", "world") if isinstance(body, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest('expected {"name": "..."}')
    log.info("greeting %s", name)
    return {"hello": name}


@adapter.command
def words(req: Request):
    """Streams the words of a JSON string, one chunk each."""
    text = req.json()
    if not isinstance(text, str):
        raise InvalidRequest("expected a JSON string")
    for word in text.split():
        yield word
