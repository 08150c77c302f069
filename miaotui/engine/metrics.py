"""Prometheus metrics of one engine: its own registry (no globals), updated by AsyncEngine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class EngineMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, labels, buckets=LATENCY_BUCKETS, registry=r).labels(
                model_name
            )

        self.running = gauge("miaotui_num_requests_running", "Requests in the running batch")
        self.waiting = gauge("miaotui_num_requests_waiting", "Requests waiting in the queue")
        self.kv_usage = gauge("miaotui_kv_cache_usage_perc", "Fraction of KV blocks in use")
        self.prefix_hit_rate = gauge(
            "miaotui_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache (fraction)"
        )
        self.prefix_queries = counter(
            "miaotui_prefix_cache_queries", "Prompt tokens looked up in the prefix cache"
        )
        self.prefix_hits = counter("miaotui_prefix_cache_hits", "Prompt tokens found cached")
        self.prompt_tokens = counter("miaotui_prompt_tokens", "Prompt tokens computed")
        self.generation_tokens = counter("miaotui_generation_tokens", "Tokens generated")
        self.requests_finished = counter("miaotui_request_success", "Requests finished")
        self.requests_aborted = counter(
            "miaotui_request_aborted", "Requests aborted (client left, abort() or a failed step)"
        )
        self.requests_rejected = counter(
            "miaotui_request_rejected", "Requests refused because the queue was full (429)"
        )
        self.step_failures = counter(
            "miaotui_engine_step_failures", "Steps that raised (their requests were aborted)"
        )
        self.preemptions = counter("miaotui_num_preemptions", "Requests preempted")
        self.spec_draft_tokens = counter(
            "miaotui_spec_decode_num_draft_tokens", "Proposed tokens scored (speculative decoding)"
        )
        self.spec_accepted_tokens = counter(
            "miaotui_spec_decode_num_accepted_tokens", "Proposed tokens accepted"
        )
        self.spec_propose_seconds = counter(
            "miaotui_spec_decode_propose_seconds",
            "Time spent proposing tokens (prompt lookup or the draft model)",
        )
        self.spec_drafts = counter(
            "miaotui_spec_decode_num_drafts", "Proposal runs scored (one per request and step)"
        )
        self.spec_draft_seconds = counter(
            "miaotui_spec_decode_draft_seconds", "Time in the draft model's forward passes"
        )
        self.spec_verify_seconds = counter(
            "miaotui_spec_decode_verify_seconds",
            "Time in forward passes that scored proposals, and in their verification",
        )
        self.spec_acceptance_rate = gauge(
            "miaotui_spec_decode_acceptance_rate", "Accepted / proposed tokens so far"
        )
        self.spec_mean_accepted_length = gauge(
            "miaotui_spec_decode_mean_accepted_length",
            "Accepted tokens per scored proposal run so far (a step yields 1 + this)",
        )
        self.ttft = histogram("miaotui_time_to_first_token_seconds", "Time to first token")
        self.itl = histogram("miaotui_inter_token_latency_seconds", "Time between output tokens")
        self.e2e = histogram("miaotui_e2e_request_latency_seconds", "Request latency end to end")

    def render(self) -> bytes:
        return generate_latest(self.registry)
