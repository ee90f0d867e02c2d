"""The call engine: one call's stages, composed by ``Call``.

- ``turns``: VAD, segmenter, pre-roll and the STT stream -> speech starts and turn ends.
- ``speculation``: routing of partial transcripts while the caller talks.
- ``reply``: the responder's segments paced out to the caller, heard words, failures.
- ``keypad``: DTMF keys -> a mapped action, or keys collected for the agent.
- ``idle``: caller silence once the bot finished -> a prompt, then a goodbye.
- ``recording``: the opt-in stereo WAV and JSON of a call.
- ``engine``: ``Call``, which composes them, plus barge-in, the greeting, transfer,
  hang-up and failure reporting; a resumed phone call's conversation through its
  ``ConversationKeeper``.
- ``session``: the transport side every endpoint shares (admission, bounded queues,
  rate limits, timeouts); the native and Twilio endpoints only translate their wire.
"""

from .engine import Call, CallDeps, ConversationKeeper
from .reply import CallOutput, ConfirmsPlayback, LineEnded, StageFailed, heard_text

__all__ = ["Call", "CallDeps", "CallOutput", "ConversationKeeper", "ConfirmsPlayback", "LineEnded",
           "StageFailed", "heard_text"]
