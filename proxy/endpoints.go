package proxy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"sort"
	"strings"
	"sync/atomic"
	"time"
)

// Transport is how a sidecar reaches a peer's inbound listener.
type Transport string

const (
	// QUIC is HTTP/3 over QUIC with mutual TLS, the default.
	QUIC Transport = "quic"
	// H2 is HTTP/2 over TLS on TCP, for networks that drop UDP.
	H2 Transport = "h2"
)

// Endpoint is one sidecar's inbound listener: where requests for a service
// in a unit can be sent.
type Endpoint struct {
	Service   string    `json:"service"`
	Unit      string    `json:"unit"`
	Address   string    `json:"address"`
	Transport Transport `json:"transport"`
}

func (e Endpoint) key() string { return string(e.Transport) + "://" + e.Address }

// endpoint is an Endpoint with its live counters. The counters survive a
// SetEndpoints that keeps the endpoint, so least-request picking stays right.
type endpoint struct {
	Endpoint
	stats *endpointStats
}

type endpointStats struct {
	inflight     atomic.Int64
	ejectedUntil atomic.Int64 // unix nanos; 0 = healthy
	failures     atomic.Int64 // consecutive connect failures
}

// endpointSet is an immutable index of endpoints by service and unit.
type endpointSet struct {
	version uint64
	all     []*endpoint
	by      map[string]map[string][]*endpoint // service -> unit -> endpoints
	byAddr  map[string]*endpoint              // transport://address -> endpoint
}

// newEndpointSet validates eps and indexes them, reusing the counters of
// prev's endpoints that stay.
func newEndpointSet(eps []Endpoint, version uint64, prev *endpointSet) (*endpointSet, error) {
	s := &endpointSet{version: version, by: map[string]map[string][]*endpoint{}, byAddr: map[string]*endpoint{}}
	for i, e := range eps {
		if e.Transport == "" {
			e.Transport = QUIC
		}
		if err := e.validate(); err != nil {
			return nil, fmt.Errorf("endpoint %d (%s in %s at %s): %w", i, e.Service, e.Unit, e.Address, err)
		}
		if other, ok := s.byAddr[e.key()]; ok {
			return nil, fmt.Errorf("endpoint %d: %s %s is listed twice (also for %s in %s)", i, e.Transport, e.Address, other.Service, other.Unit)
		}
		ep := &endpoint{Endpoint: e}
		if prev != nil {
			if old, ok := prev.byAddr[e.key()]; ok && old.Service == e.Service && old.Unit == e.Unit {
				ep.stats = old.stats
			}
		}
		if ep.stats == nil {
			ep.stats = &endpointStats{}
		}
		s.all = append(s.all, ep)
		s.byAddr[e.key()] = ep
		units := s.by[e.Service]
		if units == nil {
			units = map[string][]*endpoint{}
			s.by[e.Service] = units
		}
		units[e.Unit] = append(units[e.Unit], ep)
	}
	return s, nil
}

func (e Endpoint) validate() error {
	if e.Service == "" || e.Unit == "" {
		return fmt.Errorf("service and unit are required")
	}
	if strings.ToLower(e.Service) != e.Service {
		return fmt.Errorf("service %q: service names are lowercase (they are matched against the Host header)", e.Service)
	}
	if e.Transport != QUIC && e.Transport != H2 {
		return fmt.Errorf("transport %q is unknown (want quic or h2)", e.Transport)
	}
	if _, err := netip.ParseAddrPort(e.Address); err != nil {
		return fmt.Errorf("address %q: want ip:port", e.Address)
	}
	return nil
}

// hasService reports whether any unit has an endpoint of svc.
func (s *endpointSet) hasService(svc string) bool { _, ok := s.by[svc]; return ok }

// pick returns the endpoint of svc in unit with the fewest requests in
// flight among the healthy ones, skipping those in avoid. With more than
// four candidates it compares two at random (power of two choices, as
// Envoy's least_request does). When every endpoint is ejected it picks
// among all of them rather than fail (Envoy's panic threshold).
func (s *endpointSet) pick(svc, unit string, now time.Time, avoid *endpoint) *endpoint {
	eps := s.by[svc][unit]
	nowN := now.UnixNano()
	var best *endpoint
	consider := func(e *endpoint) {
		if e == avoid || e.stats.ejectedUntil.Load() > nowN {
			return
		}
		if best == nil || e.stats.inflight.Load() < best.stats.inflight.Load() {
			best = e
		}
	}
	if len(eps) > 4 {
		consider(eps[rand.IntN(len(eps))])
		consider(eps[rand.IntN(len(eps))])
	}
	if best == nil {
		for _, e := range eps {
			consider(e)
		}
	}
	if best == nil {
		for _, e := range eps {
			if e != avoid && (best == nil || e.stats.inflight.Load() < best.stats.inflight.Load()) {
				best = e
			}
		}
	}
	return best
}

// EndpointStatus is an endpoint with its live state, as /config shows it.
type EndpointStatus struct {
	Endpoint
	InFlight int64 `json:"in_flight"`
	Healthy  bool  `json:"healthy"`
}

func (s *endpointSet) status(now time.Time) []EndpointStatus {
	out := make([]EndpointStatus, 0, len(s.all))
	for _, e := range s.all {
		out = append(out, EndpointStatus{Endpoint: e.Endpoint, InFlight: e.stats.inflight.Load(),
			Healthy: e.stats.ejectedUntil.Load() <= now.UnixNano()})
	}
	sort.Slice(out, func(i, j int) bool {
		a, b := out[i], out[j]
		if a.Service != b.Service {
			return a.Service < b.Service
		}
		if a.Unit != b.Unit {
			return a.Unit < b.Unit
		}
		return a.Address < b.Address
	})
	return out
}
