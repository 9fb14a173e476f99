"""The broker ACL against a real Mosquitto: an agent may only use its own site's topics.

A private Mosquitto runs deploy/mosquitto/mosquitto.conf (paths and ports swapped for
temporary ones) with deploy/mosquitto/acl and a password file written by
server/broker_auth.py. Agents connect through its TLS listener with the CA a test CA signed,
the server's ingest user through the plain loopback listener, as in production.

Denials are observed the way each protocol shows them: with MQTT 5 a refused PUBLISH gets a
PUBACK with reason code 135 (not authorized), with 3.1.1 it is acknowledged and dropped. In
both cases the test proves non-delivery with a sentinel: an allowed message sent *after* the
refused one, on the same path; once the sentinel arrives, the refused message would have
arrived before it. Mosquitto 2.0 checks `read` access at delivery, not at SUBSCRIBE, so a
subscription to another site's commands may be acknowledged; what matters, and what is
checked, is that nothing is delivered through it.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from protocols.topics import TopicKind, subscription, topic
from server.broker_auth import (
    SERVER_USERNAME,
    PasswordEntry,
    hash_password,
    verify_password,
    write_password_file,
)
from server.enrolment import new_password
from tests.support import mosquitto
from tests.support.broker import close_client
from tests.support.mosquitto import MOSQUITTO, MOSQUITTO_PASSWD
from tests.support.net import LOOPBACK
from tests.support.tls import TestCA
from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEPLOY_CONF = REPO / "deploy/mosquitto/mosquitto.conf"
DEPLOY_ACL = REPO / "deploy/mosquitto/acl"
TIMEOUT = 10.0
NOT_AUTHORIZED = 135  # MQTT 5 reason code
PROTOCOLS = [
    pytest.param(mqtt.MQTTv311, id="mqtt311"),
    pytest.param(mqtt.MQTTv5, id="mqtt5"),
]


# --- the broker ---------------------------------------------------------------------------


@dataclass
class Broker:
    """A private Mosquitto running the deployed configuration."""

    proc: subprocess.Popen[bytes]
    tls_port: int
    plain_port: int
    ca_file: Path
    passwd: Path
    log: Path
    users: dict[str, str] = field(default_factory=dict)
    """user name -> password of everyone in the password file."""
    entries: dict[str, PasswordEntry] = field(default_factory=dict)

    def write_users(self) -> None:
        """Rewrite the password file from `entries` (the broker reads it at start and SIGHUP)."""
        write_password_file(self.passwd, self.entries.values())

    def log_text(self) -> str:
        """The broker's log so far (for failure messages)."""
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Mosquitto with sites A and B, the server user, and a user hashed by mosquitto_passwd."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (Debian package `mosquitto`)")
    tmp = tmp_path_factory.mktemp("mosquitto")
    ca = TestCA(tmp)
    server = ca.server("broker")
    passwd = tmp / "passwd"
    users = {"site-a": new_password(), "site-b": new_password(), "site-c": new_password(),
             SERVER_USERNAME: new_password()}
    entries = {name: PasswordEntry(name, hash_password(pw)) for name, pw in users.items()}
    if MOSQUITTO_PASSWD is not None:  # a hash made by Mosquitto's own tool, through our writer
        tool_file = tmp / "tool-passwd"
        users["site-t"] = "tool-made-password"
        subprocess.run(  # noqa: S603
            [MOSQUITTO_PASSWD, "-c", "-b", str(tool_file), "site-t", users["site-t"]],
            check=True, capture_output=True, timeout=TIMEOUT,
        )
        name, encoded = tool_file.read_text(encoding="utf-8").strip().split(":", 1)
        entries[name] = PasswordEntry(name, encoded)
    files = {"password_file": passwd, "acl_file": DEPLOY_ACL, "certfile": server.cert,
             "keyfile": server.key}
    write_password_file(passwd, entries.values())
    with mosquitto.running(DEPLOY_CONF, tmp, files) as m:
        yield Broker(m.proc, m.port("8883"), m.port("1883"), ca.cert, passwd, m.log, users,
                     entries)


# --- MQTT clients -------------------------------------------------------------------------


