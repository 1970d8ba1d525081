package proxy

import (
	"encoding/json"
	"log"
	"log/slog"
	"net/http"
	"time"

	"github.com/cellmesh/cellmesh/routing"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// adminHandler serves the admin port: liveness, readiness, metrics and the
// current configuration.
func (s *Sidecar) adminHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		switch {
		case s.draining.Load():
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("draining\n"))
		case s.live.Load() == nil:
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("no shard map loaded yet\n"))
		case !s.started.Load():
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte("not serving yet\n"))
		default:
			w.Write([]byte("ready\n"))
		}
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.cfg.Registry, promhttp.HandlerOpts{Registry: s.cfg.Registry}))
	mux.HandleFunc("GET /config", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		enc.Encode(s.Status())
	})
	return mux
}

// Status is what /config shows: who the sidecar is, what it listens on,
// the map it routes with, the peers it knows and, in xDS mode, the
// control-plane replica it follows.
type Status struct {
	Identity struct {
		Region  string `json:"region"`
		Unit    string `json:"unit"`
		Service string `json:"service"`
		SPIFFE  string `json:"spiffe_id"`
	} `json:"identity"`
	Ready               bool              `json:"ready"`
	Draining            bool              `json:"draining"`
	Listen              Addrs             `json:"listen"`
	App                 string            `json:"app"`
	CertificateNotAfter time.Time         `json:"certificate_not_after"`
	MisrouteCorrection  bool              `json:"misroute_correction"`
	MapVersion          uint64            `json:"map_version"`
	EndpointsVersion    uint64            `json:"endpoints_version"`
	Topology            *routing.Topology `json:"topology"`
	Endpoints           []EndpointStatus  `json:"endpoints"`
	// XDS is the xDS client's state; absent when the map and endpoints
	// come from files.
	XDS *XDSStatus `json:"xds,omitempty"`
	// Lease is the unit's lease from the control plane, absent before the
	// first grant.
	Lease *LeaseStatus `json:"lease,omitempty"`
}

// Status returns the sidecar's state now.
func (s *Sidecar) Status() Status {
	var st Status
	st.Identity.Region, st.Identity.Unit, st.Identity.Service = s.cfg.Identity.Region, s.cfg.Identity.Unit, s.cfg.Identity.Service
	st.Identity.SPIFFE = s.cfg.TLS.ID().String()
	st.Ready, st.Draining = s.Ready(), s.draining.Load()
	st.Listen = s.Addrs()
	st.App = s.cfg.App
	st.CertificateNotAfter = s.cfg.TLS.NotAfter().UTC()
	st.MisrouteCorrection = s.cfg.MisrouteCorrection
	if m := s.live.Load(); m != nil {
		st.MapVersion = m.Version()
		st.Topology = m.Topology()
	}
	eps := s.endpoints.Load()
	st.EndpointsVersion = eps.version
	st.Endpoints = eps.status(time.Now())
	if c := s.xds.Load(); c != nil {
		x := c.snapshot()
		st.XDS = &x
	}
	st.Lease = s.leaseStatus()
	return st
}

// slogLogLogger routes net/http's internal error log (TLS handshake
// errors, garbage on a port) to slog at debug level: it is per-connection
// noise that a peer can cause at will.
func slogLogLogger(l *slog.Logger) *log.Logger {
	return slog.NewLogLogger(l.Handler(), slog.LevelDebug)
}
