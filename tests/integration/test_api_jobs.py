"""The job lifecycle through the gateway on a real Redis and a real Celery producer."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from shared.constants import PALETTE, QUEUE, input_key, job_key, output_key
from shared.errors import JOB_ERRORS
from tests.helpers import bearer, jpeg_bytes, play_worker, png_bytes, upload

pytestmark = pytest.mark.integration


def submit(client, data=None, name="photo.png"):
    response = upload(client, data or png_bytes(), name)
    assert response.status_code == 202, response.get_json()
    return response.get_json()


def all_redis_values(redis_client) -> list[bytes]:
    """Every value stored in Redis, whatever the key type, plus the key names."""
    values = []
    for key in redis_client.scan_iter("*"):
        values.append(key)
        kind = redis_client.type(key)
        if kind == b"string":
            values.append(redis_client.get(key))
        elif kind == b"hash":
            for field, value in redis_client.hgetall(key).items():
                values += [field, value]
        elif kind == b"list":
            values += redis_client.lrange(key, 0, -1)
        elif kind == b"set":
            values += list(redis_client.smembers(key))
        elif kind == b"zset":
            values += [member for member, _ in redis_client.zrange(key, 0, -1, withscores=True)]
    return values


def test_submit_returns_the_contract(client, clean_redis):
    response = upload(client, png_bytes())
    assert response.status_code == 202
    body = response.get_json()
    assert set(body) == {"job_id", "token", "status_url", "result_url", "expires_in"}
    assert body["status_url"] == f"/v1/jobs/{body['job_id']}"
    assert body["result_url"] == f"/v1/jobs/{body['job_id']}/result"
    assert response.headers["Location"] == body["status_url"]
    assert len(body["token"]) >= 43 and len(body["job_id"]) == 24
    assert isinstance(body["expires_in"], int) and body["expires_in"] > 0
    status = client.get(body["status_url"], headers=bearer(body["token"]))
    assert status.status_code == 200
    assert status.get_json() == {"job_id": body["job_id"], "status": "queued"}
    # Every key the gateway wrote expires.
    for key in clean_redis.scan_iter("m2fp:*"):
        assert clean_redis.ttl(key) > 0, key


def test_celery_message_carries_only_the_job_id(client, clean_redis):
    job = submit(client)
    messages = clean_redis.lrange(QUEUE, 0, -1)
    assert len(messages) == 1
    message = json.loads(messages[0])
    assert message["headers"]["task"] == "m2fp.parse"
    assert message["properties"]["body_encoding"] == "base64"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert args == [job["job_id"]] and kwargs == {}
    assert job["token"] not in messages[0].decode()


def test_redis_never_holds_the_plaintext_image(client, clean_redis):
    photo = png_bytes(200, 150, noise=True)
    jpeg = jpeg_bytes(300, 200)
    submit(client, photo, "a.png")
    submit(client, jpeg, "b.jpg")
    stored = all_redis_values(clean_redis)
    values = b"\n".join(stored)
    for image in (photo, jpeg):
        middle = len(image) // 2
        assert image[middle : middle + 48] not in values
        assert base64.b64encode(image[:48]) not in values
    # An image stored as is starts with its signature. (Searching the 3-byte JPEG signature
    # anywhere fails by chance: about 1 run in 200 has it inside 90 KB of ciphertext.)
    assert not [value for value in stored if value.startswith((b"\x89PNG", b"\xff\xd8\xff"))]
    assert b"iVBORw0KGgo" not in values  # base64 of the PNG signature


def test_result_is_served_once_then_410(app, client, clean_redis):
    photo = png_bytes(40, 30)
    job = submit(client, photo)
    assert play_worker(app, job["job_id"]) == photo  # the worker decrypts exactly the upload
    headers = bearer(job["token"])
    assert client.get(job["status_url"], headers=headers).get_json()["status"] == "done"
    first = client.get(job["result_url"], headers=headers)
    assert first.status_code == 200 and first.mimetype == "application/json"
    document = first.get_json()
    assert (document["width"], document["height"]) == (40, 30)
    assert document["job_id"] == job["job_id"]
    assert not clean_redis.exists(output_key(job["job_id"]))
    second = client.get(job["result_url"], headers=headers)
    assert second.status_code == 410
    assert second.get_json()["error"] == "result_gone"


def test_head_cannot_consume_the_result(app, client):
    job = submit(client)
    play_worker(app, job["job_id"])
    head = client.head(job["result_url"], headers=bearer(job["token"]))
    assert head.status_code == 405
    assert client.get(job["result_url"], headers=bearer(job["token"])).status_code == 200


def test_palette_format(app, client):
    job = submit(client, png_bytes(20, 10))
    play_worker(app, job["job_id"])
    response = client.get(job["result_url"] + "?format=palette", headers=bearer(job["token"]))
    assert response.status_code == 200 and response.mimetype == "image/png"
    with Image.open(io.BytesIO(response.data)) as image:
        assert image.mode == "P" and image.size == (20, 10)
        palette = image.getpalette()[:60]
        assert [tuple(palette[i : i + 3]) for i in range(0, 60, 3)] == list(PALETTE)
        assert list(image.tobytes()[:21]) == [i % 20 for i in range(21)]


def test_unknown_format_does_not_consume_the_result(app, client):
    job = submit(client)
    play_worker(app, job["job_id"])
    response = client.get(job["result_url"] + "?format=svg", headers=bearer(job["token"]))
    assert response.status_code == 400 and response.get_json()["error"] == "bad_request"
    assert client.get(job["result_url"], headers=bearer(job["token"])).status_code == 200


def test_result_before_done_is_409_with_status(app, client):
    job = submit(client)
    response = client.get(job["result_url"], headers=bearer(job["token"]))
    assert response.status_code == 409
    assert response.get_json()["error"] == "not_ready"
    assert response.get_json()["status"] == "queued"
    app.extensions["m2fp"].store.claim(job["job_id"], "w")
    assert (
        client.get(job["result_url"], headers=bearer(job["token"])).get_json()["status"]
        == "running"
    )


def test_wrong_token_is_the_same_404_as_an_unknown_id(client):
    job = submit(client)
    wrong = client.get(job["status_url"], headers=bearer("A" * 43))
    missing = client.get(job["status_url"])
    unknown = client.get("/v1/jobs/" + "B" * 24, headers=bearer(job["token"]))
    malformed = client.get("/v1/jobs/not-an-id", headers=bearer(job["token"]))
    bad_scheme = client.get(job["status_url"], headers={"Authorization": f"Basic {job['token']}"})
    responses = [wrong, missing, unknown, malformed, bad_scheme]
    assert {r.status_code for r in responses} == {404}
    assert len({r.data for r in responses}) == 1
    assert wrong.get_json()["error"] == "not_found"
    for path in (job["result_url"],):
        assert client.get(path, headers=bearer("A" * 43)).data == wrong.data
    assert client.delete(job["status_url"], headers=bearer("A" * 43)).data == wrong.data


def test_delete_withdraws_the_job(client, clean_redis):
    job = submit(client)
    response = client.delete(job["status_url"], headers=bearer(job["token"]))
    assert response.status_code == 204 and response.data == b""
    for key in (job_key(job["job_id"]), input_key(job["job_id"]), output_key(job["job_id"])):
        assert not clean_redis.exists(key)
    assert client.get(job["status_url"], headers=bearer(job["token"])).status_code == 404
    assert client.delete(job["status_url"], headers=bearer(job["token"])).status_code == 404


def test_expired_input_shows_expired_with_its_error(client, clean_redis):
    job = submit(client)
    clean_redis.delete(input_key(job["job_id"]))  # what the input TTL does
    body = client.get(job["status_url"], headers=bearer(job["token"])).get_json()
    assert body == {
        "job_id": job["job_id"],
        "status": "expired",
        "error": {"code": "expired", "message": JOB_ERRORS["expired"]},
    }
    assert client.get(job["result_url"], headers=bearer(job["token"])).status_code == 410


def test_failed_job_shows_public_error_only(app, client, clean_redis):
    job = submit(client)
    gw = app.extensions["m2fp"]
    gw.store.claim(job["job_id"], "w")
    gw.store.fail(job["job_id"], "undecodable_image")
    clean_redis.hset(job_key(job["job_id"]), "error_message", "/srv/secret/path.py line 3")
    body = client.get(job["status_url"], headers=bearer(job["token"])).get_json()
    assert body["status"] == "failed"
    assert body["error"] == {
        "code": "undecodable_image",
        "message": JOB_ERRORS["undecodable_image"],
    }
    result = client.get(job["result_url"], headers=bearer(job["token"]))
    assert result.status_code == 409 and result.get_json()["status"] == "failed"


def test_logs_hold_ids_and_numbers_but_no_client_text(make_app, capsys):
    app = make_app()
    client = app.test_client()
    response = upload(client, png_bytes(33, 22), "secret-family-photo.png")
    job = response.get_json()
    client.get(job["status_url"], headers=bearer(job["token"]))
    play_worker(app, job["job_id"])
    client.get(job["result_url"], headers=bearer(job["token"]))
    upload(client, b"not an image", "another-secret-name.png")
    logs = capsys.readouterr().err
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    submitted = next(line for line in lines if line["event"] == "job_submitted")
    assert submitted["job_id"] == job["job_id"]
    assert (submitted["width"], submitted["height"]) == (33, 22) and submitted["bytes"] > 0
    assert any(line["event"] == "result_fetched" for line in lines)
    assert any(
        line["event"] == "upload_rejected" and line["code"] == "type_mismatch" for line in lines
    )
    assert "secret-family-photo" not in logs and "another-secret-name" not in logs
    assert job["token"] not in logs and "127.0.0.1" not in logs


def test_a_failed_enqueue_withdraws_the_job_and_gives_503(client, clean_redis, monkeypatch):
    from kombu.exceptions import OperationalError

    def broker_down(app, job_id):
        raise OperationalError("Error 111 connecting to 10.0.0.5:6379. Connection refused.")

    monkeypatch.setattr("api.jobs.enqueue_parse", broker_down)
    response = upload(client, png_bytes())
    assert response.status_code == 503
    assert response.get_json()["error"] == "unavailable" and "Retry-After" in response.headers
    assert "10.0.0.5" not in response.get_data(as_text=True)
    assert not list(clean_redis.scan_iter("m2fp:job:*")) and not list(
        clean_redis.scan_iter("m2fp:in:*")
    )


@pytest.mark.parametrize("failure", ["decrypt", "render"])
def test_a_failed_delivery_leaves_the_result_fetchable(
    app, client, clean_redis, monkeypatch, failure
):
    """Decrypt and render first, delete only then: a server-side failure destroys nothing."""
    from api import jobs
    from shared.errors import DecryptionError

    job = submit(client, png_bytes(20, 10))
    play_worker(app, job["job_id"])
    headers = bearer(job["token"])

    def broken(*_args, **_kwargs):
        raise DecryptionError("injected") if failure == "decrypt" else ValueError("injected")

    with monkeypatch.context() as patch:
        patch.setattr(jobs, "open_result" if failure == "decrypt" else "palette_png", broken)
        failed = client.get(job["result_url"] + "?format=palette", headers=headers)
    assert failed.status_code == 500 and failed.get_json()["error"] == "internal_error"
    assert clean_redis.exists(output_key(job["job_id"]))
    assert b"wrapped_dek" in clean_redis.hkeys(f"m2fp:job:{job['job_id']}")
    served = client.get(job["result_url"], headers=headers)
    assert served.status_code == 200 and served.get_json()["width"] == 20
    assert client.get(job["result_url"], headers=headers).status_code == 410
    assert not clean_redis.exists(output_key(job["job_id"]))
