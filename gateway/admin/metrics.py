"""GET /metrics: the Prometheus text exposition, built by prometheus-client from a
collector that reads the gateway's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.admin.view import VERSION, GatewayView

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayCollector(Collector):
    def __init__(self, view: GatewayView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        v = self.view
        gw = v.config.gateway
        info = GaugeMetricFamily("tunnelgate_info", "This gateway (value 1)",
                                 labels=["name", "fingerprint", "instance", "version"])
        info.add_metric([gw.name, v.fingerprint, v.instance, VERSION], 1)
        yield info
        yield GaugeMetricFamily("tunnelgate_uptime_seconds", "Seconds since the gateway started",
                                value=v.uptime)

        up = GaugeMetricFamily("tunnelgate_carriers_up", "Carriers up, per peer", labels=["peer"])
        rtt = GaugeMetricFamily("tunnelgate_carrier_rtt_seconds", "Last measured round trip (PING)",
                                labels=["peer", "instance", "direction"])
        counts: dict[str, int] = {p.name: 0 for p in v.config.peer}
        for carrier in v.carriers():
            peer = carrier.peer_name or ""
            counts[peer] = counts.get(peer, 0) + 1
            if carrier.rtt is not None:
                rtt.add_metric([peer, carrier.peer_instance, carrier.direction], carrier.rtt)
        for peer, n in sorted(counts.items()):
            up.add_metric([peer], n)
        yield up
        yield rtt
        stats = v.links.stats
        yield _family(CounterMetricFamily("tunnelgate_carrier_connects", "Carriers that came up",
                                          labels=["peer", "direction"]), stats.connects)
        yield _family(CounterMetricFamily("tunnelgate_carrier_losses", "Carriers that went down, by reason",
                                          labels=["peer", "reason"]), stats.losses)

        s = v.sessions
        yield _family(GaugeMetricFamily("tunnelgate_sessions_open", "Sessions (and UDP flows) open now",
                                        labels=["role", "tunnel"]), s.open_by)
        yield _family(CounterMetricFamily("tunnelgate_sessions", "Sessions ended, by outcome (ok or reset)",
                                          labels=["role", "tunnel", "outcome"]), s.ended)
        moved = CounterMetricFamily("tunnelgate_session", "Session bytes, towards the target (out)"
                                    " and back", labels=["role", "tunnel", "direction"], unit="bytes")
        live = v.live_bytes()
        for key in sorted(set(s.bytes_out) | set(live)):
            out, back = live.get(key, (0, 0))
            moved.add_metric([*key, "out"], s.bytes_out[key] + out)
            moved.add_metric([*key, "back"], s.bytes_back[key] + back)
        yield moved
        yield _family(CounterMetricFamily("tunnelgate_udp_datagrams_dropped",
                                          "UDP datagrams lost in the tunnel (full queues, no route,"
                                          " refused clients, full sockets)", labels=["role", "tunnel"]),
                      s.udp_dropped)
        yield _family(CounterMetricFamily("tunnelgate_refusals", "Sessions refused (OPEN_FAIL), by code",
                                          labels=["code"]), {(code,): n for code, n in s.refusals.items()})

        r = v.resume
        yield GaugeMetricFamily("tunnelgate_sessions_parked", "Resumable sessions waiting for a route",
                                value=len(r.parked))
        yield GaugeMetricFamily("tunnelgate_resume_buffer_bytes",
                                "Bytes held for retransmission by resumable sessions", value=r.buffered)


def _family(family: GaugeMetricFamily | CounterMetricFamily,
            values: Mapping[Any, int]) -> Metric:
    """`family` with one sample per label tuple of `values`, in a stable order."""
    for labels, n in sorted(values.items()):
        family.add_metric(list(labels), n)
    return family


def registry_for(view: GatewayView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(view))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
