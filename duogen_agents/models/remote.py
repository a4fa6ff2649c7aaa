"""Models behind OpenAI-compatible servers, and ``build_planner``, which picks the planner a spec asks for.

``OpenAIPlanner`` is the ``Planner`` protocol over ``POST /v1/chat/completions`` (vLLM, SGLang, ``duogen
serve``): the conversation's images go as base64 PNG ``data:`` URLs in ``image_url`` parts, the action's
JSON schema as ``response_format = {"type": "json_schema", "json_schema": {"name", "schema", "strict":
true}}`` (or vLLM's ``structured_outputs`` / ``guided_json`` body fields, ``planner.structured_output``),
and with ``on_token`` the answer streams (``stream_options.include_usage`` for the token counts). The
server constrains decoding; what comes back is still checked here against the schema (``schema_problem``,
a small validator of the JSON-schema subset the actions use), so a server that ignored the schema gives
one clear error, never a half-understood action.

Why the ``openai`` client, not LangChain's ``ChatOpenAI`` (langchain-openai 1.7.4, read and run against these schemas):

- ``ChatOpenAI.with_structured_output(schema, method="json_schema")`` runs a plain dict schema through
  ``convert_to_openai_function``, which needs a top-level ``title`` and an object: it refuses our
  interleaved and draft schemas outright ("Unsupported function": their root is an ``anyOf``) and, with
  ``strict``, rewrites ``required`` / ``additionalProperties``; and it hands back the parsed object, where
  the graph needs the raw JSON text.
- ``ChatOpenAI.bind(response_format=...)`` passes the schema unchanged, but then streams through the
  ``openai`` client's beta ``chat.completions.stream`` parsing helper, sends ``max_completion_tokens``
  for ``max_tokens``, and turns our PIL images into LangChain blocks and back: one more layer between the
  planner and the wire, and nothing it adds that the graph uses (``ChatDuogen`` already is the LangChain
  face of every planner).
- The ``openai`` client itself gives what matters, tested: timeouts, retries with exponential backoff and
  jitter on 408/409/429/5xx and lost connections (honouring ``Retry-After``), SSE streaming with usage,
  ``seed`` / ``max_tokens`` / ``extra_body``, and multipart uploads of several images (``image[]``) for
  the image endpoint (``models/images/remote.py``). What it leaves open is added here, through its
  HTTP client's hooks: a deadline for each call (``Call``), and answers that are checked before use
  (``Malformed``).

The ``openai`` package comes with the ``serve`` extra (``pip install 'duogen-agents[serve]'``); nothing
here imports it, or torch, until a remote model is built.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import io
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

from duogen_agents.errors import ConfigError, GenerationError, ModelLoadError, PromptTooLongError
from duogen_agents.models.loading import first_line
from duogen_agents.models.protocols import ChatTurn, PlannerOutput, TokenCallback
from duogen_agents.presets import ImageSpec, PlannerSpec, userinfo_problem

# ---- the planner a spec asks for -------------------------------------------------------------------


def build_planner(spec: PlannerSpec, models_dir: Path | None = None, *, role: str = "planner") -> Any:
    """The ``Planner`` of ``spec``: a local ``TransformersPlanner`` or an ``OpenAIPlanner``. ``role``
    (``planner`` or ``critic``) names it in errors."""
    if spec.backend == "openai":
        return OpenAIPlanner.from_spec(spec, role)
    from duogen_agents.models.loading import quiet_libraries  # imports torch: local models only
    from duogen_agents.models.planner import TransformersPlanner

    quiet_libraries()
    return TransformersPlanner.from_spec(spec, models_dir)


# ---- the HTTP client, shared with the image endpoint --------------------------------------------------


# The base URLs of the remote models this process built. A server passes its errors on to its clients
# ("cannot reach the planner at http://10.0.0.7:8000/v1"), and they need not learn where its upstream
# servers are: ``withhold_upstreams`` takes these addresses out of a message before it leaves.
_UPSTREAMS: set[str] = set()
WITHHELD = "(address withheld)"


def withhold_upstreams(text: str) -> str:
    """``text`` with every address of this process's remote models replaced by ``WITHHELD``: the URL,
    its scheme and host, the host and port, the host as urllib3 quotes it (``host='planner'``), and a
    host name that cannot be a plain word of a message (an IP address or a dotted name; a bare name
    such as ``planner`` only with its port or quoted). Each is replaced only where it is whole
    (``10.0.0.7`` is not withheld out of ``10.0.0.70``), in any case (host names are)."""
    from urllib.parse import urlsplit

    forms: set[str] = set()
    for url in list(_UPSTREAMS):
        parts = urlsplit(url)
        host = parts.hostname or ""
        named = "." in host or ":" in host  # an IP address or a dotted name
        forms.update(f for f in (url, f"{parts.scheme}://{parts.netloc}") if f)
        if parts.netloc and (named or parts.netloc.lower() != host):  # a bare name only with its port
            forms.add(parts.netloc)
        if host:
            forms.update((f"host='{host}'", f'host="{host}"'))
        if named:
            forms.add(host)
    for form in sorted(forms, key=len, reverse=True):
        withheld = f"host='{WITHHELD}'" if form.startswith("host=") else WITHHELD
        text = re.sub(rf"(?<![\w.-]){re.escape(form)}(?![\w-]|\.\w)", withheld, text, flags=re.IGNORECASE)
    return text


def for_clients(line: str, log: Any) -> str:
    """``line`` as a server's client reads it (``withhold_upstreams``); the whole line goes to ``log``
    (the operator's) when something was withheld."""
    public = withhold_upstreams(line)
    if public != line:
        log.warning("%s", line)
    return public


# In what another process stored: any URL, a quoted host, an IPv4 address, a name with a port.
_ADDRESSES = re.compile(
    r"https?://[^\s'\"<>)]+"
    r"|(?<=host=')[^']+(?=')|(?<=host=\")[^\"]+(?=\")"
    r"|(?<![\w.-])\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?(?![\w-]|\.\w)"
    r"|(?<![\w.-])(?=[\w.-]*[a-z])[a-z0-9][\w.-]*:\d{2,5}(?![\w-]|\.\w)",  # a name: a letter in it
    re.IGNORECASE,
)


def withhold_urls(text: str) -> str:
    """``text`` with every address withheld (``_ADDRESSES``, and this process's remote models'): for
    what was stored by another process, whose remote models this one may not know (a session's failed
    turn, read back from a shared database)."""
    return _ADDRESSES.sub(WITHHELD, withhold_upstreams(text))


# The keys of the clients this process built: ``redact`` takes them out of any message (a server may
# echo the key it was sent: "invalid key Bearer s3cret").
_SECRETS: set[str] = set()
REDACTED = "***"


def redact(text: str) -> str:
    """``text`` with every API key of this process's remote models replaced by ``REDACTED``."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def make_client(spec: PlannerSpec | ImageSpec, role: str) -> tuple[Any, str]:
    """An ``openai.OpenAI`` client for ``spec``'s server and its URL. The key is read from the
    environment variable ``api_key_env`` names, never from ``OPENAI_API_KEY`` unasked; nor are
    ``OPENAI_ORG_ID`` and ``OPENAI_PROJECT_ID`` (the client would send them to the server as
    ``OpenAI-Organization`` / ``OpenAI-Project``). Its HTTP client enforces each call's ``deadline``."""
    try:
        import openai
    except ImportError:
        raise ModelLoadError(
            f"the remote {role} needs the openai package: pip install 'duogen-agents[serve]' (or pip install openai)"
        ) from None
    url = str(spec.base_url).rstrip("/")
    if problem := userinfo_problem(role, url):  # a spec made in code, past the preset's check
        raise ConfigError(problem)
    _UPSTREAMS.add(url)
    key = "EMPTY"  # what vLLM and SGLang expect when they run without --api-key
    if spec.api_key_env:
        key = os.environ.get(spec.api_key_env, "")
        if not key:
            raise ConfigError(
                f"{role}.api_key_env names the environment variable {spec.api_key_env}, which is not set; "
                f"export it with the key of {url}, or remove api_key_env from the preset"
            )
        _SECRETS.add(key)
    http = openai.DefaultHttpxClient(event_hooks={"request": [_on_request], "response": [_on_response]})
    client = openai.OpenAI(
        base_url=url, api_key=key, timeout=spec.timeout_s, max_retries=spec.max_retries, http_client=http
    )
    # None at construction means "read the environment": cleared after it, they are not sent. The
    # headers of OPENAI_CUSTOM_HEADERS are read at construction too, and could even replace the key
    # named by api_key_env: the client's own (private) copy of them is emptied, as nothing else can.
    client.organization = None
    client.project = None
    client._custom_headers = {}
    return client, url


# ---- one call's deadline ------------------------------------------------------------------------------


class Call:
    """The clock of one remote call and its retries (a planner request, an image, the model lookup).

    The client's ``timeout`` bounds each socket operation, not a call: a server that sends one byte a
    second, or SSE keepalive comments (``: ping``) and nothing else, holds a call open for ever, and the
    client honours a ``Retry-After`` of up to two minutes before each retry, whatever ``timeout_s`` says.
    So each call has a deadline, ``timeout_s x (max_retries + 1)`` from its start, which the HTTP
    client's hooks check before every attempt and after every piece of a body (``_on_request``,
    ``_on_response``), and a ``Retry-After`` wait is cut to ``timeout_s`` (and to what is left).

    A streamed answer must also move: from its headers, each step (text, a finish reason, the usage:
    ``progress``) must come within ``timeout_s`` of the one before, or the call fails there. Once its
    text flows, only this rule holds: a long answer that keeps coming is not cut at the deadline (its
    length is ``max_tokens``' and the server's speed, which the deadline cannot know). Its length is
    held instead: more text deltas than ``max_tokens`` allows (``_most_deltas``) end the call."""

    def __init__(self, spec: PlannerSpec | ImageSpec, *, stream: bool = False) -> None:
        self.timeout = float(spec.timeout_s)
        self.deadline_s = self.timeout * (spec.max_retries + 1)
        self.end = time.monotonic() + self.deadline_s
        self.stream = stream
        self.attempts = 0
        self.last: float | None = None  # a stream's last step (its headers, then each progress)
        self.flowing = False  # a stream's text has begun

    def left(self) -> float:
        """Seconds left before this call fails."""
        now = time.monotonic()
        if self.last is None:
            return self.end - now
        quiet = self.last + self.timeout - now
        return quiet if self.flowing else min(quiet, self.end - now)

    def expired(self) -> bool:
        """The whole deadline (not a stream's quiet time) has passed."""
        return time.monotonic() >= self.end

    def answered(self) -> None:
        """A response's headers came: a stream's quiet time counts from here."""
        if self.stream:
            self.last = time.monotonic()

    def progress(self) -> None:
        """A streamed answer moved (text, a finish reason, the usage)."""
        self.last = time.monotonic()
        self.flowing = True


_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar("duogen_remote_call", default=None)


@contextmanager
def deadline(spec: PlannerSpec | ImageSpec, *, stream: bool = False) -> Iterator[Call]:
    """Run the remote call in this block under a ``Call``'s deadline (the thread's requests see it)."""
    call = Call(spec, stream=stream)
    token = _CALL.set(call)
    try:
        yield call
    finally:
        _CALL.reset(token)


def _out_of_time(request: Any) -> BaseException:
    """The client's own timeout error: raised in a hook, it ends the call without another retry (the
    client passes its own errors on as they are) and reads as every timeout does (``describe_error``)."""
    import openai

    return openai.APITimeoutError(request=request)


def _on_request(request: Any) -> None:
    """Before each attempt: count it, fail if the deadline has passed (a retry's wait used it up), and
    give no socket operation more time than is left."""
    call = _CALL.get()
    if call is None:
        return
    left = call.left()
    if left <= 0:  # not sent: not an attempt
        raise _out_of_time(request)
    try:  # the client numbers its attempts; a redirect is not one
        call.attempts = max(call.attempts, int(request.headers.get("x-stainless-retry-count", "")) + 1)
    except ValueError:
        call.attempts += 1
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        request.extensions["timeout"] = {k: left if v is None else min(v, left) for k, v in timeouts.items()}


def _retry_after(headers: Any) -> float | None:
    """The wait a response asks for before a retry, in seconds (``retry-after-ms``, ``retry-after`` in
    seconds or as a date), or None."""
    import email.utils

    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) * scale
        except ValueError:
            pass
    try:
        when = email.utils.parsedate_tz(headers.get("retry-after") or "")
        return float(email.utils.mktime_tz(when) - time.time()) if when else None
    except (TypeError, ValueError, OverflowError):
        return None


def _on_response(response: Any) -> None:
    """Each response: the wait before a retry made ours (the server's ``Retry-After``, else the
    client's own backoff without its jitter), cut to ``timeout_s``; where even that does not fit in
    what is left, no retry (the call fails now, with the server's answer). A streamed answer's reads
    get ``timeout_s`` each again (a late retry's connection was given only what was left), and its body
    is read under the deadline (``_watched_type``)."""
    call = _CALL.get()
    if call is None:
        return
    status = response.status_code
    if status < 400:
        call.answered()
        timeouts = response.request.extensions.get("timeout")
        if call.stream and isinstance(timeouts, dict):
            timeouts["read"] = call.timeout  # a flowing stream is held to its quiet time, not the deadline
    else:  # any error the client may retry (it retries a 4xx that says x-should-retry: true)
        wait = _retry_after(response.headers)
        if wait is None or wait <= 0:
            wait = min(0.5 * 2 ** max(call.attempts - 1, 0), 8.0)  # the client's backoff, at most
        wait = min(wait, call.timeout)
        if wait >= call.end - time.monotonic():
            response.headers["x-should-retry"] = "false"
        else:
            response.headers["retry-after-ms"] = f"{max(wait * 1000, 1):.0f}"
    response.stream = _watched_type()(response.stream, call, response.request)


