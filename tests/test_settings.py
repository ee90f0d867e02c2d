import pytest

from gateway.settings import Settings, SettingsError


def test_environment_and_overrides():
    env = {"VOICEGATE_PORT": "9000", "VOICEGATE_BARGE_IN_MIN_SPEECH_MS": "250",
           "VOICEGATE_VAD_THRESHOLD": "0.6"}
    s = Settings.load({"host": "0.0.0.0"}, environ=env)
    assert (s.port, s.host, s.barge_in_min_speech_ms, s.vad_threshold) == (9000, "0.0.0.0", 250, 0.6)


def test_bad_values_are_named():
    with pytest.raises(SettingsError, match="port"):
        Settings.load(environ={"VOICEGATE_PORT": "eighty"})
    with pytest.raises(SettingsError, match="frame_ms"):
        Settings.load({"frame_ms": 25}, environ={})
    with pytest.raises(SettingsError, match="embedder_cache_size"):
        Settings.load(environ={"VOICEGATE_EMBEDDER_CACHE_SIZE": "-1"})


def test_config_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"end_of_turn_silence_ms": 500, "nonsense": 1}')
    with pytest.raises(SettingsError, match="nonsense"):
        Settings.load(environ={"VOICEGATE_CONFIG": str(path)})


def test_secrets_not_in_repr():
    s = Settings.load({"admin_token": "s3cret"}, environ={})
    assert "s3cret" not in repr(s)


def test_every_bad_field_is_named_in_one_error():
    with pytest.raises(SettingsError) as info:
        Settings.load({"cache_poll_s": 0, "redis_heartbeat_s": -1, "vad_threshold": 1.5,
                       "max_calls": 0, "port": 70000}, environ={})
    message = str(info.value)
    for name in ("cache_poll_s", "redis_heartbeat_s", "vad_threshold", "max_calls", "port"):
        assert name in message


@pytest.mark.parametrize("name", ["cache_poll_s", "redis_poll_s", "redis_heartbeat_s",
                                  "start_timeout_s", "send_timeout_s"])
def test_intervals_that_would_spin_at_zero_are_refused(name):
    with pytest.raises(SettingsError, match=name):
        Settings.load({name: 0}, environ={})


def test_secret_values_never_appear_in_repr_or_errors():
    secrets = {"admin_token": "tok-admin-1", "call_token": "tok-call-2",
               "openai_api_key": "sk-3", "redis_url": "redis://:pw4@host/0"}
    s = Settings.load(secrets, environ={})
    for value in secrets.values():
        assert value not in repr(s) and value not in str(s)
    with pytest.raises(SettingsError) as info:
        Settings.load({"admin_token": 12345678, "port": "x"}, environ={})
    assert "12345678" not in str(info.value)


def test_replace_validates():
    s = Settings.load(environ={})
    assert s.replace(max_calls=3).max_calls == 3
    with pytest.raises(SettingsError, match="max_calls"):
        s.replace(max_calls=-1)
