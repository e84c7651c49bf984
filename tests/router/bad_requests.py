"""Bad requests for the router, each with the OpenAI error it must get, and the check of that
error: the status, OpenAI's error shape, the type, and the parameter it names."""

from __future__ import annotations

M = "MODEL"  # replaced by the served model's name
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]
BAD = [
    # (path, body (dict, or raw bytes), status, param the error names (or None))
    (CHAT, b'{"model": "x", "messages": [', 400, None),
    (COMPL, b"not json at all", 400, None),
    (CHAT, {"model": M, "messages": "hi"}, 400, "messages"),
    (CHAT, {"model": M, "messages": USER, "max_tokens": "5"}, 400, "max_tokens"),
    (CHAT, {"model": M, "messages": USER, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"model": M, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    (COMPL, {"model": M, "prompt": 5}, 400, "prompt"),
    (CHAT, {"model": M, "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    (COMPL, {"model": M, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"model": M, "messages": USER, "n": 0}, 400, "n"),
    (CHAT, {"model": "no-such-model", "messages": USER}, 404, "model"),
    (COMPL, {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
    (CHAT, {"model": M, "messages": []}, 400, "messages"),
    (COMPL, {"model": M, "prompt": []}, 400, "prompt"),
    (COMPL, {"model": M, "prompt": [5] * 5000}, 400, "prompt"),  # over max_model_len (4096)
    (CHAT, {"model": M, "messages": [{"role": "user", "content": "x " * 5000}]}, 400, "messages"),
    (COMPL, {"model": M, "prompt": [5] * 10, "max_tokens": 4090}, 400, "prompt"),
    (COMPL, {"model": M, "prompt": [1, 2, 10**6]}, 400, "prompt"),  # outside the vocabulary
    # nothing silently ignored: what Baton does not do, and what nobody defines, is named
    (CHAT, {"model": M, "messages": USER, "frobnicate": 1}, 400, "frobnicate"),
    (CHAT, {"model": M, "messages": USER, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    (COMPL, {"model": M, "prompt": "hi", "echo": True}, 400, "echo"),
    (COMPL, {"model": M, "prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias"),
]


def request_kw(body: dict | bytes, model: str) -> dict:
    """httpx's keywords for a case's body: raw bytes as they are, JSON with the model named."""
    if isinstance(body, bytes):
        return {"content": body, "headers": {"content-type": "application/json"}}
    return {"json": {k: (model if v == M else v) for k, v in body.items()}}


def check_error(r, status: int, param: str | None, case: str) -> None:
    """r (an httpx response) is the OpenAI error a bad request must get."""
    assert r.status_code == status, (case, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, case
    assert isinstance(err["message"], str) and err["message"], case
    assert err["type"] == "invalid_request_error", (case, err)
    assert status != 404 or err["code"] == "model_not_found", (case, err)
    assert err["param"] == param, (case, err)
