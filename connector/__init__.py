"""threads-connector: Kafka domain events -> Mindset Threads API conversations."""

__version__ = "0.1.0"
