"""The HTTP API: invocation hooks, health, metrics, debug views.

Served on the daemon's unix socket (everything) and on TCP (``[server] host:port``): over TCP a
POST (a hook) gets 403 naming the socket, unless ``[server] tcp_hooks`` is on, and then 401
without ``Authorization: Bearer <token>`` (``guard_hooks``). Only who can open the socket (root
and ``socket_group``) or holds the token can resize containers.

* ``POST /v1/invocations`` ``{"function", "container", "user": {"cpu_cores", "mem_mb"},
  "input_size", "pending", "id"}`` (only ``container`` is required) -> 200 with the allocation
  applied; 400 with a reason on malformed input, 404 for an unknown container (or one whose cgroup
  went: deleted, or restarted under its name), 409 if the container already runs an invocation.
* ``POST /v1/invocations/{id}/end`` ``{"outcome": "success"|"failure", "duration_s"}`` -> 200
  with duration, RFET, reward, the resources given back and what the run held over its duration
  (``held_core_s``, ``held_mb_s``: the allocation in effect at each moment x how long, give-backs
  included; ``sidecar.engine.held_seconds``); 404 for an unknown invocation.
* ``GET /healthz`` (the loop ticks), ``/readyz`` (first sample done; names the model or the
  fallback), ``/metrics`` (Prometheus), ``/debug/allocations?function=&container=&limit=``,
  ``/debug/containers``, ``/debug/history?container=&limit=`` (one container's recent samples),
  ``/debug/profiles?function=&limit=`` (what the node learned about each function),
  ``/debug/model``, ``/debug/shipper``; ``/debug/`` is a page built on them
  (``sidecar/debug_page.html``: inline CSS and JS, nothing loaded from elsewhere).

Debug handlers read snapshots and never write cgroups.
"""

from __future__ import annotations

import itertools
import json
import math
import socket
import time
import unicodedata
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from sidecar.engine import MAX_FUNCTIONS, EngineError, effective
from sidecar.node import NODE, Node, StartResult
from sidecar.process import bearer_matches, json_response
from sidecar.runtimes.base import UserSize
from sidecar.sampler import HISTORY
from sidecar.units import MB, MIN_USER_CORES, min_user_mem_mb

_START_KEYS = {"function", "container", "user", "input_size", "pending", "id"}
_END_KEYS = {"outcome", "duration_s"}
MAX_PENDING = 1_000_000
MAX_INPUT_SIZE = 1e15
MAX_DURATION_S = 86_400.0


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class HookAccess:
    socket: str
    """The unix socket the hooks are served on (named in 403 answers)."""
    tcp_token: str
    """Bearer token of hooks over TCP; empty = hooks over TCP are refused."""


HOOK_ACCESS = web.AppKey("hook_access", HookAccess)


def _error(status: int, reason: str, headers: dict | None = None) -> web.Response:
    resp = json_response({"error": reason}, status)
    if headers:
        resp.headers.update(headers)
    return resp


def _over_unix(request: web.Request) -> bool:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


@web.middleware
async def guard_hooks(request: web.Request, handler: Any) -> web.StreamResponse:
    """Reads are open on both listeners; anything else over TCP needs the opt-in and the token."""
    if request.method in ("GET", "HEAD") or _over_unix(request):
        return await handler(request)
    access = request.app[HOOK_ACCESS]
    if not access.tcp_token:
        return _error(
            403,
            f"hooks are served on the unix socket {access.socket or '(none configured)'} "
            "(curl --unix-socket PATH http://localhost/v1/invocations ...); over TCP only with "
            "[server] tcp_hooks = true and a bearer token",
        )
    if not bearer_matches(request, access.tcp_token):
        return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _body(request: web.Request, allowed: set[str], required: bool = True) -> dict:
    raw = await request.read()
    if not raw:
        if required:
            raise BadRequest("empty body: expected a JSON object")
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadRequest("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return data


def _text(v: str) -> bool:
    """Whether ``v`` is UTF-8 text without control characters: a name goes into metric labels,
    logs and the spool, none of which can take a lone surrogate (JSON ``"\\ud800"``)."""
    try:
        v.encode()
    except UnicodeEncodeError:
        return False
    return not any(unicodedata.category(c) == "Cc" for c in v)


def _str(data: dict, key: str, required: bool = False) -> str | None:
    v = data.get(key)
    if v is None:
        if required:
            raise BadRequest(f"'{key}' is required")
        return None
    if not isinstance(v, str) or not v or len(v) > 512:
        raise BadRequest(f"'{key}' must be a non-empty string (at most 512 characters)")
    if not _text(v):
        raise BadRequest(f"'{key}' must be UTF-8 text without control characters")
    return v


def _num(
    data: dict,
    key: str,
    lo: float = 0.0,
    hi: float = math.inf,
    integer: bool = False,
    name: str | None = None,
) -> float | None:
    """``data[key]`` as a float in lo..hi (None when absent); BadRequest naming ``name``."""
    v = data.get(key)
    if v is None:
        return None
    kind = "an integer" if integer else "a finite number"
    problem = BadRequest(f"'{name or key}' must be {kind} in {lo:g}..{hi:g}")
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise problem
    try:
        f = float(v)
    except OverflowError:  # an integer beyond any float
        raise problem from None
    if not (math.isfinite(f) and lo <= f <= hi) or (integer and not f.is_integer()):
        raise problem
    return f


def _user(data: dict, node: Node) -> UserSize | None:
    """The user's size a hook reports, within what the kernel and this host can take."""
    u = data.get("user")
    if u is None:
        return None
    if not isinstance(u, dict):
        raise BadRequest("'user' must be an object {cpu_cores, mem_mb[, cpu_weight]}")
    unknown = sorted(set(u) - {"cpu_cores", "mem_mb", "cpu_weight"})
    if unknown:
        raise BadRequest(f"unknown field(s) in 'user': {', '.join(unknown)}")
    floor_mb = min_user_mem_mb(node.cfg.safeguard.mem_headroom_mb)
    eng = node.engine
    cpu = _num(u, "cpu_cores", MIN_USER_CORES, eng.host_cores, name="user.cpu_cores")
    mem = _num(u, "mem_mb", floor_mb, eng.host_mem_mb, name="user.mem_mb")
    if cpu is None or mem is None:
        raise BadRequest("'user' needs cpu_cores and mem_mb")
    weight = _num(u, "cpu_weight", 1, 10_000, integer=True, name="user.cpu_weight")
    return UserSize(cpu, int(mem * MB), int(weight) if weight is not None else 100)


def _start_response(node: Node, res: StartResult) -> dict:
    inv = res.invocation
    cores, mem = effective(inv.user, inv.target)
    return {
        "invocation": inv.id,
        "function": inv.function,
        "container": inv.container_id,
        "allocation": {
            "cpu_cores": cores,
            "mem_bytes": mem,
            "units": list(inv.alloc),
            "kind": inv.trace["kind"],
        },
        "allowed": inv.trace["allowed"],
        "user": {
            "cpu_cores": inv.user.cpu_cores,
            "mem_bytes": inv.user.mem_bytes,
            "units": list(inv.user_alloc),
        },
        "reason": inv.guard.reason,
        "model": inv.model,
        "applied": res.applied,
        "error": res.error,
        "decision_us": round(inv.decision_s * 1e6, 1),
        "actuation_us": round(res.actuation_s * 1e6, 1),
    }


async def start_invocation(request: web.Request) -> web.Response:
    node = request.app[NODE]
    try:
        data = await _body(request, _START_KEYS)
        container = _str(data, "container", required=True)
        function = _str(data, "function")
        inv_id = _str(data, "id")
        user = _user(data, node)
        input_size = _num(data, "input_size", hi=MAX_INPUT_SIZE)
        pending = _num(data, "pending", hi=MAX_PENDING, integer=True)
    except BadRequest as exc:
        return _error(400, str(exc))
    assert container is not None
    try:
        res = node.start(
            container,
            function=function,
            user=user,
            pending=int(pending or 0),
            input_size=input_size,
            invocation_id=inv_id,
        )
    except EngineError as exc:
        return _error(exc.status, str(exc))
    return json_response(_start_response(node, res))


async def end_invocation(request: web.Request) -> web.Response:
    node = request.app[NODE]
    inv_id = request.match_info["id"]
    try:
        data = await _body(request, _END_KEYS, required=False)
        outcome = _str(data, "outcome") or "success"
        if outcome not in ("success", "failure"):
            raise BadRequest("'outcome' must be 'success' or 'failure'")
        duration = _num(data, "duration_s", hi=MAX_DURATION_S)
    except BadRequest as exc:
        return _error(400, str(exc))
    try:
        ended = node.end(inv_id, outcome, duration)
    except EngineError as exc:
        return _error(exc.status, str(exc))
    return json_response(
        {
            "invocation": inv_id,
            "outcome": ended.outcome,
            "duration_s": ended.duration_s,
            "rfet": ended.rfet,
            "reward": ended.reward,
            "cpu_peak_cores": ended.invocation.cpu_peak_cores,
            "mem_peak_bytes": ended.invocation.mem_peak_bytes,
            "give_backs": sorted(ended.invocation.given_back),
            "held_core_s": ended.invocation.trace["held_core_s"],
            "held_mb_s": ended.invocation.trace["held_mb_s"],
        }
    )


async def healthz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    tick = node.cfg.sampler.tick_s
    age = time.monotonic() - node.last_tick_s if node.first_tick_done else None
    ok = age is None or age < max(2.0, 20 * tick)
    body = {"status": "ok" if ok else "stalled", "last_tick_age_s": age}
    return json_response(body, 200 if ok else 503)


async def readyz(request: web.Request) -> web.Response:
    node = request.app[NODE]
    ready = node.first_tick_done
    body = {
        "ready": ready,
        "containers": len(node.engine.containers),
        "model": node.models.current.id,
        "model_source": node.models.current.source,
        "model_note": node.models.ready_note(),
        "recovered": node.recovered,
    }
    return json_response(body, 200 if ready else 503)


async def debug_allocations(request: web.Request) -> web.Response:
    node = request.app[NODE]
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
        if not 1 <= limit <= 100_000:
            raise ValueError
    except ValueError:
        return _error(400, "'limit' must be an integer 1..100000")
    entries = node.engine.allocations(q.get("function"), q.get("container"), limit)
    return json_response({"count": len(entries), "allocations": entries})


async def debug_containers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return json_response({"containers": node.containers_view()})


async def debug_history(request: web.Request) -> web.Response:
    node = request.app[NODE]
    cid = request.query.get("container", "")
    if cid not in node.engine.containers:
        return _error(404, f"unknown container {cid!r}")
    try:
        limit = int(request.query.get("limit", str(HISTORY)))
        if not 1 <= limit <= HISTORY:
            raise ValueError
    except ValueError:
        return _error(400, f"'limit' must be an integer 1..{HISTORY}")
    wall = time.time() - time.monotonic()
    samples = node.sampler.history(cid, limit)
    return json_response(
        {
            "container": cid,
            "t": [round(t + wall, 3) for t, _, _ in samples],
            "cpu_cores": [c for _, c, _ in samples],
            "mem_bytes": [m for _, _, m in samples],
        }
    )


async def debug_profiles(request: web.Request) -> web.Response:
    """One function's profile (``function``), else the ``limit`` most recently used functions',
    most recent first: what the safeguard remembers and the policy's statistics."""
    node = request.app[NODE]
    q = request.query
    try:
        limit = int(q.get("limit", "100"))
        if not 1 <= limit <= MAX_FUNCTIONS:
            raise ValueError
    except ValueError:
        return _error(400, f"'limit' must be an integer 1..{MAX_FUNCTIONS}")
    if "function" in q:
        name = q["function"]
        functions = node.profiles_snapshot([name])["functions"]
        if name not in functions:
            return _error(404, f"unknown function {name!r}")
        return json_response({"function": name, **functions[name]})
    names = list(itertools.islice(reversed(node.engine.stats), limit))
    functions = node.profiles_snapshot(names)["functions"]
    return json_response({"count": len(functions), "functions": functions})


_PAGE = resources.files("sidecar").joinpath("debug_page.html")
# the page may talk to this server only: no CDN, no external script, style or font
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; connect-src 'self'; "
    "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:",
    "Cache-Control": "no-cache",
}


async def debug_page(request: web.Request) -> web.Response:
    return web.Response(
        text=_PAGE.read_text(), content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS
    )


async def debug_model(request: web.Request) -> web.Response:
    from sidecar.model_poller import POLLER

    node = request.app[NODE]
    status = node.models.status()
    poller = request.app.get(POLLER)
    status["registry"] = poller.status() if poller is not None else None
    return json_response(status)


async def debug_shipper(request: web.Request) -> web.Response:
    from sidecar.shipper import SHIPPER

    shipper = request.app.get(SHIPPER)
    body = shipper.status() if shipper is not None else {"enabled": False}
    body["spool"] = request.app[NODE].spool.stats().__dict__
    return json_response(body)


def add_routes(app: web.Application, registry: Any) -> None:
    app.router.add_post("/v1/invocations", start_invocation)
    app.router.add_post("/v1/invocations/{id}/end", end_invocation)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/debug/allocations", debug_allocations)
    app.router.add_get("/debug/containers", debug_containers)
    app.router.add_get("/debug/history", debug_history)
    app.router.add_get("/debug/profiles", debug_profiles)
    app.router.add_get("/debug/", debug_page)
    app.router.add_get("/debug/model", debug_model)
    app.router.add_get("/debug/shipper", debug_shipper)
