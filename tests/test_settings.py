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
