package ledger

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	writeSeconds *prometheus.HistogramVec
	replication  *prometheus.CounterVec
	idempotent   prometheus.Counter
}

func newMetrics(reg prometheus.Registerer, l *Ledger) *metrics {
	m := &metrics{
		writeSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "ledger_write_duration_seconds",
			Help:    "Writes from arrival to answer, replication to the standby included, by operation.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"op"}),
		replication: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "ledger_replication_total",
			Help: "Replication rounds to a standby, by result (ok, failed).",
		}, []string{"result"}),
		idempotent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "ledger_idempotent_replays_total",
			Help: "Writes whose Idempotency-Key was applied before: answered with the first result, not applied again.",
		}),
	}
	lag := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "ledger_standby_apply_delay_seconds",
		Help: "The standby apply delay set for fault injection (0: none).",
	}, func() float64 { return float64(l.applyLag.Load()) / 1e9 })
	reg.MustRegister(m.writeSeconds, m.replication, m.idempotent, lag)
	return m
}
