"""In-process fake of the Pub/Sub gRPC API, the fallback when the official emulator is absent.

Only the unary calls the tests and the bridge use (no StreamingPull, push or filters: those
answer UNIMPLEMENTED rather than silently behaving differently). Faithful where the bridge
depends on it: NOT_FOUND for a missing topic, server-assigned message ids, per-ordering-key
order, attributes and ordering_key kept, ack removes, unacked messages come back after the
ack deadline. The client library's own proto-plus types are the (de)serialisers.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import grpc
from google.protobuf import empty_pb2
from google.pubsub_v1 import types as t

_TOPIC_RE = re.compile(r"^projects/[^/]+/topics/[A-Za-z][\w.~+%-]{2,254}$")
_SUB_RE = re.compile(r"^projects/[^/]+/subscriptions/[A-Za-z][\w.~+%-]{2,254}$")
_MAX_HOLD_S = 10.0  # longest an empty Pull is held (keeps server threads free)


@dataclass
class _Sub:
    topic: str
    ordered: bool
    ack_deadline: float
    pending: dict[str, t.PubsubMessage] = field(default_factory=dict)  # ack_id -> msg, FIFO
    leases: dict[str, float] = field(default_factory=dict)  # ack_id -> monotonic expiry


class FakePubSub:
    """A grpc server on 127.0.0.1; all state lives in memory and dies with it."""

    def __init__(self, port: int = 0) -> None:
        self._topics: dict[str, t.Topic] = {}
        self._subs: dict[str, _Sub] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        # so_reuseport=0: a port still in use must fail loudly instead of being shared.
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16), options=[("grpc.so_reuseport", 0)]
        )
        pub: dict[str, tuple[Callable[..., Any], Any, Any]] = {
            "CreateTopic": (self._create_topic, t.Topic, t.Topic),
            "GetTopic": (self._get_topic, t.GetTopicRequest, t.Topic),
            "Publish": (self._publish, t.PublishRequest, t.PublishResponse),
            "DeleteTopic": (self._delete_topic, t.DeleteTopicRequest, None),
        }
        sub: dict[str, tuple[Callable[..., Any], Any, Any]] = {
            "CreateSubscription": (self._create_sub, t.Subscription, t.Subscription),
            "Pull": (self._pull, t.PullRequest, t.PullResponse),
            "Acknowledge": (self._ack, t.AcknowledgeRequest, None),
            "ModifyAckDeadline": (self._modack, t.ModifyAckDeadlineRequest, None),
            "DeleteSubscription": (self._delete_sub, t.DeleteSubscriptionRequest, None),
        }
        for service, table in (("Publisher", pub), ("Subscriber", sub)):
            handlers = {
                name: grpc.unary_unary_rpc_method_handler(
                    fn,
                    request_deserializer=req.deserialize,
                    response_serializer=resp.serialize if resp else _empty,
                )
                for name, (fn, req, resp) in table.items()
            }
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(f"google.pubsub.v1.{service}", handlers),)
            )
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        if not self.port:
            raise OSError(f"fake pubsub: cannot bind 127.0.0.1:{port}")
        self._server.start()

    def stop(self, grace: float | None = 1.0) -> None:
        """grace=None cancels in-flight calls at once (the abrupt 'kill')."""
        self._server.stop(grace).wait()

    # Publisher
    def _create_topic(self, req: t.Topic, ctx: grpc.ServicerContext) -> t.Topic:
        with self._cond:
            if not _TOPIC_RE.match(req.name):
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid topic name {req.name}")
            if req.name in self._topics:
                ctx.abort(grpc.StatusCode.ALREADY_EXISTS, "Topic already exists")
            self._topics[req.name] = t.Topic(name=req.name)
            return self._topics[req.name]

    def _get_topic(self, req: t.GetTopicRequest, ctx: grpc.ServicerContext) -> t.Topic:
        with self._cond:
            if req.topic not in self._topics:
                ctx.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            return self._topics[req.topic]

    def _publish(self, req: t.PublishRequest, ctx: grpc.ServicerContext) -> t.PublishResponse:
        with self._cond:
            if req.topic not in self._topics:
                ctx.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            if not req.messages or any(not (m.data or m.attributes) for m in req.messages):
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "Some messages are empty")
            ids = []
            for m in req.messages:
                msg = t.PubsubMessage(m, message_id=str(next(self._ids)))
                msg.publish_time = datetime.now(timezone.utc)
                ids.append(msg.message_id)
                for name, s in self._subs.items():
                    if s.topic == req.topic:
                        s.pending[f"{name}#{msg.message_id}"] = msg
            self._cond.notify_all()
            return t.PublishResponse(message_ids=ids)

    def _delete_topic(self, req: t.DeleteTopicRequest, ctx: grpc.ServicerContext) -> Any:
        with self._cond:
            if self._topics.pop(req.topic, None) is None:
                ctx.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            return empty_pb2.Empty()

    # Subscriber
    def _create_sub(self, req: t.Subscription, ctx: grpc.ServicerContext) -> t.Subscription:
        with self._cond:
            if req.push_config.push_endpoint or req.filter:
                ctx.abort(grpc.StatusCode.UNIMPLEMENTED, "fake: no push or filter; use emulator")
            if not _SUB_RE.match(req.name):
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid name {req.name}")
            if req.topic not in self._topics:
                ctx.abort(grpc.StatusCode.NOT_FOUND, "Topic not found")
            if req.name in self._subs:
                ctx.abort(grpc.StatusCode.ALREADY_EXISTS, "Subscription already exists")
            deadline = req.ack_deadline_seconds or 10
            if not 10 <= deadline <= 600:
                ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, "ack_deadline_seconds not in 10..600")
            self._subs[req.name] = _Sub(req.topic, req.enable_message_ordering, deadline)
            return t.Subscription(req, ack_deadline_seconds=deadline)

    def _get_sub(self, name: str, ctx: grpc.ServicerContext) -> _Sub:
        if name not in self._subs:
            ctx.abort(grpc.StatusCode.NOT_FOUND, "Subscription not found")
        return self._subs[name]

    def _pull(self, req: t.PullRequest, ctx: grpc.ServicerContext) -> t.PullResponse:
        # As the emulator does: an empty Pull is held until 1 s before the caller's deadline.
        hold = min(max((ctx.time_remaining() or 2.0) - 1.0, 0.0), _MAX_HOLD_S)
        end = time.monotonic() + hold
        with self._cond:
            while True:
                s = self._get_sub(req.subscription, ctx)
                now = time.monotonic()
                leased = {a for a, expiry in s.leases.items() if expiry > now}
                # Ordered: a key with a message out is held back whole (the emulator does the
                # same), so a key's messages can never overtake one another.
                busy = {s.pending[a].ordering_key for a in leased} if s.ordered else set()
                out = []
                for ack_id, msg in s.pending.items():
                    if len(out) >= (req.max_messages or 1):
                        break
                    if ack_id in leased or (msg.ordering_key and msg.ordering_key in busy):
                        continue
                    s.leases[ack_id] = now + s.ack_deadline
                    out.append(t.ReceivedMessage(ack_id=ack_id, message=msg))
                if out or now >= end:
                    return t.PullResponse(received_messages=out)
                self._cond.wait(min(0.05, end - now))

    def _ack(self, req: t.AcknowledgeRequest, ctx: grpc.ServicerContext) -> Any:
        with self._cond:
            s = self._get_sub(req.subscription, ctx)
            for ack_id in req.ack_ids:
                s.pending.pop(ack_id, None)
                s.leases.pop(ack_id, None)
            return empty_pb2.Empty()

    def _modack(self, req: t.ModifyAckDeadlineRequest, ctx: grpc.ServicerContext) -> Any:
        with self._cond:
            s = self._get_sub(req.subscription, ctx)
            for ack_id in req.ack_ids:
                if ack_id in s.pending:  # 0 = nack: redeliverable at once
                    s.leases[ack_id] = time.monotonic() + req.ack_deadline_seconds
            self._cond.notify_all()
            return empty_pb2.Empty()

    def _delete_sub(self, req: t.DeleteSubscriptionRequest, ctx: grpc.ServicerContext) -> Any:
        with self._cond:
            self._get_sub(req.subscription, ctx)
            del self._subs[req.subscription]
            return empty_pb2.Empty()


def _empty(msg: Any) -> bytes:
    return msg.SerializeToString()