@functools.cache
def _watched_type() -> type:
    """The type of a watched response body, made when first needed (httpx2 comes with openai, which is
    imported only once a remote model is built)."""
    import httpx2

    class Watched(httpx2.SyncByteStream):
        """A response body read under a ``Call``: a piece that comes after the call's time is up ends it
        (a body dripping a byte a second, a stream of keepalive comments)."""

        def __init__(self, inner: Any, call: Call, request: Any) -> None:
            self._inner = inner
            self._call = call
            self._request = request

        def __iter__(self) -> Iterator[bytes]:
            for piece in self._inner:
                if self._call.left() <= 0:
                    raise _out_of_time(self._request)
                yield piece

        def close(self) -> None:
            self._inner.close()

        @property
        def elapsed(self) -> Any:  # what httpx2 reads back from the stream it made
            return getattr(self._inner, "elapsed", None)

    return Watched


_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>", re.IGNORECASE | re.DOTALL)
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # colours too


def one_line(text: str, limit: int = 200) -> str:
    """A server's text as part of a message: HTML tags dropped (an error page of a proxy), control
    characters removed, on one line, its first ``limit`` characters."""
    import html

    text = text[: limit * 50]  # a 5 MB body is not read to the end for 200 characters
    if "<" in text:
        text = html.unescape(_TAGS.sub(" ", text))
    text = " ".join(_CONTROL.sub("", text).split())
    return text[:limit] + ("..." if len(text) > limit else "")


