"""The broker's config files: server.properties, log4j2.xml, and a fresh cluster id."""

from __future__ import annotations

import base64
import string
import uuid
from collections.abc import Mapping
from pathlib import Path
from xml.sax.saxutils import quoteattr

from connector.localkafka.common import HOST

LOG4J2_TEMPLATE = string.Template("""\
<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="ERROR">
  <Appenders>
    $appender
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="out"/></Root>$loggers
  </Loggers>
</Configuration>
""")
_PATTERN = '<PatternLayout pattern="[%d] %p %m (%c)%n"/>'


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: Path,
    node_id: int = 1,
    overrides: Mapping[str, str] | None = None,
    listeners: Mapping[str, tuple[str, int]] | None = None,
) -> str:
    """server.properties for a one-node KRaft broker+controller on loopback, tuned for tests.

    ``listeners``: extra client listeners, name -> (security protocol, port), e.g.
    ``{"MTLS": ("SSL", 19093)}``; PLAINTEXT stays the inter-broker listener."""
    extra = dict(listeners or {})
    named = "".join(f",{name}://{HOST}:{port}" for name, (_proto, port) in extra.items())
    protocols = "".join(f",{name}:{proto}" for name, (proto, _port) in extra.items())
    props: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}{named}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}{named}",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "listener.security.protocol.map": (f"PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT{protocols}"),
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "min.insync.replicas": "1",
        "auto.create.topics.enable": "false",
        "auto.leader.rebalance.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "group.min.session.timeout.ms": "1000",
        "broker.heartbeat.interval.ms": "500",
        "broker.session.timeout.ms": "4000",  # a crashed broker may re-register after this
        "log.segment.bytes": str(8 * 1024 * 1024),
        "log.cleaner.enable": "true",
        "log.cleaner.threads": "1",
        "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
        "log.cleaner.backoff.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "background.threads": "4",
    }
    props.update(overrides or {})
    return "".join(f"{k}={_escape_property(v)}\n" for k, v in props.items())


def _escape_property(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def render_log4j2(log_file: Path) -> str:
    """Quiet broker logging to ``log_file``: WARN and above, plus the few INFO lines that
    tell how far start-up got (registration, "Kafka Server started")."""
    appender = f'<File name="out" fileName={quoteattr(str(log_file))}>{_PATTERN}</File>'
    loggers = "".join(
        f'\n    <Logger name="{name}" level="INFO"/>'
        for name in ("kafka.server.BrokerLifecycleManager", "kafka.server.KafkaRaftServer")
    )
    return LOG4J2_TEMPLATE.substitute(appender=appender, loggers=loggers)


def random_cluster_id() -> str:
    """A Kafka cluster id (base64url UUID, as ``StorageTool random-uuid`` makes), no JVM."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid
