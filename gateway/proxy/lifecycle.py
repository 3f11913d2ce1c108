"""The request phases of the lifecycle, as a mixin of ``ClientConnection``.

route (``_dispatch``) → filter request (``_filter_request``, only for routes with a chain) →
admit (``_admit``, only for routes with a limiter) → select peer (``_forward``) → …, and the
end of every exchange (``_observe``: metrics, the filters' on_log, the access log). The
gateway-made answers (``_respond_error``, ``_local_reply``, ``respond_bytes``) are built by
``responses.py``. They see the connection as a ``downstream.Downstream``
(docs/architecture.md, "The downstream seam").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from gateway.accesslog import iso_time
from gateway.filters.api import SUSPENDED, FilterChain, LocalReply
from gateway.filters.grpc_web import GRPC_WEB_VAR
from gateway.proxy import grpc, responses
from gateway.proxy import headers as hdr
from gateway.proxy.attempt import exchange_attempts
from gateway.proxy.body import REPLAY_LIMIT
from gateway.proxy.downstream import Downstream
from gateway.proxy.exchange import Exchange
from gateway.proxy.filtering import FilterState, filter_held_body
from gateway.proxy.h1 import KNOWN_METHODS, HeadFields
from gateway.proxy.normalize import InvalidTarget, normalize_rewritten, parse_target
from gateway.proxy.responses import REFUSAL_MESSAGES, REFUSAL_RESULTS, RequestRejected
from gateway.ratelimit import Decision, RouteLimiter
from gateway.resilience.retry import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from gateway.routing import Route
    from gateway.snapshot import Snapshot


class RequestPhases(Downstream):
    """Route, filter request, admit, select peer; and the end of an exchange."""

    __slots__ = ()
    # The access log's "protocol": HTTP/2 streams through the bridge say "h2"
    # (gateway/proxy/h2/bridge.py), as native streams do.
    log_protocol = "http1"

    def _dispatch(self, ex: Exchange) -> None:
        if ex.error is not None:
            self._respond_error(ex, ex.error)
            return
        snapshot = self.server.snapshot
        # One normalisation before routing (gateway/proxy/normalize.py): the route table, the
        # rewrite and the upstream all see the same path; the query goes on untouched.
        try:
            url, path, path_text, query, authority = parse_target(
                ex.url, ex.method, snapshot.config.paths
            )
        except InvalidTarget as exc:
            self._respond_error(ex, RequestRejected(400, "invalid_target", str(exc)))
            return
        # RFC 9112 §3.2.2: the authority of an absolute-form target replaces the Host header.
        host = ex.host if authority is None else authority
        if self.listener.redirect is not None:
            self._redirect(ex, host, url)
            return
        entry = self.tls_entry
        if entry is not None and host is not None and not entry.covers_host(host):
            # RFC 9110 §15.5.20: this connection's certificate (chosen by SNI) does not cover
            # the Host the request names; the client should open a connection for that host.
            self._respond_error(
                ex, RequestRejected(421, "misdirected_request", responses.MISDIRECTED)
            )
            return
        route = snapshot.routes.match(
            ex.method_name,
            host.decode("latin-1") if host is not None else "",
            path_text,
            query.decode("latin-1") if query else "",
            ex.headers,
            self.sni,
        )
        if route is None:
            self._respond_error(
                ex, RequestRejected(404, "no_route", "no route matches the request")
            )
            return
        ex.route = route
        ex.route_name = route.name
        if route.rewrites_path:
            # Rewrites run on the normalised path; their result must stay a normal origin-form
            # path too (a strip_prefix can cut a segment: "/api../x" minus "/api").
            try:
                new_path = normalize_rewritten(
                    route.rewrite_path(path_text).encode("latin-1"), snapshot.config.paths
                )
            except InvalidTarget as exc:
                self._respond_error(ex, RequestRejected(400, "invalid_target", str(exc)))
                return
            url = new_path + (b"?" + query if query else b"")
        if route.max_body_bytes is not None:
            ex.max_body = route.max_body_bytes
        if ex.content_length is not None:
            try:
                declared = int(ex.content_length)
            except ValueError:
                declared = -1
            if declared < 0:
                self._respond_error(
                    ex, RequestRejected(400, "bad_request", "invalid Content-Length")
                )
                return
            if declared > ex.max_body:
                self._respond_error(
                    ex, RequestRejected(413, "body_too_large", "request body exceeds the limit")
                )
                return
        elif ex.body_bytes > ex.max_body:
            self._respond_error(
                ex, RequestRejected(413, "body_too_large", "request body exceeds the limit")
            )
            return
        chains = snapshot.filters
        if chains:
            chain = chains.get(route.name)
            if chain is not None:
                self._filter_request(ex, chain, snapshot, route, url, host, path, query, path_text)
                return
        limiter = snapshot.limiters.get(route.name) if snapshot.limiters else None
        if limiter is not None:
            self._admit(ex, limiter, snapshot, route, url, host, path, query)
        else:
            self._forward(ex, snapshot, route, url, host, path, query)

    def _filter_request(
        self,
        ex: Exchange,
        chain: FilterChain,
        snapshot: Snapshot,
        route: Route,
        url: bytes,
        host: bytes | None,
        path: bytes,
        query: bytes,
        path_text: str,
    ) -> None:
        """The route has filters: run their request-headers phase, then admit (or answer
        with the filters' LocalReply, or wait for an asynchronous filter to resume)."""
        # The request filters see, slot by slot (no __init__ frame): what costs more than a
        # store (the header list, decoded strings, vars, the request id) is made when a hook
        # reads it.
        state = FilterState()  # self.filters only if the exchange needs it after this phase
        state.chain = chain
        state.conn = self
        state.exchange = ex
        state.path = path_text
        state.raw_host = host
        state.raw_query = query
        state.upstream = state.header_list = state.var_dict = state.overrides = None
        state.retry_head = None
        state.attempts = ()  # (filled before on_log)
        outcome = chain.on_request_headers(state) if chain.wants_request_headers else None
        if outcome is None:
            # _request_filtered inlined for the common synchronous pass (one call less).
            headers = state.header_list  # None: no hook read the list, it goes up as it came
            if headers is not None:
                ex.headers = HeadFields(headers) if ex.chunked else headers
            # A chain with no later hook whose filters chose no upstream and set no vars leaves
            # nothing to read later: the exchange goes on as a plain route's (_forward makes
            # its request id, unless a hook read it).
            if not chain.request_phase_only or state.upstream is not None or state.var_dict:
                self.filters = state
                state.request_body = state.body_hook = False
                self._check_request_id(ex)
                if chain.wants_request_body:
                    filter_held_body(state, ex)
            limiter = snapshot.limiters.get(route.name) if snapshot.limiters else None
            if limiter is not None:
                self._admit(ex, limiter, snapshot, route, url, host, path, query)
            else:
                self._forward(ex, snapshot, route, url, host, path, query)
            return
        self.filters = state
        state.request_body = state.body_hook = False
        self._check_request_id(ex)
        if outcome is SUSPENDED:
            # Parked like a Redis rate-limit decision: ``state.resume`` continues (the chain
            # calls it from the event loop, never before this returned).
            state.forward = (snapshot, route, url, host, path, query)
        else:
            reply = outcome if isinstance(outcome, LocalReply) else None
            self._request_filtered(ex, state, reply, snapshot, route, url, host, path, query)

    def _check_request_id(self, ex: Exchange) -> None:
        """The request id as _forward makes it (_forward trusts a filtered route's)."""
        request_id = ex.request_id
        if request_id is None or not hdr.valid_request_id(request_id):
            ex.request_id = self.server.request_ids.next()

    def _request_filtered(
        self,
        ex: Exchange,
        state: FilterState,
        reply: LocalReply | None,
        snapshot: Snapshot,
        route: Route,
        url: bytes,
        host: bytes | None,
        path: bytes,
        query: bytes,
    ) -> None:
        """The request phase is over (a late or second resume never gets here: FilterState
        drops it)."""
        if reply is not None:
            self._local_reply(ex, reply)
            return
        headers = state.header_list  # what the filters made of them goes upstream
        if headers is not None:
            ex.headers = HeadFields(headers) if ex.chunked else headers
        if state.chain.wants_request_body:
            filter_held_body(state, ex)
        limiter = snapshot.limiters.get(route.name) if snapshot.limiters else None
        if limiter is not None:
            self._admit(ex, limiter, snapshot, route, url, host, path, query)
        else:
            self._forward(ex, snapshot, route, url, host, path, query)

    def _local_reply(self, ex: Exchange, reply: LocalReply) -> None:
        """A filter answered instead of the upstream."""
        request_id = self.request_id_of(ex)
        status = reply.status
        keep_alive = ex.keep_alive = (
            responses.keeps_alive(status, ex.keep_alive, ex.request_complete, self.upgrade_pending)
            and not self.server.draining
        )
        ex.status = status
        ex.error_code = "filter_reply"
        body = b"" if ex.is_head or status in (204, 304) else reply.body
        self.out.append(
            responses.local_reply_head(
                status,
                reply.headers,
                len(reply.body),
                request_id,
                keep_alive=keep_alive,
                http10=ex.version == "1.0",
            )
        )
        if body:
            self.out.append(body)
        ex.response_started = True
        ex.response_complete = True
        self.flush_to_client()
        self._finish(ex)

    def _admit(
        self,
        ex: Exchange,
        limiter: RouteLimiter,
        snapshot: Snapshot,
        route: Route,
        url: bytes,
        host: bytes | None,
        path: bytes,
        query: bytes,
    ) -> None:
        """Only for routes with a limit (rate or max_in_flight): the others go to _forward."""
        if limiter.uses_redis:

            def decided(decision: Decision) -> None:
                # Redis answered (or its timeout fell back) after this callback returned.
                if self.active is not ex or self.closed:
                    if decision.holds_slot:
                        limiter.release()
                    return
                if self._apply_decision(ex, limiter, decision):
                    self._forward(ex, snapshot, route, url, host, path, query)

            decision = limiter.check(
                time.monotonic(), self.peer_ip, self.peer_trusted, ex.headers, query, decided
            )
            if decision is None:
                return  # the decision arrives through ``decided``
        else:
            decision = limiter.check_local(
                time.monotonic(), self.peer_ip, self.peer_trusted, ex.headers, query
            )
        if not self._apply_decision(ex, limiter, decision):
            return
        self._forward(ex, snapshot, route, url, host, path, query)

    def _redirect(self, ex: Exchange, host: bytes | None, url: bytes) -> None:
        """``redirect_to`` on a plaintext listener: 308 to the HTTPS URL (RFC 9110 §15.4.9
        keeps the method and body)."""
        template = self.listener.redirect
        assert template is not None
        location = responses.redirect_location(template, host, url)
        if location is None:
            self._respond_error(ex, RequestRejected(400, "bad_request", "no Host to redirect to"))
            return
        self._respond_error(
            ex,
            RequestRejected(308, "https_redirect", "use HTTPS"),
            extra_headers=b"location: " + location + b"\r\n",
        )

    def _apply_decision(self, ex: Exchange, limiter: RouteLimiter, decision: Decision) -> bool:
        """Apply a rate-limit decision: count it, answer a refusal, keep headers to add."""
        if decision.holds_slot:
            ex.limiter = limiter
        if decision.allowed:
            if decision.dry_run:
                result = "dry_run"
            elif decision.store_error:
                result = "store_error"
            else:
                result = "allowed"
        else:
            result = REFUSAL_RESULTS.get(decision.reason, decision.reason)
        ex.ratelimit = result
        self.server.metrics.ratelimit(ex.route_name, result)
        if decision.allowed:
            ex.ratelimit_headers = decision.headers
            return True
        self._respond_error(
            ex,
            RequestRejected(decision.status, decision.reason, REFUSAL_MESSAGES[decision.status]),
            extra_headers=decision.headers,
        )
        return False

    def _forward(
        self,
        ex: Exchange,
        snapshot: Snapshot,
        route: Route,
        url: bytes,
        host: bytes | None,
        path: bytes,
        query: bytes,
    ) -> None:
        """Pick an instance of the route's upstream and send the request there.

        ``url`` is the origin-form target to send (normalised and rewritten path + query),
        ``path`` the normalised path the route matched.
        """
        if snapshot.idempotency:
            idempotency = snapshot.idempotency.get(route.name)
            # Only a keyed connection (an Idempotency-Key seen) or a route requiring keys gets
            # to begin(); the rest of an idempotency route's requests pay these two tests.
            if (
                idempotency is not None
                and (self.keyed or idempotency.required)
                and not ex.idem_checked
            ):
                self.keyed = True  # begin() may set ex.recorder
                if not idempotency.begin(self, ex, (ex, snapshot, route, url, host, path, query)):
                    return  # claimed at the store first (or answered: 4xx, replay)
        filters = self.filters
        if filters is not None and filters.upstream is not None:
            # A request-phase filter chose another upstream (traffic splitting).
            chosen = snapshot.upstreams.get(filters.upstream)
            if chosen is None:
                self._respond_error(
                    ex,
                    RequestRejected(500, "filter_error", f"no upstream '{filters.upstream}'"),
                )
                return
            upstream = chosen
        else:
            upstream = snapshot.upstreams[route.upstream]
        ex.upstream = upstream
        ex.upstream_name = upstream.name
        # CircuitBreaker.try_request, inlined: two method calls per request measured ~1,400
        # instructions (docs/instructions.md); the breaker's counters are its API all the same.
        breaker = upstream.breaker
        if breaker.max_requests and breaker.requests >= breaker.max_requests:
            breaker.requests_overflow += 1
            self.server.metrics.breaker_overflow(upstream.name, "requests")
            self._respond_error(
                ex,
                RequestRejected(
                    503, "circuit_open", f"upstream '{upstream.name}' is at max_requests"
                ),
            )
            return
        ex.counted = True
        breaker.requests += 1  # also the upstream's active-request count
        upstream.budget.requests_now += 1  # RetryBudget.record_request, inlined: per request
        if upstream.hash_key is not None:
            ex.hash_key = self._hash_key(ex, upstream, path, query)
        attempt = self._pick(ex, upstream, ())
        if attempt is None:
            return
        policy = (
            snapshot.route_retry.get(route.name, upstream.retry)
            if snapshot.route_retry
            else upstream.retry
        )
        # Only fields that differ from the class defaults are stored: past 29 instance fields
        # CPython 3.11 turns an object's inline values into a dict (slower for every access).
        if ex.method in IDEMPOTENT_METHODS or (self.keyed and ex.idem_keys is not None):
            ex.idempotent = True
        if policy is not None:
            ex.retry = policy
            replay_limit = policy.max_body_bytes
            if replay_limit > REPLAY_LIMIT:
                ex.replay_limit = replay_limit
                if ex.body is not None:
                    ex.body.replay_limit = replay_limit
        if ex.upgrade is not None:
            framing = b""
        elif ex.chunked:
            framing = b"transfer-encoding: chunked\r\n"
        elif ex.content_length is not None:
            framing = b"content-length: %d\r\n" % int(ex.content_length)
        else:
            framing = b""
        request_id = ex.request_id
        # (A filtered route's id was made and checked before its filters ran.)
        if request_id is None or (filters is None and not hdr.valid_request_id(request_id)):
            request_id = ex.request_id = self.server.request_ids.next()
        host_out = route.host_rewrite.encode("latin-1") if route.host_rewrite else host
        if host_out is None:
            assert attempt.instance is not None
            host_out = attempt.instance.address.encode("ascii")
        ex.head = hdr.build_request_head(
            ex.method,
            url,
            ex.headers,
            host=host_out,
            client_host=host if host_out is not host else None,
            conn_tokens=ex.conn_tokens,
            client_ip=self.peer_ip,
            peer_trusted=self.peer_trusted,
            request_id=request_id,
            framing=framing,
            upgrade=ex.upgrade,
            proto=self.listener.proto,
            client_cert=self.client_cert,
        )
        if route.timeout:
            ex.deadline = time.monotonic() + route.timeout  # exact: the tick clock may lag
        self._connect(attempt)

    def request_id_of(self, ex: Exchange) -> bytes:
        request_id = ex.request_id
        if request_id is None or not hdr.valid_request_id(request_id):
            request_id = ex.request_id = self.server.request_ids.next()
        return request_id

    def resume_forward(self, resume: tuple[Any, ...]) -> None:
        """Forward an exchange whose idempotency claim succeeded (arguments of ``_forward``)."""
        self._forward(*resume)

    def respond_bytes(
        self, ex: Exchange, status: int, data: bytes, keep_alive: bool, code: str
    ) -> None:
        """Answer with a whole response built elsewhere (an idempotency replay or problem)."""
        ex.status = status
        ex.error_code = code
        ex.keep_alive = keep_alive
        self.out.append(data)
        ex.response_started = True
        ex.response_complete = True
        self.flush_to_client()
        self._finish(ex)

    def _respond_error(
        self, ex: Exchange, error: RequestRejected, extra_headers: bytes = b""
    ) -> None:
        request_id = self.request_id_of(ex)
        status = error.status
        body = responses.error_body(status, error.code, error.message, request_id)
        keep_alive = ex.keep_alive = (
            responses.keeps_alive(status, ex.keep_alive, ex.request_complete, self.upgrade_pending)
            and not self.server.draining
        )
        ex.status = status
        ex.error_code = error.code
        if error.headers:
            extra_headers += error.headers
        filters = self.filters
        web_type = grpc.grpc_web_client_type(
            ex.headers, filters.request.vars.get(GRPC_WEB_VAR) if filters is not None else None
        )
        if web_type is not None:  # a gRPC-Web client reads grpc-status, not a page (grpc.md)
            self.out.append(
                grpc.grpc_web_error(
                    web_type,
                    status,
                    error.message,
                    request_id,
                    keep_alive=keep_alive,
                    http10=ex.version == "1.0",
                    extra_headers=extra_headers,
                    filters=filters,
                )
            )
        else:
            self.out.append(
                responses.error_head(
                    status,
                    len(body),
                    request_id,
                    keep_alive=keep_alive,
                    http10=ex.version == "1.0",
                    extra_headers=extra_headers,
                )
            )
            if not ex.is_head:
                self.out.append(body)
        ex.response_started = True
        ex.response_complete = True
        self.flush_to_client()
        self._finish(ex)

    def _observe(self, ex: Exchange, status: int) -> None:
        """The exchange is over (answered, failed or abandoned): count it and give back the
        upstream-level slots it held."""
        if ex.counted:
            ex.counted = False
            upstream = ex.upstream
            assert upstream is not None
            upstream.breaker.requests -= 1  # CircuitBreaker.release_request, inlined
        if ex.retry_timer is not None:
            ex.retry_timer.cancel()
            ex.retry_timer = None
        attempt = ex.attempt
        if attempt is not None:
            if ex.hedge is not None or attempt.hedge_timer is not None:
                self._cancel_hedge(ex)
            # The exchange and its try point at each other: cut that here, where every exchange
            # ends, so reference counting frees both (a cycle per request would be left to the
            # cyclic collector, whose passes cost the hot path). ``attempt`` serves what follows.
            ex.attempt = None
        if ex.limiter is not None:
            ex.limiter.release()
            ex.limiter = None
        if self.keyed and ex.recorder is not None:
            ex.recorder.finish(ex)  # store the response, or free the key for a retry
        now = time.perf_counter()
        total = now - ex.t_start
        upstream_time: float | None  # declared apart, so the assignment below narrows it
        if attempt is not None and attempt.t_start:
            upstream_time = (attempt.t_done or now) - attempt.t_start
            overhead = total - upstream_time
        else:
            upstream_time = None
            overhead = total
        method = ex.method_name if ex.method_name in KNOWN_METHODS else "OTHER"
        bytes_out = attempt.bytes_out if attempt is not None else 0
        server = self.server
        server.metrics.observe_request(
            ex.route_name,
            ex.upstream_name,
            method,
            status,
            total,
            upstream_time,
            overhead,
            ex.body_bytes,
            bytes_out,
        )
        filters = self.filters
        if filters is not None:
            self.filters = None
            if filters.chain.wants_log:
                filters.attempts = exchange_attempts(ex, attempt, now)
                filters.chain.on_log(filters, status, total)  # never raises (the chain's)
        if ex.last_ended is not None or ex.attempt_labels is not None:
            # Retried or hedged: these point at tries, which point back at ``ex`` (record_try).
            ex.last_ended = None
            ex.attempt_labels = None
        access_log = server.access_log
        if access_log is not None:
            entry = {
                "time": iso_time(time.time()),
                "request_id": (ex.request_id or b"").decode("ascii", "replace"),
                "client": self.peer_ip,
                "listener": self.listener.name,
                "protocol": self.log_protocol,
                "method": ex.method_name,
                "path": ex.url.decode("latin-1"),
                "route": ex.route_name,
                "upstream": ex.upstream_name,
                "instance": attempt.address if attempt is not None else "",
                "status": status,
                "bytes_in": ex.body_bytes,
                "bytes_out": bytes_out,
                "duration": round(total, 6),
                "upstream_duration": None if upstream_time is None else round(upstream_time, 6),
                "retries": ex.tries - 1,
                "rate_limit": ex.ratelimit or None,
                "error": ex.error_code or None,
            }
            if filters is not None and filters.var_dict:
                found = filters.var_dict
                for key in ("consumer", "trace_id"):  # what filters may add to the log
                    if key in found:
                        entry[key] = found[key]
            access_log.record(entry)