class Client:
    """A paho client that records CONNACK, SUBACK and PUBACK reason codes and messages."""

    def __init__(self, protocol: MQTTProtocolVersion) -> None:
        self.mqtt = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"acl-{uuid.uuid4().hex[:12]}",
            protocol=protocol,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self._acks: dict[tuple[str, int], list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self.mqtt.on_connect = self._on_connect
        self.mqtt.on_subscribe = self._on_subscribe
        self.mqtt.on_publish = self._on_publish
        self.mqtt.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if self.connack is None:
            self.connack = reason_code
        self.connected.set()

    def _ack(self, kind: str, mid: int, codes: list[ReasonCode]) -> None:
        with self._cond:
            self._acks[(kind, mid)] = codes
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        self._ack("sub", mid, reason_codes)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._ack("pub", mid, [reason_code])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(message)

    def _wait_ack(self, kind: str, mid: int, what: str) -> list[ReasonCode]:
        with self._cond:
            if not self._cond.wait_for(lambda: (kind, mid) in self._acks, TIMEOUT):
                raise AssertionError(f"timed out after {TIMEOUT:g} s waiting for {what}")
            return self._acks.pop((kind, mid))

    def subscribe(self, topic_filter: str) -> ReasonCode:
        """SUBSCRIBE at QoS 1; the broker's answer for this filter."""
        result, mid = self.mqtt.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert mid is not None
        return self._wait_ack("sub", mid, f"SUBACK of {topic_filter!r}")[0]

    def publish(self, topic_name: str, payload: bytes) -> ReasonCode:
        """PUBLISH at QoS 1 and wait for the PUBACK; its reason code."""
        info = self.mqtt.publish(topic_name, payload, qos=1)
        return self._wait_ack("pub", info.mid, f"PUBACK for {topic_name!r}")[0]

    def receive_until(self, payload: bytes) -> list[mqtt.MQTTMessage]:
        """Every message up to and including the one carrying `payload` (the sentinel)."""
        got: list[mqtt.MQTTMessage] = []
        while True:
            try:
                message = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"timed out after {TIMEOUT:g} s waiting for {payload!r}; got "
                    f"{[(m.topic, m.payload) for m in got]}"
                ) from None
            got.append(message)
            if message.payload == payload:
                return got


@contextmanager
def client(broker: Broker, user: str | None, protocol: MQTTProtocolVersion,
           password: str | None = None) -> Iterator[Client]:
    """A connected client: agents over TLS, the server user over the loopback listener."""
    c = Client(protocol)
    if user is not None:
        c.mqtt.username_pw_set(user, password if password is not None else broker.users[user])
    port = broker.plain_port
    if user != SERVER_USERNAME:
        c.mqtt.tls_set(ca_certs=str(broker.ca_file))
        port = broker.tls_port
    c.mqtt.connect_async(LOOPBACK, port)
    c.mqtt.loop_start()
    try:
        wait_until(c.connected, TIMEOUT, f"CONNACK for {user!r}")
        yield c
    finally:
        close_client(c.mqtt)


def connect_reason(broker: Broker, user: str | None, password: str | None,
                   protocol: MQTTProtocolVersion) -> ReasonCode:
    """The CONNACK reason the broker gives these credentials."""
    with client(broker, user, protocol, password) as c:
        assert c.connack is not None
        return c.connack


def _ok(c: Client, who: str) -> Client:
    assert c.connack is not None, f"no CONNACK for {who}"
    assert not c.connack.is_failure, f"{who} was refused: {c.connack}"
    return c


def _payload(label: str) -> bytes:
    return f"{label}-{uuid.uuid4().hex}".encode()


# --- the tests ----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_agent_publishes_on_its_own_topics(broker: Broker, protocol: MQTTProtocolVersion) -> None:
    with client(broker, SERVER_USERNAME, mqtt.MQTTv5) as server, \
            client(broker, "site-a", protocol) as agent:
        _ok(server, "server")
        _ok(agent, "agent of site-a")
        assert not server.subscribe("emu/v1/+/#").is_failure
        for kind in (TopicKind.TELEMETRY, TopicKind.EVENTS, TopicKind.STATUS, TopicKind.CMD_ACK):
            payload = _payload(kind.value)
            assert not agent.publish(topic("site-a", kind), payload).is_failure
            got = server.receive_until(payload)
            assert got[-1].topic == topic("site-a", kind)


