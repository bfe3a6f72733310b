"""Azure IoT Hub's SQL-like twin query language: `parse_query` (lark grammar → `nodes.Query`),
the evaluator over twin documents, and `QueryService` (paging with continuation tokens)."""

from tether.messaging.query.nodes import Query
from tether.messaging.query.parser import parse_query
from tether.messaging.query.service import DEFAULT_PAGE, MAX_PAGE, QueryPage, QueryService

__all__ = ["DEFAULT_PAGE", "MAX_PAGE", "Query", "QueryPage", "QueryService", "parse_query"]
