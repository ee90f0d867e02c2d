"""The Twilio transport's signature checks and public_url: what a refusal logs and tells,
and the stream URL TwiML gives. Each test failed before its fix (a review). In-process
(no model load): the app is driven without its lifespan, as
tests/test_twilio.py::test_a_bad_signature_while_the_models_load_is_counted_too does.
"""

from __future__ import annotations

import json
import logging
from xml.etree import ElementTree

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from twilio.request_validator import RequestValidator

from gateway.app import create_app
from gateway.settings import Settings

TOKEN = "12345678901234567890123456789012"  # Twilio auth token
CALL_TOKEN = "call-token-review-0123456789"
FORM = {"CallSid": "CA" + "5e" * 16, "From": "+15550100", "To": "+15550199",
        "AccountSid": "AC" + "0" * 32, "CallStatus": "in-progress"}


def app_with(tmp_path, **changes):
    return create_app(Settings.load({"host": "127.0.0.1", "port": 0,
                                     "store_dir": str(tmp_path / "store"), **changes},
                                    environ={}))


def logged_text(caplog: pytest.LogCaptureFixture) -> str:
    """Every voicegate log line as the JSON formatter would write it (message + fields)."""
    return "\n".join(json.dumps({"event": r.getMessage(), **getattr(r, "fields", {})},
                                default=str)
                     for r in caplog.records if r.name.startswith("voicegate"))


# ------------------------------------------------------------------ secrets in logs/errors


def test_a_refused_stream_upgrade_does_not_log_the_call_token_it_presented(tmp_path, caplog):
    """docs/operations.md: a caller may present the call token as ``?token=``; the gateway
    keeps it out of uvicorn's lines (logs.redact_server_logs). The stream's signature check
    logs the URL it checked, query string included, as a structured field: the call
    token lands in the log in clear."""
    caplog.set_level(logging.INFO, logger="voicegate")
    app = app_with(tmp_path, twilio_auth_token=TOKEN, public_url="https://voice.example.com",
                   call_token=CALL_TOKEN)
    client = TestClient(app)
    with pytest.raises(WebSocketDisconnect):
        with client.websocket_connect(f"/twilio/stream?token={CALL_TOKEN}") as ws:
            ws.receive_text()
    assert app.state.services.stats.errors["twilio_bad_signature"] == 1
    assert CALL_TOKEN not in logged_text(caplog)


def test_a_public_url_password_is_neither_logged_nor_told_to_an_unsigned_request(tmp_path,
                                                                               caplog):
    """Twilio reaches password-protected URLs as https://user:password@host/... (its
    HTTP-auth feature), so public_url may hold one; settings treat it as a secret (its
    serializer and repr redact it). An unsigned POST to the webhook (anyone) gets a 403
    whose body names the URL, password included, and the log line carries it too."""
    caplog.set_level(logging.INFO, logger="voicegate")
    password = "s3cret-basic-auth-pw"
    app = app_with(tmp_path, twilio_auth_token=TOKEN,
                   public_url=f"https://twilio:{password}@voice.example.com")
    reply = TestClient(app).post("/twilio/voice", data=FORM)
    assert reply.status_code == 403
    assert password not in reply.text, reply.text
    assert password not in logged_text(caplog)


# ------------------------------------------------------------------ public_url handling


def test_a_public_url_with_an_upper_case_scheme_gives_a_wss_stream_url(tmp_path):
    """URL schemes are case-insensitive and the setting's check accepts HTTPS:// (urlsplit
    lowers it); stream_url only maps the exact strings "https"/"http", so the TwiML tells
    Twilio to stream to HTTPS://.../twilio/stream, which is no WebSocket URL (Twilio's
    <Stream> takes wss:// only), and every call fails to connect."""
    settings = dict(twilio_auth_token=TOKEN, public_url="HTTPS://voice.example.com")
    app = app_with(tmp_path, **settings)
    # Twilio signs the URL it requested: the console's https://voice.example.com/...
    signature = RequestValidator(TOKEN).compute_signature(
        "https://voice.example.com/twilio/voice", FORM)
    reply = TestClient(app).post("/twilio/voice", data=FORM,
                                 headers={"X-Twilio-Signature": signature})
    assert reply.status_code == 200, reply.text
    stream = ElementTree.fromstring(reply.text).find("./Connect/Stream")
    assert stream is not None
    assert stream.get("url", "").startswith("wss://"), stream.get("url")


@pytest.mark.parametrize("value", [TOKEN + "\n", " " + TOKEN, "   "])
def test_a_twilio_auth_token_with_surrounding_whitespace_is_refused_at_start_up(tmp_path, value):
    """Review (stop 69): VOICEGATE_TWILIO_AUTH_TOKEN was taken as it came, whitespace and
    all (a secret file's trailing newline). A Twilio auth token has none, so every
    webhook's and every stream upgrade's X-Twilio-Signature, which Twilio computes with the
    real token, was refused (403: every phone call failed at its first request), and every
    REST hang-up or transfer was answered 401; "   " turned the checks on with a token
    nobody signs with. It is refused at start-up by name, as the call and admin tokens are,
    never echoing the value."""
    from gateway.settings import SettingsError

    with pytest.raises(SettingsError, match="twilio_auth_token") as info:
        Settings.load(environ={"VOICEGATE_TWILIO_AUTH_TOKEN": value})
    assert TOKEN not in str(info.value)
    assert Settings.load(environ={"VOICEGATE_TWILIO_AUTH_TOKEN": TOKEN}).twilio_auth_token == TOKEN
