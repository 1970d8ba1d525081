package proxy

import (
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the sidecar's Prometheus metrics (DESIGN.md, "Metrics").
type metrics struct {
	requests    *prometheus.CounterVec
	duration    *prometheus.HistogramVec
	misrouted   *prometheus.CounterVec
	fenced      prometheus.Counter
	noLease     *prometheus.CounterVec
	staleReads  prometheus.Counter
	holdSeconds prometheus.Histogram
	inflight    *prometheus.GaugeVec
	// inflightBy are inflight's two children, looked up once.
	inflightBy  map[string]prometheus.Gauge
	tlsRejected *prometheus.CounterVec
	unreachable *prometheus.CounterVec
	reloads     *prometheus.CounterVec
	mapVersion  prometheus.Gauge
	ready       prometheus.Gauge

	xdsConnected  prometheus.Gauge
	xdsUpdates    *prometheus.CounterVec
	xdsReconnects prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, s *Sidecar) *metrics {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_requests_total",
			Help: "Requests handled by the sidecar, by direction (outbound from the local app, inbound from a peer), service, source and destination unit, zone, status code and whether they were shadow traffic.",
		}, []string{"direction", "service", "src_unit", "dst_unit", "zone", "code", "shadow"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:                            "cellmesh_request_duration_seconds",
			Help:                            "Time from a request's arrival at the sidecar to its response headers.",
			Buckets:                         []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
			NativeHistogramBucketFactor:     1.1,
			NativeHistogramMaxBucketNumber:  100,
			NativeHistogramMinResetDuration: time.Hour,
		}, []string{"direction", "service", "dst_unit"}),
		misrouted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_misrouted_requests_total",
			Help: "Inbound requests for a shard this unit does not own, by what the sidecar did: answered 421 or corrected (forwarded once to the owner).",
		}, []string{"action"}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cellmesh_fenced_requests_total",
			Help: "Inbound requests refused because they carried an older epoch of their shard than this sidecar's map.",
		}),
		holdSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cellmesh_handoff_hold_seconds",
			Help:    "How long requests for a shard being handed off (draining) were held at its old owner before they went on (to the app or the new owner) or were refused.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		noLease: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_lease_refused_total",
			Help: "Requests for this unit's shards refused (503 no-lease) because the unit holds no lease from the control plane, by request (write, or a read that asked for x-cellmesh-consistency: linearizable).",
		}, []string{"request"}),
		staleReads: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cellmesh_stale_reads_total",
			Help: "Reads of this unit's shards served while the unit held no lease, marked x-cellmesh-stale: their data may be older than a new owner's.",
		}),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "cellmesh_requests_in_flight",
			Help: "Requests being handled now, by direction.",
		}, []string{"direction"}),
		tlsRejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_tls_rejected_total",
			Help: "Peer certificates refused, by direction (inbound: a client; outbound: a peer we dialled; xds: a control-plane replica we dialled) and reason.",
		}, []string{"direction", "reason"}),
		unreachable: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_upstream_connect_failures_total",
			Help: "Failed connections to peer sidecars, by destination unit.",
		}, []string{"dst_unit"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_config_reloads_total",
			Help: "Shard map and endpoint updates, by result (ok, error).",
		}, []string{"result"}),
		mapVersion: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cellmesh_shard_map_version",
			Help: "Version of the shard map the sidecar routes with; 0 before the first.",
		}),
		ready: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cellmesh_ready",
			Help: "1 while the sidecar is ready for traffic (a shard map loaded, listening, not draining).",
		}),
		xdsConnected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cellmesh_xds_connected",
			Help: "1 while an xDS stream with a control-plane replica is open.",
		}),
		xdsUpdates: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_xds_updates_total",
			Help: "xDS responses handled, by type (cluster, endpoint, shardmap, lease) and result (ack: applied or already in use; nack: refused, the last good one kept).",
		}, []string{"type", "result"}),
		xdsReconnects: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cellmesh_xds_reconnects_total",
			Help: "xDS streams opened (or tried) after the first, to the same or another control-plane replica.",
		}),
	}
	m.inflightBy = map[string]prometheus.Gauge{
		"outbound": m.inflight.WithLabelValues("outbound"),
		"inbound":  m.inflight.WithLabelValues("inbound"),
	}
	certExpiry := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cellmesh_certificate_expiry_timestamp_seconds",
		Help: "When this sidecar's certificate expires, as a Unix time.",
	}, func() float64 { return float64(s.cfg.TLS.NotAfter().Unix()) })
	leaseRemaining := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "cellmesh_lease_remaining_seconds",
		Help: "How long the unit's lease from the control plane lasts, as this sidecar counts it (0: none or ended).",
	}, func() float64 { return s.LeaseRemaining().Seconds() })
	reg.MustRegister(m.requests, m.duration, m.misrouted, m.fenced, m.noLease, m.staleReads, m.holdSeconds, m.inflight, m.tlsRejected,
		m.unreachable, m.reloads, m.mapVersion, m.ready, certExpiry, m.xdsConnected, m.xdsUpdates, m.xdsReconnects, leaseRemaining)
	return m
}

// observe records one finished request.
func (m *metrics) observe(direction, service, src, dst, zone string, code int, shadow bool, d time.Duration) {
	sh := "false"
	if shadow {
		sh = "true"
	}
	m.requests.WithLabelValues(direction, service, src, dst, zone, codeString(code), sh).Inc()
	m.duration.WithLabelValues(direction, service, dst).Observe(d.Seconds())
}

var codeStrings = func() (s [600]string) {
	for i := range s {
		s[i] = strconv.Itoa(i)
	}
	return s
}()

func codeString(c int) string {
	if c >= 0 && c < len(codeStrings) {
		return codeStrings[c]
	}
	return strconv.Itoa(c)
}
