"""The queue contract: JSON only, and Celery's settings for long GPU tasks."""
from tasks.celery_app import make_celery
from tasks.settings import Settings


def test_queue_is_json_only_and_configured_for_long_tasks(tmp_path):
    app = make_celery(Settings(home=tmp_path, broker_url="redis://127.0.0.1:1/0", visibility_timeout=7200))
    conf = app.conf
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]  # a pickled message is refused
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.task_track_started
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 7200
    assert conf.result_backend_transport_options["visibility_timeout"] == 7200
    # a lost worker's chunk is swept back within 10 s of its visibility timeout (kombu's own
    # default sweep period is 100 s)
    transport = conf.broker_transport_options
    assert transport["unacked_restore_interval"] * transport["unacked_restore_throttle"] <= 10


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GENMILL_HOME", str(tmp_path))
    monkeypatch.setenv("GENMILL_CHUNK_SIZE", "7")
    monkeypatch.setenv("GENMILL_API_KEYS", "k1:alice,k2:bob")
    s = Settings()
    assert s.chunk_size == 7
    assert s.database_url == f"sqlite:///{tmp_path / 'genmill.db'}"
    assert s.bucket_url.startswith("file://") and s.bucket_url.endswith("/bucket")
    assert s.api_key_owners() == {"k1": "alice", "k2": "bob"}
