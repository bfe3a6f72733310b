"""Several `tether run` processes sharing PostgreSQL and NATS JetStream: node identity, the presence
map (which node holds which device) and the NATS bus that carries drops, C2D wake-ups, desired
patches, direct methods and session takeovers between the nodes."""

from tether.cluster.bus import ClusterBus
from tether.cluster.node import Names, default_node_id, resolve_node_id

__all__ = ["ClusterBus", "Names", "default_node_id", "resolve_node_id"]
