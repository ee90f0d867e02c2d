import asyncio

from gateway.playout import Playout
from gateway.call import heard_text


async def test_frames_are_paced_and_padded():
    sent: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()

    async def send(frame: bytes) -> None:
        sent.append((loop.time(), len(frame)))

    playout = Playout(send, 8000, frame_ms=20, lead_ms=0)
    await playout.write(b"\x01\x00" * 1000)  # 125 ms -> 6 whole frames now
    await playout.flush()  # + 1 padded frame
    assert [n for _, n in sent] == [320] * 7
    span = sent[-1][0] - sent[0][0]
    assert span >= 0.11  # 6 frame periods: real time, not a burst
    assert playout.sent_ms == 140


async def test_heard_ms_never_exceeds_sent_audio():
    async def send(frame: bytes) -> None:
        return None

    playout = Playout(send, 16000, frame_ms=20, lead_ms=60)
    assert playout.heard_ms() == 0.0
    await playout.write(b"\x00" * 640 * 3)
    assert playout.heard_ms() <= playout.sent_ms == 60


def test_heard_text_cuts_the_segment_being_played():
    segments = [("Our branches open at nine.", 0.0, 1000.0), ("On Saturdays at ten.", 1000.0,
                                                                      float("inf"))]
    assert heard_text(segments, 500.0, 2000.0) == "Our branches"
    assert heard_text(segments, 1500.0, 2000.0) == "Our branches open at nine. On Saturdays"
