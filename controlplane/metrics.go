package controlplane

import (
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	pushDuration   prometheus.Histogram
	pushBytes      *prometheus.HistogramVec
	publishErrors  prometheus.Counter
	connected      prometheus.Gauge
	acks           *prometheus.CounterVec
	api            *prometheus.CounterVec
	moves          *prometheus.CounterVec
	handoffs       *prometheus.CounterVec
	handoffSeconds *prometheus.HistogramVec
	writePause     prometheus.Histogram
	drills         *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, r *Replica) *metrics {
	m := &metrics{
		pushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cellmesh_xds_push_duration_seconds",
			Help:    "Time from a change of the replica's state to its publication over xDS (build, consistency check, cache update).",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1},
		}),
		pushBytes: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cellmesh_xds_push_bytes",
			Help:    "Size of the resources of each xDS response sent, by type.",
			Buckets: prometheus.ExponentialBuckets(256, 4, 9),
		}, []string{"type"}),
		publishErrors: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cellmesh_xds_publish_errors_total",
			Help: "States that failed to build or publish (the previous version stays served).",
		}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "cellmesh_xds_connected_clients",
			Help: "xDS streams open on this replica (one per sidecar).",
		}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_xds_acks_total",
			Help: "Responses acknowledged (ack) or refused (nack) by xDS clients, by type.",
		}, []string{"type", "result"}),
		api: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_api_requests_total",
			Help: "Operator API requests by method, route and status code (forwarded: relayed to the leader).",
		}, []string{"method", "route", "code"}),
		handoffs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_handoffs_total",
			Help: "Handoffs run by this replica as leader, by kind (planned, unplanned) and result (done, blocked).",
		}, []string{"kind", "result"}),
		handoffSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "cellmesh_handoff_duration_seconds",
			Help:    "Handoffs from their start (planned: the operator's call; unplanned: gossip finding the unit down) to the new primary promoted.",
			Buckets: []float64{.05, .1, .25, .5, 1, 2, 4, 6, 10, 20},
		}, []string{"kind"}),
		drills: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_drills_total",
			Help: "Drills run by this replica as leader, by kind and how they ended (done, aborted, failed).",
		}, []string{"kind", "result"}),
		writePause: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "cellmesh_handoff_write_pause_seconds",
			Help:    "Planned handoffs from draining (writes held) to the new primary's map published.",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}),
		moves: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_shard_moves_total",
			Help: "Shard moves committed by this replica as leader, by reason.",
		}, []string{"reason"}),
	}
	st := r.store
	gauge := func(name, help string, f func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f)
	}
	reg.MustRegister(m.pushDuration, m.pushBytes, m.publishErrors, m.connected, m.acks, m.api, m.moves, m.handoffs, m.handoffSeconds, m.writePause, m.drills,
		gauge("cellmesh_raft_leader", "1 when this replica is the raft leader.", func() float64 {
			if st.IsLeader() {
				return 1
			}
			return 0
		}),
		gauge("cellmesh_raft_term", "The raft term this replica is in.", func() float64 { return float64(st.Stats().Term) }),
		gauge("cellmesh_raft_commit_index", "The raft commit index this replica knows.", func() float64 { return float64(st.Stats().Commit) }),
		gauge("cellmesh_raft_applied_index", "The raft index this replica has applied.", func() float64 { return float64(st.Stats().Applied) }),
		gauge("cellmesh_state_index", "The raft index of the last change of the state (the xDS version it serves).", func() float64 { return float64(st.State().Index) }),
		gauge("cellmesh_map_version", "The shard map version this replica holds.", func() float64 {
			if m := st.Map(); m != nil {
				return float64(m.Version())
			}
			return 0
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "cellmesh_registered_endpoints", Help: "Sidecars registered as endpoints in the state."},
			func() float64 { return float64(len(st.State().Endpoints)) }),
	)
	for _, s := range []string{"Follower", "Candidate", "Leader", "Shutdown"} {
		reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "cellmesh_raft_state", Help: "1 for the raft state this replica is in.", ConstLabels: prometheus.Labels{"state": s},
		}, func() float64 {
			if st.Stats().State == s {
				return 1
			}
			return 0
		}))
	}
	return m
}
