"""A request's stream (cluster/streams.py): deltas that queued while the consumer was busy
leave as one item, in order, text and logprobs included; the last item (finish reason, usage)
is never merged into, and a stream read as it goes gets one item per delivery."""
import asyncio

from cluster.streams import Streams
from cluster.tracking import Tracked
from engine.request import Request
from model.tokenizer import load_tokenizer


def _stream():
    s = Streams(load_tokenizer(None, 256, 257))
    t = Tracked(Request("r", [5, 6, 7]))
    s.open(t)
    return s, t


async def _read(s, t):
    return [item async for item in s.items(t)]


def test_queued_deltas_leave_as_one_item_and_the_last_stays_whole():
    async def go():
        s, t = _stream()
        for tok in (72, 105, 33):
            s.deliver(t, [tok], None, [{"token_id": tok}])
        s.deliver(t, [10], "length", [{"token_id": 10}])
        return await _read(s, t)
    items = asyncio.run(go())
    # The finishing delivery's tokens are a delta like the others; the close item stays apart.
    assert [i.token_ids for i in items] == [[72, 105, 33, 10], []]
    assert items[0].logprobs == [{"token_id": t} for t in (72, 105, 33, 10)] and items[0].finish_reason is None
    assert "".join(i.text for i in items) == "Hi!\n"
    assert items[-1].finish_reason == "length" and items[-1].usage["completion_tokens"] == 4


def test_a_stream_read_as_it_goes_gets_every_delivery():
    async def go():
        s, t = _stream()
        reader = asyncio.ensure_future(_read(s, t))
        for tok in (72, 105):
            s.deliver(t, [tok], None)
            await asyncio.sleep(0)
        s.deliver(t, [33], "stop")
        return await reader
    items = asyncio.run(go())
    assert [i.token_ids for i in items] == [[72], [105], [33], []]