def test_server_ingest_shares_a_subscription(broker: Broker) -> None:
    with client(broker, SERVER_USERNAME, mqtt.MQTTv5) as server, \
            client(broker, "site-b", mqtt.MQTTv5) as agent:
        _ok(server, "server")
        _ok(agent, "agent of site-b")
        shared = subscription(TopicKind.TELEMETRY, "emu-ingest")
        assert not server.subscribe(shared).is_failure
        payload = _payload("shared")
        assert not agent.publish(topic("site-b", TopicKind.TELEMETRY), payload).is_failure
        assert server.receive_until(payload)[-1].topic == topic("site-b", TopicKind.TELEMETRY)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "denied",
    [
        "emu/v1/site-b/telemetry",
        "emu/v1/site-b/events",
        "emu/v1/site-b/status",
        "emu/v1/site-b/cmd/ack",
        "emu/v1/site-b/cmd",
        "emu/v1/site-a/cmd",  # only the server sends commands, even to the agent's own site
        "emu/v1/site-a/other",
        "emu/v1/site-a",
    ],
)
def test_agent_cannot_publish_elsewhere(
    broker: Broker, protocol: MQTTProtocolVersion, denied: str
) -> None:
    with client(broker, SERVER_USERNAME, mqtt.MQTTv5) as server, \
            client(broker, "site-a", protocol) as agent:
        _ok(server, "server")
        _ok(agent, "agent of site-a")
        assert not server.subscribe("#").is_failure  # whatever the ACL would let it see
        refused, sentinel = _payload("refused"), _payload("sentinel")
        ack = agent.publish(denied, refused)
        if protocol == mqtt.MQTTv5:
            assert ack.value == NOT_AUTHORIZED, f"PUBACK {ack} for {denied!r}"
        else:
            assert not ack.is_failure  # 3.1.1 has no way to say no: acknowledged and dropped
        assert not agent.publish(topic("site-a", TopicKind.TELEMETRY), sentinel).is_failure
        got = server.receive_until(sentinel)
        assert refused not in [m.payload for m in got], f"{denied!r} was delivered"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_agent_receives_only_its_own_commands(
    broker: Broker, protocol: MQTTProtocolVersion
) -> None:
    with client(broker, SERVER_USERNAME, mqtt.MQTTv5) as server, \
            client(broker, "site-a", protocol) as agent_a, \
            client(broker, "site-b", protocol) as agent_b:
        for c, who in ((server, "server"), (agent_a, "site-a"), (agent_b, "site-b")):
            _ok(c, who)
        assert not agent_a.subscribe(topic("site-a", TopicKind.CMD)).is_failure
        assert not agent_b.subscribe(topic("site-b", TopicKind.CMD)).is_failure
        # Mosquitto 2.0 grants these SUBACKs (read is checked at delivery); EMQX refuses them.
        for snoop in (topic("site-b", TopicKind.CMD), "emu/v1/+/cmd", "emu/v1/#", "#"):
            agent_a.subscribe(snoop)
        for_b, sentinel = _payload("for-b"), _payload("for-a")
        assert not server.publish(topic("site-b", TopicKind.CMD), for_b).is_failure
        assert not server.publish(topic("site-a", TopicKind.CMD), sentinel).is_failure
        assert agent_b.receive_until(for_b)[-1].topic == topic("site-b", TopicKind.CMD)
        got = agent_a.receive_until(sentinel)
        assert [m.topic for m in got] == [topic("site-a", TopicKind.CMD)], (
            f"site-a received {[(m.topic, m.payload) for m in got]}"
        )


def test_agent_cannot_read_other_sites_telemetry(broker: Broker) -> None:
    with client(broker, SERVER_USERNAME, mqtt.MQTTv5) as server, \
            client(broker, "site-a", mqtt.MQTTv5) as agent_a, \
            client(broker, "site-b", mqtt.MQTTv5) as agent_b:
        for c, who in ((server, "server"), (agent_a, "site-a"), (agent_b, "site-b")):
            _ok(c, who)
        agent_a.subscribe("emu/v1/+/telemetry")
        assert not agent_a.subscribe(topic("site-a", TopicKind.CMD)).is_failure
        secret, sentinel = _payload("b-telemetry"), _payload("sentinel")
        assert not agent_b.publish(topic("site-b", TopicKind.TELEMETRY), secret).is_failure
        assert not server.publish(topic("site-a", TopicKind.CMD), sentinel).is_failure
        got = agent_a.receive_until(sentinel)
        assert secret not in [m.payload for m in got]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("user", "password"),
    [
        pytest.param("site-a", "wrong-password", id="wrong-password"),
        pytest.param("site-a", "", id="empty-password"),
        pytest.param("site-z", "whatever", id="unknown-user"),
        pytest.param(None, None, id="anonymous"),
    ],
)
def test_bad_credentials_are_refused(
    broker: Broker, protocol: MQTTProtocolVersion, user: str | None, password: str | None
) -> None:
    reason = connect_reason(broker, user, password, protocol)
    assert reason.is_failure, f"{user!r} was let in: {reason}"


def test_hash_made_by_mosquitto_passwd_works_both_ways(broker: Broker) -> None:
    if "site-t" not in broker.entries:
        pytest.skip("mosquitto_passwd is not installed")
    assert verify_password(broker.users["site-t"], broker.entries["site-t"].password_hash)
    with client(broker, "site-t", mqtt.MQTTv5) as agent:
        _ok(agent, "user hashed by mosquitto_passwd")


def test_rotated_password_applies_after_sighup(broker: Broker) -> None:
    old = broker.users["site-c"]
    with client(broker, "site-c", mqtt.MQTTv5) as agent:
        _ok(agent, "site-c before rotation")
    new = new_password()
    broker.entries["site-c"] = PasswordEntry("site-c", hash_password(new))
    broker.users["site-c"] = new
    broker.write_users()
    broker.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: not connect_reason(broker, "site-c", new, mqtt.MQTTv5).is_failure,
        TIMEOUT, "Mosquitto to accept the rotated password after SIGHUP",
    )
    assert connect_reason(broker, "site-c", old, mqtt.MQTTv5).is_failure
