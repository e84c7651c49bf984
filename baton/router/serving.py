"""The router's engine room: model files, pods, and running one choice on a pod with retries.

A request becomes one `Job` per choice (n choices, times each prompt of a completions
batch). Each job runs as its own asyncio task that picks a pod, streams its tokens through a
`ChoiceOutput` and puts events on the request's queue; the HTTP layer (app.py) shapes the
events into OpenAI responses. Cancelling a job's task closes its pod stream (the abort).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from baton import internal_auth
from baton.engine.limits import prompt_length_error
from baton.engine.sampling_params import SamplingParams
from baton.engine.tokenizer import Tokenizer
from baton.kvindex.connection import redacted
from baton.kvindex.hashing import model_identity, model_seed
from baton.kvindex.index import KVIndex
from baton.router import defaults
from baton.router.metrics import RouterMetrics
from baton.router.output import ChoiceOutput
from baton.router.pod_client import PodChannels, PodConnections, PodFailed, PodRejected, PodStream
from baton.router.pods import PREFILL_ROLES, PodTable
from baton.router.protocol import APIError
from baton.router.settings import RouterSettings

log = logging.getLogger(__name__)


STREAM_BUFFER = 64  # events a request's queue holds unread before its jobs stop pulling from pods
_STALL_POLL_S = 0.01
# Texts up to this size are tokenized (chat: rendered too) on the event loop: ~30 us for 70
# bytes, ~125 us for a short chat (SmolLM2's tokenizer, the CPU machine), less than the hop to
# the tokenizer threads and back costs the loop, and no wait for a busy loop to hand over the
# GIL. Longer ones (~0.45 us a byte) go to the threads.
INLINE_TOKENIZE_BYTES = 256


_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))


def _wire(sp: SamplingParams) -> dict:
    """SamplingParams as the pod's JSON body carries it: dataclasses.asdict's fields and values,
    without its deep copy of every field (~30 us a request; the body is serialized at once)."""
    return {name: getattr(sp, name) for name in _SAMPLING_FIELDS}


class ClientStalled(Exception):
    """The client left its stream unread past stream_stall_timeout_s."""


@dataclass
class Job:
    index: int  # the choice's index in the response
    prompt_index: int
    prompt_ids: list[int]
    sampling: SamplingParams
    out: ChoiceOutput


@dataclass
class RequestClock:
    """Per-request timing for the TTFT/ITL/E2E histograms."""

    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None


class Router:
    def __init__(self, settings: RouterSettings):
        self.s = settings
        model_dir = Path(settings.model)
        self.tokenizer = Tokenizer(model_dir)
        # Tokenizing and chat templates run here, never on the event loop: a long prompt
        # (the tokenizer releases the GIL) must not stall every other stream and /health.
        self._pool = ThreadPoolExecutor(settings.tokenizer_threads, thread_name_prefix="tokenize")
        self.model_name = settings.served_model_name or model_dir.resolve().name
        config = json.loads((model_dir / "config.json").read_text())
        # the context before any pod has published its own (pods cap it by their KV cache)
        self.config_max_model_len = int(config.get("max_position_embeddings", 4096))
        self.seed = model_seed(model_identity(model_dir))
        self.sampling_defaults = defaults.effective(model_dir, settings.sampling_override)
        self.metrics = RouterMetrics()
        self.created = int(time.time())
        self.http: httpx.AsyncClient | None = None
        self.pod_conns: PodConnections | None = None  # generate streams (pod_client.py)
        self.channels: PodChannels | None = None  # ... or generate calls on channels
        self.index: KVIndex | None = None
        self.pods: PodTable | None = None
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        headers = internal_auth.headers(self.s.internal_token)
        self.http = httpx.AsyncClient(  # pod polls and readiness
            timeout=httpx.Timeout(None, connect=self.s.connect_timeout_s, pool=self.s.connect_timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            headers=headers,
        )
        # Generate streams: a lean client of our own (pod_client.py). Through httpx, its pool's
        # walks, anyio's cancel scopes and h11 were most of the router's CPU per request and
        # per token (docs/PERFORMANCE.md, issue 23).
        self.pod_conns = PodConnections(headers, self.s.connect_timeout_s)
        if self.s.pod_channels:
            self.channels = PodChannels(self.pod_conns)
        if self.s.redis_url:
            # with the token, only pods whose records it signed count (never a 500 on a bad one)
            self.index = KVIndex(self.s.redis_url, self.s.redis_prefix, self.s.redis_timeout_s,
                                 secret=self.s.internal_token)
        self.pods = PodTable(
            self.s, self.http, self.index, self.metrics, self.model_name, self.seed
        )
        await self.pods.refresh()
        self._tasks = [
            asyncio.create_task(
                self._every(self.s.refresh_interval_s, self.pods.refresh), name="pod-refresh"
            ),
            asyncio.create_task(
                self._every(self.s.sweep_interval_s, self.pods.sweep), name="index-sweep"
            ),
        ]
        log.info(
            "router for %s (max_model_len %d until pods publish theirs, policy %s, redis %s, "
            "static pods %s)",
            self.model_name,
            self.max_model_len,
            self.s.policy,
            redacted(self.s.redis_url) if self.s.redis_url else "off",
            self.s.pods or "none",
        )

    async def stop(self) -> None:
        # The flag, not only cancel(): Python 3.11 can lose a cancel that races a timeout
        # inside a Redis or HTTP call, and shutdown must not wait on such a loop forever.
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self.index is not None:
            await self.index.close()
        if self.http is not None:
            await self.http.aclose()
        if self.channels is not None:
            self.channels.close()
        if self.pod_conns is not None:
            self.pod_conns.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _every(self, period_s: float, fn) -> None:
        while not self._stopping:
            await asyncio.sleep(period_s)
            try:
                await fn()
            except Exception:  # a bug in a refresh must not stop refreshing; say it loudly
                log.exception("periodic %s failed", getattr(fn, "__name__", fn))

    # -- preparing a request --------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        size = len(text.encode())
        self.check_text_size(size, param)
        if size <= INLINE_TOKENIZE_BYTES:
            return self.tokenizer.encode(text, add_special_tokens)
        return await self._off_loop(self.tokenizer.encode, text, add_special_tokens)

    async def chat_ids(self, messages: list[dict], render: Callable[[list[dict]], str],
                       with_tools: bool = False) -> list[int]:
        """The chat prompt's ids: `render(messages)` (the template) tokenized with message
        content as plain text (unless --special-tokens-in-content). ValueError as render's.
        `with_tools`: render puts tool definitions in the prompt too (never done on the loop)."""
        size = sum(len(m["content"].encode()) for m in messages if isinstance(m.get("content"), str))
        self.check_text_size(size, "messages")
        ids = lambda: self.tokenizer.encode_chat(
            messages, render=render, content_special=self.s.special_tokens_in_content)
        # on the loop only when everything rendered is small, in bytes as for a prompt: the
        # contents (counted above), then every message value (names, tool calls) with them
        small = not with_tools and size <= INLINE_TOKENIZE_BYTES and sum(
            len(str(v).encode()) for m in messages for v in m.values()) <= INLINE_TOKENIZE_BYTES
        return ids() if small else await self._off_loop(ids)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def check_text_size(self, nbytes: int, param: str) -> None:
        """400 before tokenizing a text so long that no pod could take its tokens: each token
        stands for at most tokenizer.max_token_bytes bytes."""
        limit = self.max_model_len
        if nbytes > limit * self.tokenizer.max_token_bytes:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens; the prompt's "
                f"{nbytes} bytes are more tokens than that.", param=param,
                code="context_length_exceeded")

    def check_ids(self, ids: list[int]) -> None:
        """400 for a token-id prompt too long (checked first: cheap) or out of the vocabulary."""
        refusal = prompt_length_error(len(ids), self.max_model_len)
        if refusal is not None:
            raise APIError(400, refusal, param="prompt", code="context_length_exceeded")
        vocab = self.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {vocab}).", param="prompt")

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404, f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )

    @property
    def max_model_len(self) -> int:
        """The longest sequence a live pod takes: the largest any publishes (capped by the
        max_model_len setting); before any has published, the setting or config.json's."""
        published = self.pods.max_model_len() if self.pods else 0
        if self.s.max_model_len:
            return min(published, self.s.max_model_len) if published else self.s.max_model_len
        return published or self.config_max_model_len

    def output_budget(self, prompt_len: int, requested: int | None, param: str) -> int:
        """max_tokens for the pod: as requested, or default_max_tokens or the room left if less
        (never past the operator's max_tokens_limit); 400 for a prompt no live pod takes, or
        one with no room for it."""
        limit = self.max_model_len
        refusal = prompt_length_error(prompt_len, limit)  # the words a pod would use
        if refusal is not None:
            code = "context_length_exceeded" if prompt_len else None
            raise APIError(400, refusal, param=param, code=code)
        max_tokens = requested
        if requested is None:
            max_tokens = limit - prompt_len
            if self.s.default_max_tokens:
                max_tokens = min(max_tokens, self.s.default_max_tokens)
        if prompt_len + max_tokens > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} "
                "for the completion). Please reduce the prompt or the completion length.",
                param=param,
                code="context_length_exceeded",
            )
        cap = self.s.max_tokens_limit
        return min(max_tokens, cap) if cap else max_tokens

    def jobs(self, req, prompts: list[list[int]], param: str,
             structured_output: dict | None = None, tenant: str | None = None) -> list[Job]:
        """One job per choice: req.n for each prompt, in the response's order.
        `structured_output`: a grammar the request's tools force (tools.py), if any.
        `tenant`: the API key's digest, salting the cache with --cache-salt-by-key."""
        salt = self.cache_salt(req.cache_salt, tenant)
        jobs = []
        for pi, ids in enumerate(prompts):
            max_tokens = self.output_budget(len(ids), req.output_limit, param)
            for i in range(req.n):
                out = ChoiceOutput(self.tokenizer, ids, req.stop, req.pod_logprobs is not None)
                sp = self.sampling(req, max_tokens, i)
                if structured_output is not None:
                    sp = dataclasses.replace(sp, structured_output=structured_output)
                if salt is not None:
                    sp = dataclasses.replace(sp, cache_salt=salt)
                jobs.append(Job(pi * req.n + i, pi, ids, sp, out))
        return jobs

    def cache_salt(self, salt: str | None, tenant: str | None) -> str | None:
        """The request's salt; with --cache-salt-by-key, within its key's own space."""
        if self.s.cache_salt_by_key and tenant is not None:
            return f"key:{tenant}" + ("" if salt is None else f":{salt}")
        return salt

    def sampling(self, req, max_tokens: int, choice: int) -> SamplingParams:
        """What the pods sample with (they rebuild exactly this); EOS is theirs to handle. A
        field the request omits takes the server's default (defaults.py)."""
        given = {k: getattr(req, k) for k in defaults.OPERATOR_KEYS}
        try:
            sp = SamplingParams(
                max_tokens=max_tokens,
                **{k: self.sampling_defaults[k] if v is None else v for k, v in given.items()},
                seed=None if req.seed is None else req.seed + choice,
                stop_token_ids=list(req.stop_token_ids or []),
                ignore_eos=req.ignore_eos,
                logprobs=req.pod_logprobs,
                logit_bias=req.logit_bias,
                structured_output=req.response_format.structured_output() if req.response_format else None,
            )
        except ValueError as e:
            param = "logit_bias" if "logit_bias" in str(e) else None
            raise APIError(400, str(e), param=param) from e
        vocab = self.tokenizer.vocab_size
        if sp.logit_bias and max(sp.logit_bias) >= vocab:
            raise APIError(400, f"logit_bias keys must be token ids below {vocab}, got {max(sp.logit_bias)}.",
                           param="logit_bias")
        return sp

    # -- running one choice -----------------------------------------------------------------------

    async def run_job(self, rid: str, job: Job, queue: asyncio.Queue, clock: RequestClock,
                      gate: asyncio.Semaphore | None = None) -> None:
        """Serve one choice, putting ("delta", job, Delta) events and then ("done", job, None)
        or ("error", job, APIError) on `queue`. `gate`: the request's fan-out bound."""
        async def emit(delta) -> None:
            queue.put_nowait(("delta", job, delta))
            if queue.qsize() > STREAM_BUFFER:
                await self._wait_for_reader(queue)

        try:
            if gate is None:
                await self._serve(rid, job, emit, clock)
            else:
                async with gate:
                    await self._serve(rid, job, emit, clock)
            queue.put_nowait(("done", job, None))
        except ClientStalled as e:
            log.warning("request %s choice %d: %s; its pod stream is closed", rid, job.index, e)
            queue.put_nowait(("error", job, APIError(408, str(e), "timeout_error")))
        except APIError as e:
            queue.put_nowait(("error", job, e))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("request %s choice %d failed", rid, job.index)
            queue.put_nowait(("error", job, APIError(
                500, f"Internal error (request {rid}).", "server_error")))

    async def _wait_for_reader(self, queue: asyncio.Queue) -> None:
        """Backpressure: the client reads slower than the pod sends. Stop pulling from the pod
        (its stream then waits in TCP buffers, and the pod stops running ahead) until the
        client has taken half the buffer; ClientStalled after stream_stall_timeout_s."""
        deadline = time.monotonic() + self.s.stream_stall_timeout_s
        while queue.qsize() > STREAM_BUFFER // 2:
            if time.monotonic() >= deadline:
                raise ClientStalled(f"the client did not read its stream for {self.s.stream_stall_timeout_s:.0f} s")
            await asyncio.sleep(_STALL_POLL_S)  # a stalled stream costs a timer, nothing more

    async def _serve(self, rid: str, job: Job, emit, clock: RequestClock) -> None:
        tried: set[str] = set()
        last: Exception | None = None
        for attempt in range(self.s.retries + 1):
            total = len(job.prompt_ids) + job.sampling.max_tokens
            salt = job.sampling.cache_salt
            decision, view = await self.pods.pick(job.prompt_ids, tried, total_len=total, salt=salt)
            if view is None:
                if last is None:
                    raise APIError(
                        503,
                        "No pod is ready to serve this model.",
                        "server_error",
                        code="no_pods_ready",
                    )
                break
            body = {
                "request_id": f"{rid}-{job.index}",
                "prompt_token_ids": job.prompt_ids,
                "sampling": _wire(job.sampling),
            }
            claims = []
            if view.record.role == "decode":
                # disaggregated: the decode pod has this prefill pod push the prompt's KV; with
                # no live prefill pod it prefills itself (the fallback, not an error)
                p_decision, p_view = await self.pods.pick(
                    job.prompt_ids, tried, PREFILL_ROLES, total_len=len(job.prompt_ids) + 1, salt=salt)
                if p_view is not None:
                    body["prefill"] = {"url": p_view.record.url}
                    claims.append(self.pods.dispatch(
                        p_decision.pod_id, len(job.prompt_ids) - p_decision.cached_tokens))
                    # the decode pod's heartbeat shows the request only once it runs there:
                    # until the first token it counts as one more running sequence, or a
                    # burst would all land on a decode pod that looks idle
                    w = self.s.weights
                    claims.append(self.pods.dispatch(decision.pod_id, round(w.decode * w.decode_tokens_per_seq)))
            if not claims:
                claims.append(self.pods.dispatch(
                    decision.pod_id, len(job.prompt_ids) - decision.cached_tokens))
            url = view.record.url
            stream = PodStream(self.pod_conns, url, body) if self.channels is None else self.channels.stream(url, body)
            answered = False
            try:
                await stream.open(self.s.first_token_timeout_s)
                last_line = time.monotonic()
                while True:
                    line = await stream.next(
                        self.s.token_timeout_s if answered else self.s.first_token_timeout_s
                    )
                    if line is None:
                        raise PodFailed(f"{view.record.url}: stream ended without a finish_reason")
                    if "error" in line:  # the pod gave up on the request (timeout, engine failure)
                        raise PodFailed(f"{view.record.url}: {line['error'].get('message', line['error'])}")
                    now = time.monotonic()
                    self.pods.heard_from(decision.pod_id)
                    if not answered:
                        if not line.get("token_ids") and line.get("finish_reason") == "abort":
                            raise PodFailed(f"{view.record.url}: aborted before the first token")
                        answered = True
                        for claim in claims:
                            self.pods.prefilled(claim)
                        if clock.first_token is None:
                            clock.first_token = now
                            self.metrics.ttft.observe(now - clock.start)
                    else:
                        self.metrics.itl.observe(now - last_line)
                    last_line = now
                    await emit(job.out.add(line))
                    if job.out.done:
                        return  # finally closes the stream: a stop string aborts the pod's work
            except PodRejected as e:
                err = e.body.get("error", {})
                raise APIError(
                    e.status,
                    err.get("message", str(e)),
                    err.get("type") or "invalid_request_error",
                    err.get("param"),
                    err.get("code"),
                ) from e
            except (PodFailed, TimeoutError) as e:
                if asyncio.current_task().cancelling():
                    raise asyncio.CancelledError from e  # a cancel that 3.11 turned into a timeout
                if answered:
                    # the pod's URL and the failure go to the log, not to the client
                    log.warning("request %s: pod %s failed while generating (%s)", rid, decision.pod_id, e)
                    raise APIError(
                        502,
                        f"The pod failed while generating (request {rid}).",
                        "server_error",
                        code="pod_failed",
                    ) from e
                tried.add(decision.pod_id)
                self.metrics.pod_retries.inc()
                log.warning(
                    "request %s: pod %s failed before the first token (%s); %s",
                    rid,
                    decision.pod_id,
                    e,
                    "retrying" if attempt < self.s.retries else "giving up",
                )
                last = e
            finally:
                for claim in claims:
                    self.pods.prefilled(claim)
                await stream.close()
        raise APIError(
            503, f"No pod could serve the request (request {rid}).", "server_error", code="pods_failed"
        )
