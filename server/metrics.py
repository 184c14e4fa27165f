"""Prometheus metrics, in a registry per server (so several servers can live in one process, as in tests)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# latencies of a CPU toy model are ~1 ms; of a large model on a busy server, seconds
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ulm_requests", "RPCs handled, by method and status code", ["method", "code"],
                                registry=r)
        self.http_requests = Counter("ulm_http_requests", "HTTP requests handled, by route (verb and path template) "
                                     "and HTTP status", ["route", "code"], registry=r)
        self.queue_depth = Gauge("ulm_queue_depth", "Generate requests waiting for a batch slot", registry=r)
        self.running = Gauge("ulm_running_requests", "Generate requests holding a batch slot", registry=r)
        self.finished = Counter("ulm_finished_requests", "Generate requests that left the scheduler, by reason",
                                ["reason"], registry=r)
        self.time_to_first_token = Histogram("ulm_time_to_first_token_seconds",
                                             "From arrival to the first generated token", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.inter_token_latency = Histogram("ulm_inter_token_latency_seconds",
                                             "Between consecutive tokens of one request", buckets=LATENCY_BUCKETS,
                                             registry=r)
        self.generated_tokens = Counter("ulm_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("ulm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.context_slides = Counter("ulm_context_slides", "Times a sequence filled the context and went on from "
                                      "its last half", registry=r)
        self.batch_size = Histogram("ulm_decode_batch_size", "Requests per decode step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self._http = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Expose /metrics over HTTP; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's current value (0 if never set), e.g. value("ulm_finished_requests_total", {...})."""
        v = self.registry.get_sample_value(name, labels or {})
        return 0.0 if v is None else v
