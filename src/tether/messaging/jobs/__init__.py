"""Jobs: scheduled twin updates and direct methods over a query (jobs v2) and registry import/export
through blob storage. `service.JobService` is the API (any node); `runner.JobRunner` runs them on the
node holding the jobs lease; `model` holds the wire shapes, `targets` the device selection,
`registry_io` the blob format."""

from tether.messaging.jobs.runner import JobRunner
from tether.messaging.jobs.service import JobService

__all__ = ["JobRunner", "JobService"]
