"""What the services of one server share: metrics, the data root, the loaded models and the job manager.

build_app makes one Shared and hands it to every service's builder; a service reaches another's state only
through it (the Models service loads into the registry that Generate reads; the Datasets service starts jobs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from server.data_root import DataRoot
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.jobs.manager import JobManager
    from server.models import ModelRegistry


@dataclass
class Shared:
    metrics: Metrics
    data_root: DataRoot
    models: ModelRegistry | None = None  # set by build_app
    jobs: JobManager | None = None  # set by build_app
