"""The balancer in front of many instances: the routing rule and its HAProxy form.

Routing (``route`` is the one definition; ``haproxy_config`` computes the same
in HAProxy's rules, and the cluster tests hold one to the other):

- the session id of a request is the ``/sessions/{id}`` path segment
  (percent-decoded once, as the server decodes it) or, for a create-by-id
  (``POST /sessions``), the ``session_id`` of its JSON body;
- an id of 32 lowercase hex digits whose first 3 are a configured instance
  tag goes to that instance: minted ids go back to the instance that minted
  them;
- any other valid id goes to instance ``crc32(id) mod N`` (HAProxy's
  ``crc32`` converter is ``zlib.crc32``): the same function for path and body;
- a mint (``POST /sessions`` without an id), an id no instance would accept,
  ``/health`` and ``/metrics`` go to any healthy instance (an invalid id is
  answered there with the server's own 400);
- ``/instances/{k}/health`` and ``/instances/{k}/metrics`` go to instance k
  (its index in the list); ``/balancer/metrics`` is HAProxy's own Prometheus
  exporter.

No failover, ever: each instance is a backend with a single server and no
redispatch, so a dead instance's ids answer 503 (502 if it died while
answering) until it is back; they are never served by another instance.
N and the order of the instances must stay fixed while sessions live:
``mod N`` is not a consistent hash.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from rollout_sessions.config import Settings
from rollout_sessions.web import errors

MINTED = re.compile(r"[0-9a-f]{32}")
VALID_ID = "^[A-Za-z0-9._~:-]{1,128}$"  # the registry's id alphabet and length
BUFFER_BYTES = 65536  # HAProxy's tune.bufsize: the most of a create body it reads
# One HAProxy thread keeps up with five instances at full load (its share of
# an instance's CPU per turn: benchmarks/RESULTS.md, "Cluster"). More threads
# than the load needs cost more per turn: idle threads contend for the cores.
INSTANCES_PER_THREAD = 5


def balancer_threads(instances: int) -> int:
    """HAProxy's ``nbthread`` for a cluster of ``instances``."""
    return max(1, -(-instances // INSTANCES_PER_THREAD))


# What the balancer itself refuses (where it cannot route exactly), and why.
BALANCER_ERRORS = {
    "create_too_large": (413, "create body too large for the balancer to read"),
    "create_chunked": (411, "POST /sessions with a body needs Content-Length"),
    "duplicate_key": (400, "ambiguous create body: duplicate session_id key"),
    "escaped_key": (400, "ambiguous create body: escaped characters in a key"),
    "unreadable_id": (400, "create body: session_id not readable by the balancer"),
    "no_instance": (404, "no such instance"),
}
# HAProxy's own answers, in the server's {"error": ...} shape.
ERROR_PAGES = {
    408: "request not received in time",
    502: "bad gateway: the instance for this request failed",
    503: "service unavailable: the instance for this request is down",
    504: "gateway timeout: the instance for this request did not answer in time",
}


@dataclass(frozen=True, slots=True)
class Instance:
    tag: int
    host: str
    port: int

    @property
    def prefix(self) -> str:
        """What the ids this instance mints begin with."""
        return f"{self.tag:03x}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def named(self) -> bool:
        """A host name (resolved again while running), not an IP address."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False


def route(session_id: str, tags: Sequence[int]) -> int:
    """The index of the instance that holds ``session_id`` (a valid id)."""
    if MINTED.fullmatch(session_id):
        prefix = int(session_id[:3], 16)
        if prefix in tags:
            return list(tags).index(prefix)
    return zlib.crc32(session_id.encode()) % len(tags)


def haproxy_config(instances: Sequence[Instance], bind: str, port: int, settings: Settings) -> str:
    """The configuration: routing as ``route`` says, limits and timeouts from ``settings``."""
    if not instances:
        raise ValueError("a cluster needs at least one instance")
    n = len(instances)
    tags = [i.tag for i in instances]
    if len(set(tags)) != n:
        raise ValueError(f"instance tags must be unique, got {tags}")
    # Longer than any upstream call, so an answer is never cut by the balancer.
    server_timeout = int(settings.upstream_timeout_s) + 10
    too_large = errors.body_too_large(settings.max_body_bytes)
    # Names (a StatefulSet's pods) can change address when they restart.
    dns = " resolvers dns init-addr last,libc,none" if any(i.named for i in instances) else ""
    lines = [
        "# rollout-sessions cluster: generated (rollout-sessions cluster-config); do not edit.",
        "global",
        "    log stdout format raw local0 info",
        f"    hard-stop-after {server_timeout + 10}s",
        f"    nbthread {balancer_threads(n)}",
        # 64 KiB buffers (not 16): a realistic turn moves ~300 KB through the
        # balancer, and fewer, larger reads and writes cost it less CPU.
        # Buffers are taken only while data is in transit.
        f"    tune.bufsize {BUFFER_BYTES}",
        *(["", "resolvers dns", "    parse-resolv-conf", "    hold valid 10s"] if dns else []),
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlog-normal",  # errors and state changes only
        "    option dontlognull",
        "    option http-keep-alive",
        "    http-reuse safe",
        "    option http-no-delay",  # streamed answers (SSE) pass through at once
        "    timeout connect 5s",
        f"    timeout client {server_timeout}s",
        f"    timeout server {server_timeout}s",
        f"    timeout http-request {max(1, int(settings.header_timeout_s))}s",
        f"    timeout http-keep-alive {max(1, int(settings.keep_alive_s))}s",
        "    timeout queue 30s",
        "    timeout check 5s",
        # Once more to the SAME server, and only when nothing was sent.
        "    retries 1",
        "    retry-on conn-failure",
        "    no option redispatch",
        *(
            f"    http-error status {status} content-type application/json "
            f"string {_json_error(text)}"
            for status, text in ERROR_PAGES.items()
        ),
        "",
        "frontend sessions",
        f"    bind {bind}:{port}",
        "    option http-ignore-probes",
        "    http-request use-service prometheus-exporter if { path /balancer/metrics }",
        _refuse(
            too_large.status,
            too_large.message,
            f"{{ req.hdr_val(content-length) gt {settings.max_body_bytes} }}",
        ),
        *_instance_paths(),
        *_path_id(),
        *_body_id(),
        *_index(instances),
        *(
            f"    use_backend instance{k} if {{ var(txn.idx) -m int {k} }}"
            for k in range(len(instances))
        ),
        "    default_backend any",
        "",
        "backend any",  # mints and service routes: any healthy instance will do
        "    balance roundrobin",
        "    option redispatch 1",  # a mint may go to another instance than the first try
        *(
            f"    server i{k} {i.address} track instance{k}/i{k}{dns}"
            for k, i in enumerate(instances)
        ),
    ]
    for k, instance in enumerate(instances):
        lines += [
            "",
            f"backend instance{k}",
            "    option httpchk",
            "    http-check send meth GET uri /health ver HTTP/1.1 hdr Host balancer",
            "    http-check expect status 200",
            # Down after 2 failed checks or one refused connection; never on a
            # 5xx answer (upstream errors are the backend's, not the instance's).
            f"    server i{k} {instance.address} check inter 2s fastinter 500ms "
            f"downinter 500ms fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down{dns}",
        ]
    return "\n".join(lines) + "\n"


def _json_error(text: str) -> str:
    return '\'{"error":"' + text + "\"}'"


def _refuse(status: int, text: str, condition: str) -> str:
    return (
        f"    http-request return status {status} content-type application/json "
        f"string {_json_error(text)} if {condition}"
    )


def _balancer_refuse(name: str, condition: str) -> str:
    status, text = BALANCER_ERRORS[name]
    return _refuse(status, text, condition)


def _instance_paths() -> list[str]:
    return [
        "    acl instance_path path_reg ^/instances/[0-9]{1,4}/(health|metrics)$",
        "    http-request set-var(txn.idx) path,field(3,/),add(0) if instance_path",
        "    http-request set-path /%[path,field(4,/)] if instance_path",
    ]


def _path_id() -> list[str]:
    # The server percent-decodes the segment once, then checks it: hash the same.
    return [
        "    acl session_path path_beg /sessions/",
        "    http-request set-var(txn.raw) path,field(3,/) if session_path",
        "    http-request set-var(txn.sid) var(txn.raw),url_dec "
        "if session_path { var(txn.raw) -m len ge 1 }",
    ]


def _body_id() -> list[str]:
    """The ``session_id`` of a create-by-id body (the only body the balancer reads)."""
    create = "create_method create_path"
    has_key = "{ req.body -m reg '\"session_id\"\\s*:' }"
    return [
        "    acl create_method method POST",
        "    acl create_path path /sessions",
        f"    http-request wait-for-body time 30s if {create}",
        f"    http-request set-var(txn.blen) req.body_len if {create}",
        # A body larger than the buffer would be routed by an id not seen.
        _balancer_refuse("create_too_large", f"{create} {{ req.body_size,sub(txn.blen) gt 0 }}"),
        _balancer_refuse(
            "create_chunked",
            f"{create} !{{ req.hdr(content-length) -m found }} {{ var(txn.blen) -m int gt 0 }}",
        ),
        # Where json_query and the server's JSON parser could disagree.
        _balancer_refuse(
            "duplicate_key",
            f'{create} {{ req.body -m reg \'(?s)"session_id"\\s*:.*"session_id"\\s*:\' }}',
        ),
        _balancer_refuse(
            "escaped_key",
            f"{create} {{ req.body -m reg '\\\\u[0-9a-fA-F]{{4}}(?:[^\"\\\\]|\\\\.)*\"\\s*:' }}",
        ),
        f"    http-request set-var(txn.sid) req.body,json_query('$.session_id') if {create}",
        _balancer_refuse(
            "unreadable_id",
            f"{create} !{{ var(txn.sid) -m found }} {has_key} "
            "!{ req.body -m reg '\"session_id\"\\s*:\\s*null' }",
        ),
    ]


def _index(instances: Sequence[Instance]) -> list[str]:
    # An id no instance would accept is not routed by it: any instance
    # answers it with the server's own 400.
    lines = [
        f"    acl sid_valid var(txn.sid) -m reg {VALID_ID}",
        "    acl sid_minted var(txn.sid) -m reg ^[0-9a-f]{32}$",
        f"    http-request set-var(txn.idx) var(txn.sid),crc32,mod({len(instances)}) if sid_valid",
    ]
    lines += [
        f"    http-request set-var(txn.idx) int({k}) "
        f"if sid_minted {{ var(txn.sid) -m beg {instance.prefix} }}"
        for k, instance in enumerate(instances)
    ]
    lines.append(
        _balancer_refuse(
            "no_instance",
            f"{{ var(txn.idx) -m found }} !{{ var(txn.idx) -m int 0:{len(instances) - 1} }}",
        )
    )
    return lines