def _status_detail(e: Any) -> str:
    body = getattr(e, "body", None)
    detail: Any = None
    if isinstance(body, Mapping):
        err = body.get("error", body)
        detail = err.get("message") or err.get("detail") if isinstance(err, Mapping) else err
        detail = detail or body.get("detail") or body.get("message")
    elif isinstance(body, str):  # a plain-text or HTML body (the client keeps only "Error code: 400")
        detail = one_line(body)
    text = one_line(str(detail if detail else getattr(e, "message", e)), 300)
    return text or "(an empty body)"


def describe_error(
    e: BaseException, what: str, url: str, spec: PlannerSpec | ImageSpec, call: Call | None = None
) -> str:
    """One line for a failed request: what failed, where, and what to try; no API key of this process
    in it (``redact``: a server may echo the key it was sent). With the ``call`` it failed in, the
    attempts counted are the ones made, and a timeout names the deadline when that is what passed."""
    import openai

    if call is not None:
        tries = f" (tried {call.attempts} times)" if call.attempts > 1 else ""
    else:
        tries = f" (tried {spec.max_retries + 1} times)" if spec.max_retries else ""
    if isinstance(e, openai.APITimeoutError) or "timeout" in type(e).__name__.lower():
        within = call.deadline_s if call is not None and call.expired() else spec.timeout_s
        line = (
            f"the {what} at {url} did not answer within {within:g} s{tries}; "
            "check the server, or raise timeout_s in the preset"
        )
    elif isinstance(e, openai.APIConnectionError) or _is_transport_error(e):
        cause = e.__cause__ or e.__context__ or e
        reason = " ".join(str(cause).split()) or type(cause).__name__
        line = f"cannot reach the {what} at {url}{tries}: {reason}; is the server running at that address?"
    elif isinstance(e, openai.APIStatusError):
        retried = tries if e.status_code in (408, 409, 429) or e.status_code >= 500 or call is not None else ""
        line = f"the {what} at {url} answered HTTP {e.status_code}{retried}: {_status_detail(e)}"
    else:
        line = f"the {what} at {url} failed: {' '.join(str(e).split()) or type(e).__name__}"
    return redact(line)


