"""GET /metrics: the Prometheus text exposition, built by prometheus-client from a
collector that reads the gateway's own counters at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

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
        connects = CounterMetricFamily("tunnelgate_carrier_connects", "Carriers that came up",
                                       labels=["peer", "direction"])
        for (peer, direction), n in sorted(stats.connects.items()):
            connects.add_metric([peer, direction], n)
        yield connects
        losses = CounterMetricFamily("tunnelgate_carrier_losses", "Carriers that went down, by reason",
                                     labels=["peer", "reason"])
        for (peer, reason), n in sorted(stats.losses.items()):
            losses.add_metric([peer, reason], n)
        yield losses

        s = v.sessions
        opened = GaugeMetricFamily("tunnelgate_sessions_open", "Sessions (and UDP flows) open now",
                                   labels=["role", "tunnel"])
        for (role, tunnel), n in sorted(s.open_by.items()):
            opened.add_metric([role, tunnel], n)
        yield opened
        ended = CounterMetricFamily("tunnelgate_sessions", "Sessions ended, by outcome (ok or reset)",
                                    labels=["role", "tunnel", "outcome"])
        for (role, tunnel, outcome), n in sorted(s.ended.items()):
            ended.add_metric([role, tunnel, outcome], n)
        yield ended
        moved = CounterMetricFamily("tunnelgate_session", "Session bytes, towards the target (out)"
                                    " and back", labels=["role", "tunnel", "direction"], unit="bytes")
        live = v.live_bytes()
        for key in sorted(set(s.bytes_out) | set(live)):
            out, back = live.get(key, (0, 0))
            moved.add_metric([*key, "out"], s.bytes_out[key] + out)
            moved.add_metric([*key, "back"], s.bytes_back[key] + back)
        yield moved
        refused = CounterMetricFamily("tunnelgate_refusals", "Sessions refused (OPEN_FAIL), by code",
                                      labels=["code"])
        for code, n in sorted(s.refusals.items()):
            refused.add_metric([code], n)
        yield refused

        r = v.resume
        yield GaugeMetricFamily("tunnelgate_sessions_parked", "Resumable sessions waiting for a route",
                                value=len(r.parked))
        yield GaugeMetricFamily("tunnelgate_resume_buffer_bytes",
                                "Bytes held for retransmission by resumable sessions", value=r.buffered)


def registry_for(view: GatewayView) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(view))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
