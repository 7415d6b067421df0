"""A local Apache Kafka broker (KRaft, one node: broker + controller) on loopback.

No Docker needed: Kafka's jars come from Maven Central (``mvn`` fetches them once into a
cache) and the broker runs with ``java``. The demo and the integration tests use it;
CI pre-warms the cache with ``python -m connector.localkafka fetch``.

    with LocalKafka() as kafka:            # fresh broker, free ports, temporary state
        use(kafka.bootstrap_servers)       # "127.0.0.1:<port>"
        kafka.run_tool("org.apache.kafka.tools.GetOffsetShell",
                       "--bootstrap-server", kafka.bootstrap_servers, "--topic", "t")

Command line (the broker keeps running after ``start`` returns)::

    python -m connector.localkafka start [--state-dir .local/kafka] [--port N]
    python -m connector.localkafka status|stop [--state-dir .local/kafka]
    python -m connector.localkafka fetch

Errors are :class:`LocalKafkaError` with what to install or the tail of the broker log.
"""

from connector.localkafka.broker import LocalKafka
from connector.localkafka.cli import main
from connector.localkafka.common import (
    CACHE_ENV,
    DEFAULT_STATE_DIR,
    HOST,
    KAFKA_VERSION,
    LOG4J_VERSION,
    LocalKafkaError,
    logger,
)
from connector.localkafka.jars import (
    POM_TEMPLATE,
    default_cache_dir,
    ensure_jars,
    find_executable,
    render_pom,
)
from connector.localkafka.properties import (
    LOG4J2_TEMPLATE,
    random_cluster_id,
    render_log4j2,
    render_server_properties,
)
from connector.localkafka.readiness import metadata_broker_count
from connector.localkafka.tools import CDS_ENV, run_tool

__all__ = [
    "CACHE_ENV",
    "CDS_ENV",
    "DEFAULT_STATE_DIR",
    "HOST",
    "KAFKA_VERSION",
    "LOG4J2_TEMPLATE",
    "LOG4J_VERSION",
    "POM_TEMPLATE",
    "LocalKafka",
    "LocalKafkaError",
    "default_cache_dir",
    "ensure_jars",
    "find_executable",
    "logger",
    "main",
    "metadata_broker_count",
    "random_cluster_id",
    "render_log4j2",
    "render_pom",
    "render_server_properties",
    "run_tool",
]