def _is_transport_error(e: BaseException) -> bool:
    """An error of the HTTP stack under the client (raised while a stream is read)."""
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2") or isinstance(
        e, ConnectionError
    )


class Malformed(Exception):
    """A response that is not what the API promises (not JSON, not UTF-8, a field of the wrong type):
    its text says what was wrong, for ``the ... at URL sent a malformed response: ...``."""


def parsed(raw: Any) -> Any:
    """The object of a raw response (``with_raw_response``), or ``Malformed``: a body that is not
    UTF-8 or not JSON (the client hands back the text of a non-JSON body, e.g. a proxy's HTML page)."""
    try:
        value = raw.parse()
    except UnicodeDecodeError:
        raise Malformed("a body that is not UTF-8 text") from None
    except ValueError as e:
        raise Malformed(f"a body that is not JSON ({e})") from None
    if isinstance(value, (str, bytes)):
        kind = raw.headers.get("content-type") or "no content-type"
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        raise Malformed(f"a body that is not JSON ({kind}): {one_line(text, 80)!r}")
    return value


def served_model(client: Any, url: str, role: str, spec: PlannerSpec | ImageSpec) -> str:
    """The first model the server lists at ``/v1/models`` (asked once, when the model is built); on a
    ``duogen serve``, which lists its planner and its image model, the one of this ``role``."""
    import openai

    skip = f" (set {role}.model in the preset to skip this lookup)"
    with deadline(spec) as call:
        try:
            raw = client.models.with_raw_response.list()
        except (openai.APIError, OSError) as e:
            raise ModelLoadError(describe_error(e, f"{role} server", url, spec, call) + skip) from None
        except Exception as e:
            if _is_transport_error(e):
                raise ModelLoadError(describe_error(e, f"{role} server", url, spec, call) + skip) from None
            raise
    try:
        try:
            listing = raw.http_response.json()
        except UnicodeDecodeError:
            raise Malformed("a body that is not UTF-8 text") from None
        except ValueError:
            kind = raw.headers.get("content-type") or "no content-type"
            raise Malformed(f"a body that is not JSON ({kind}): {one_line(raw.http_response.text, 80)!r}") from None
        data = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) for m in data):
            raise Malformed("no list of models in its 'data'")
        if any(not isinstance(m.get("id"), str) or not m["id"] for m in data):
            raise Malformed("a model without an id")
    except Malformed as e:
        raise ModelLoadError(
            redact(f"the {role} server at {url} sent a malformed response at /models: {e}") + skip
        ) from None
    if not data:
        raise ModelLoadError(f"the {role} server at {url} lists no model at /models; set {role}.model in the preset")
    want = "image" if role == "image" else "planner"
    for m in data:
        if m.get("duogen_role") == want:
            return str(m["id"])
    return str(data[0]["id"])


def png_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---- checking an answer against its schema ---------------------------------------------------------------

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: ``true`` is not ``1``."""
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


def _pattern_ok(pattern: str, value: str) -> bool:
    """A string pattern, read as JSON Schema reads it (on the value) or as the grammar engines that
    match it on the JSON text between the quotes do (ours, xgrammar): either reading passes."""
    try:
        regex = re.compile(pattern)
    except re.error:
        return True  # an ECMA-only construct: the server checked it, we cannot
    return bool(regex.search(value) or regex.search(json.dumps(value, ensure_ascii=False)[1:-1]))


def schema_problem(value: Any, schema: Any, root: Any = None, path: str = "$") -> str | None:
    """What is wrong with ``value`` under the JSON ``schema``, or None. Covers what the action and
    tool schemas use (type, const, enum, anyOf/oneOf/allOf, properties, required, additionalProperties,
    items, min/maxItems, min/maxLength, pattern, minimum/maximum, local ``$ref``); other keywords pass."""
    root = schema if root is None else root
    if schema is True or schema is None:
        return None
    if schema is False:
        return f"{path} is not allowed"
    if not isinstance(schema, Mapping):
        return None
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for key in [k for k in ref[1:].split("/") if k]:
            target = target.get(key.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, Mapping) else {}
        if problem := schema_problem(value, target, root, path):
            return problem
    for key in ("anyOf", "oneOf"):
        if key in schema:
            problems = [schema_problem(value, s, root, path) for s in schema[key]]
            if all(p is not None for p in problems):
                closest = max(problems, key=lambda p: len(str(p).split(" ", 1)[0]))
                return f"{path} matches none of the {len(problems)} allowed shapes (closest: {closest})"
    for sub in schema.get("allOf", []):
        if problem := schema_problem(value, sub, root, path):
            return problem
    if "const" in schema and not _same(value, schema["const"]):
        return f"{path} must be {json.dumps(schema['const'])}"
    if "enum" in schema and not any(_same(value, v) for v in schema["enum"]):
        return f"{path} must be one of {json.dumps(schema['enum'])[:200]}"
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_TYPES.get(k, lambda _v: True)(value) for k in kinds):
            return f"{path} must be of type {'/'.join(kinds)}, not {type(value).__name__}"
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            return f"{path} is longer than {schema['maxLength']} characters"
        if "minLength" in schema and len(value) < schema["minLength"]:
            return f"{path} is shorter than {schema['minLength']} characters"
        if isinstance(schema.get("pattern"), str) and not _pattern_ok(schema["pattern"], value):
            return f"{path} does not match the pattern {schema['pattern']!r}"
    elif _TYPES["number"](value):
        for key, bad in (
            ("minimum", lambda v, b: v < b),
            ("maximum", lambda v, b: v > b),
            ("exclusiveMinimum", lambda v, b: v <= b),
            ("exclusiveMaximum", lambda v, b: v >= b),
        ):
            if isinstance(schema.get(key), (int, float)) and bad(value, schema[key]):
                return f"{path} = {value} is out of range ({key} {schema[key]})"
    elif isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            return f"{path} has more than {schema['maxItems']} items"
        if "minItems" in schema and len(value) < schema["minItems"]:
            return f"{path} has fewer than {schema['minItems']} items"
        prefix = schema.get("prefixItems") or (schema["items"] if isinstance(schema.get("items"), list) else [])
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else (schema.get("items") if not prefix else True)
            if problem := schema_problem(item, sub, root, f"{path}[{i}]"):
                return problem
    elif isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                return f"{path} lacks the required key {key!r}"
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = props.get(key, extra)
            if sub is False:
                return f"{path} has the key {key!r}, which the schema does not allow"
            if problem := schema_problem(item, sub, root, f"{path}.{key}"):
                return problem
    return None


# ---- the planner ----------------------------------------------------------------------------------------


def chat_messages(conversation: Sequence[ChatTurn]) -> list[dict[str, Any]]:
    """The conversation as OpenAI chat messages: a text-only turn as one string (its parts joined as
    the local planner's chat template joins them), a turn with images as ``text`` and ``image_url``
    parts in order. Images the agent drew stay in their assistant turns, as the local planner sees
    them (vLLM and SGLang accept image parts in any role)."""
    messages: list[dict[str, Any]] = []
    for turn in conversation:
        parts = turn["content"]
        if all(p["type"] == "text" for p in parts):
            content: Any = "".join(p["text"] for p in parts)  # type: ignore[typeddict-item]
        else:
            content = [
                {"type": "image_url", "image_url": {"url": png_data_url(p["image"])}}  # type: ignore[typeddict-item]
                if p["type"] == "image"
                else {"type": "text", "text": p["text"]}  # type: ignore[typeddict-item]
                for p in parts
            ]
        messages.append({"role": turn["role"], "content": content})
    return messages


def _schema_fields(spec: PlannerSpec, schema: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(request arguments, extra body fields) that carry ``schema`` the way ``spec`` says."""
    if spec.structured_output == "structured_outputs":
        return {}, {"structured_outputs": {"json": schema}}
    if spec.structured_output == "guided_json":
        return {}, {"guided_json": schema}
    json_schema = {"name": "action", "schema": schema, "strict": True}
    return {"response_format": {"type": "json_schema", "json_schema": json_schema}}, {}


class OpenAIPlanner:
    """A planner behind an OpenAI-compatible chat-completions server. Build it with ``from_spec``.

    Stateless between calls (the server keeps its own prefix cache), so one instance serves any
    number of threads and sessions at once; ``cache_key`` (the session) goes out as
    ``prompt_cache_key``, which ``duogen serve`` keeps the session's KV cache under."""

    def __init__(self, client: Any, spec: PlannerSpec, url: str, role: str = "planner") -> None:
        self.client = client
        self.role = role
        self.spec = spec  # with ``model`` filled in: the name the server serves
        self.url = url
        self.model_name = str(spec.model)

    @classmethod
    def from_spec(cls, spec: PlannerSpec, role: str = "planner") -> OpenAIPlanner:
        client, url = make_client(spec, role)
        model = spec.model or served_model(client, url, role, spec)
        return cls(client, spec.model_copy(update={"model": model}), url, role)

    def forget(self, cache_key: str | None = None) -> None:
        """Nothing is kept here between calls."""

    def generate(
        self,
        conversation: Sequence[ChatTurn],
        schema: dict[str, Any] | None,
        *,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        on_token: TokenCallback | None = None,
        cache_key: str | None = None,
        client_schema: bool = False,
    ) -> PlannerOutput:
        """Continue ``conversation`` under the JSON ``schema`` (or free text: None) on the server
        (which applies its own limits to a client's schema: ``client_schema`` changes nothing here)."""
        import openai

        spec = self.spec
        limit = max_new_tokens or spec.max_new_tokens
        kwargs: dict[str, Any] = {
            "model": self.model_name,
            "messages": chat_messages(conversation),
            "max_tokens": limit,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
        }
        extra = dict(spec.extra_body or {})
        if seed is not None:
            kwargs["seed"] = seed
        if cache_key:  # the session: OpenAI's prompt-cache routing field (duogen serve keeps its KV cache by it)
            kwargs["prompt_cache_key"] = cache_key
        if schema is not None:
            fields, body = _schema_fields(spec, schema)
            kwargs.update(fields)
            extra.update(body)
        if extra:
            kwargs["extra_body"] = extra
        with deadline(spec, stream=on_token is not None) as call:
            try:
                if on_token is None:
                    text, finish, usage, deltas = self._complete(kwargs)
                else:
                    text, finish, usage, deltas = self._stream(kwargs, on_token, call, limit)
            except (openai.APIError, OSError) as e:
                if _context_exceeded(e):  # a 400, or an error event in the stream: the graph leaves out old turns
                    raise PromptTooLongError(redact(f"the {self.role} at {self.url}: {first_line(e)}")) from None
                raise GenerationError(describe_error(e, self.role, self.url, spec, call)) from None
            except Malformed as e:
                raise GenerationError(redact(f"the {self.role} at {self.url} sent a malformed response: {e}")) from None
            except Exception as e:
                if _is_transport_error(e):
                    raise GenerationError(describe_error(e, self.role, self.url, spec, call)) from None
                raise
        if schema is not None:
            self._check(text, schema, finish, limit)
        completion = _count(getattr(usage, "completion_tokens", None))
        prompt = _count(getattr(usage, "prompt_tokens", None))
        cached = _count(getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None))
        return PlannerOutput(
            text=text,
            # Without usage (a server that sends none), each streamed delta counts as a token, or
            # every four characters do: the turn's token budget still ends the turn.
            num_tokens=completion if completion is not None else deltas or max(1, len(text) // 4),
            prompt_tokens=prompt or 0,
            prefill_tokens=prompt - cached if prompt is not None and cached is not None else None,
            complete=finish != "length",
        )

    def _complete(self, kwargs: dict[str, Any]) -> tuple[str, str | None, Any, int]:
        response = parsed(self.client.chat.completions.with_raw_response.create(**kwargs))
        choices = getattr(response, "choices", None)
        if not isinstance(choices, list):
            raise Malformed("no list of choices")
        if not choices:
            raise GenerationError(f"the {self.role} at {self.url} answered with no choices")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if message is None or not isinstance(content, (str, type(None))):
            raise Malformed(
                "its first choice has no message" if message is None else "a message whose content is not text"
            )
        return content or "", _finish_reason(choices[0]), getattr(response, "usage", None), 0

    def _stream(
        self, kwargs: dict[str, Any], on_token: TokenCallback, call: Call, limit: int
    ) -> tuple[str, str | None, Any, int]:
        """The answer as it streams, each text delta handed to ``on_token``. Only a stream that says how
        it finished (``finish_reason``) is a whole answer, or one the caller ended (``on_token``
        returned True): one cut off without it (a server that died, a proxy that closed the
        connection) is an error, not a shorter answer. Nor is one that goes on past ``limit`` tokens:
        a server that ignores ``max_tokens`` (or loops) would hold the call for as long as it flows."""
        most = _most_deltas(limit)
        raw = self.client.chat.completions.with_raw_response.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        kind = raw.headers.get("content-type") or "no content-type"
        if not kind.lower().startswith("text/event-stream"):  # e.g. a proxy's login page, with 200
            raw.http_response.close()
            raise Malformed(f"a body of {kind} to a streamed request, not text/event-stream")
        stream = raw.parse()
        pieces: list[str] = []
        finish: str | None = None
        usage: Any = None
        chunks = iter(stream)
        try:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    break
                except UnicodeDecodeError:
                    raise Malformed("an event that is not UTF-8 text") from None
                except ValueError as e:  # the JSON of an event
                    raise Malformed(f"an event that is not JSON ({e})") from None
                moved, texts, chunk_usage, chunk_finish = _read_chunk(chunk)
                if moved:
                    call.progress()
                usage = chunk_usage if chunk_usage is not None else usage
                finish = chunk_finish or finish
                for delta in texts:
                    pieces.append(delta)
                    if len(pieces) > most:
                        raise GenerationError(
                            f"the {self.role} at {self.url} went on streaming past max_tokens = {limit} (more than "
                            f"{most} text deltas); check that the server honours max_tokens"
                        )
                    if on_token(delta) is True:
                        # The caller has what it wants (a stop sequence): closing the stream ends the
                        # server's decoding. Its usage never comes, so each delta counts as a token.
                        return "".join(pieces), finish, usage, len(pieces)
                if moved and texts:
                    call.progress()  # the caller's time with the text is not the server's silence
        finally:
            stream.close()
        if finish is None:
            raise GenerationError(
                f"the {self.role} at {self.url}: the stream ended before the answer finished (no finish_reason "
                f"after {len(pieces)} text deltas); check the server, or the proxy in front of it"
            )
        return "".join(pieces), finish, usage, len(pieces)

    def _check(self, text: str, schema: dict[str, Any], finish: str | None, limit: int) -> None:
        where = f"the {self.role} at {self.url} ({self.model_name}) returned an invalid action"
        try:
            value = json.loads(text)
        except ValueError as e:
            if finish == "length":
                raise GenerationError(
                    f"{where}: it stopped at max_tokens = {limit} before the JSON was complete; "
                    f"raise {self.role}.max_new_tokens in the preset"
                ) from None
            shown = text[:80] + ("..." if len(text) > 80 else "")
            raise GenerationError(
                f"{where}: not valid JSON ({e}): {shown!r}; does the server honour {self.role}.structured_output = "
                f"{self.spec.structured_output!r}?"
            ) from None
        if problem := schema_problem(value, schema):
            raise GenerationError(
                f"{where}: it does not match the action schema ({problem}); does the server honour "
                f"{self.role}.structured_output = {self.spec.structured_output!r}?"
            )


def _most_deltas(limit: int) -> int:
    """The text deltas a stream of at most ``limit`` tokens may send: a server sends one per token or
    fewer (several tokens a delta), but allow twice as many, for one that splits a token's characters."""
    return 2 * limit + 16


def _count(value: Any) -> int | None:
    """A token count of the usage, or None where it is not one (a server's null or string)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _finish_reason(choice: Any) -> str | None:
    finish = getattr(choice, "finish_reason", None)
    if finish is not None and not isinstance(finish, str):
        raise Malformed("a finish_reason that is not a string")
    return finish or None


def _read_chunk(chunk: Any) -> tuple[bool, list[str], Any, str | None]:
    """(whether it moved the answer, its text deltas, its usage, its finish reason) of a stream's
    chunk, or ``Malformed``. Moving is anything but an empty delta: text (or reasoning, or a tool
    call), a finish reason, the usage; a server that sends only empty deltas is as still as one that
    sends keepalive comments."""
    choices = getattr(chunk, "choices", None)
    usage = getattr(chunk, "usage", None)
    if not isinstance(choices, list) and not (choices is None and usage is not None):
        raise Malformed("an event without a list of choices")
    texts: list[str] = []
    finish: str | None = None
    moved = usage is not None
    for choice in choices or []:
        delta = getattr(choice, "delta", None)
        content = getattr(delta, "content", None)
        if not isinstance(content, (str, type(None))):
            raise Malformed("a delta whose content is not text")
        if content:
            texts.append(content)
        fields = {**(getattr(delta, "__dict__", None) or {}), **(getattr(delta, "model_extra", None) or {})}
        moved = moved or any(value for name, value in fields.items() if name != "role")
        finish = _finish_reason(choice) or finish
        moved = moved or finish is not None
    return moved, texts, usage, finish


def _context_exceeded(e: Any) -> bool:
    """A 400 that says the messages do not fit the served model's context: OpenAI's and duogen serve's
    ``context_length_exceeded`` code, or vLLM's and SGLang's wording."""
    body = getattr(e, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else getattr(e, "code", None)
    return code == "context_length_exceeded" or "maximum context length" in str(e).lower()
