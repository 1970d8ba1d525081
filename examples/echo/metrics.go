package echo

import (
	"errors"
	"strconv"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics counts what the handler answered. A nil *metrics counts nothing.
type metrics struct {
	requests  *prometheus.CounterVec
	bodyBytes prometheus.Counter
	// byCode caches requests' child per status code, so the hot path neither
	// formats the code nor hashes label values.
	byCode [600]atomic.Pointer[counter]
}

type counter struct{ prometheus.Counter }

func newMetrics(reg prometheus.Registerer) *metrics {
	if reg == nil {
		return nil
	}
	return &metrics{
		requests: register(reg, prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "cellmesh_echo_requests_total",
			Help: "Requests answered by the echo service, by status code.",
		}, []string{"code"})),
		bodyBytes: register(reg, prometheus.NewCounter(prometheus.CounterOpts{
			Name: "cellmesh_echo_request_body_bytes_total",
			Help: "Request body bytes read by the echo service.",
		})),
	}
}

// register registers c on reg, or returns the collector already registered
// in its place, so that several handlers can share one registry.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	err := reg.Register(c)
	if are, ok := errors.AsType[prometheus.AlreadyRegisteredError](err); ok {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing
		}
	}
	return c
}

func (m *metrics) request(code int) {
	if m == nil {
		return
	}
	if code < 0 || code >= len(m.byCode) {
		m.requests.WithLabelValues(strconv.Itoa(code)).Inc()
		return
	}
	c := m.byCode[code].Load()
	if c == nil {
		c = &counter{m.requests.WithLabelValues(strconv.Itoa(code))}
		m.byCode[code].Store(c)
	}
	c.Inc()
}

func (m *metrics) body(n int64) {
	if m == nil || n <= 0 {
		return
	}
	m.bodyBytes.Add(float64(n))
}
