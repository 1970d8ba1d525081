package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/prometheus/client_golang/prometheus"
)

// Identity is who a sidecar is: the unit it serves and the service beside it.
// It must equal the identity in the sidecar's certificate.
type Identity struct {
	Region  string
	Unit    string
	Service string
}

// Config configures a Sidecar. A zero field means its default, given in the
// field's comment. New copies it; the caller's struct is never modified.
type Config struct {
	// Identity is required: the region, unit and service of this sidecar.
	Identity Identity
	// App is the local app's address (host:port), required. Inbound
	// requests go there over HTTP/1.1.
	App string
	// TLS holds the mesh CA bundle and this sidecar's certificate, required.
	TLS *meshtls.Store

	// Outbound is where the local app sends its requests (HTTP/1.1 and
	// h2c). Default 127.0.0.1:15001.
	Outbound string
	// InboundQUIC is the UDP address other sidecars reach over QUIC
	// (HTTP/3, mutual TLS). Default 127.0.0.1:15443. "off" disables it.
	InboundQUIC string
	// InboundTCP is the TCP address of the HTTP/2-over-TLS fallback for
	// networks that drop UDP. Default off (empty).
	InboundTCP string
	// Admin serves /healthz, /readyz, /metrics and /config. Default
	// 127.0.0.1:15000.
	Admin string

	Timeouts Timeouts
	Limits   Limits
	// Retries is how many more endpoints a request may try when the one
	// picked could not be reached before anything was sent. Default 1;
	// -1 means none.
	Retries int
	// MisrouteCorrection forwards a request for a shard this unit does not
	// own once to the owner, instead of answering 421.
	MisrouteCorrection bool
	// DrainTimeout bounds how long Run waits for in-flight requests after
	// its context ends. Default 20s. Keep it over 5s: net/http waits that
	// long before it counts a client's fresh, still unused connection as
	// idle (it may be about to carry a request).
	DrainTimeout time.Duration
	// EjectTime is how long an endpoint that could not be reached is
	// skipped by endpoint picking. Default 5s.
	EjectTime time.Duration

	// Logger gets the sidecar's logs; nil discards them.
	Logger *slog.Logger
	// Registry gets the sidecar's metrics and is served on /metrics; nil
	// means a new registry of its own.
	Registry *prometheus.Registry
}

// Timeouts bound each stage of a forwarded request.
type Timeouts struct {
	// Connect bounds a QUIC or TLS handshake with a peer sidecar, and the
	// TCP connect to the local app. Default 2s.
	Connect time.Duration
	// PerTry bounds one attempt, from the end of the request body (at
	// once without one) to the response headers. Default 15s.
	PerTry time.Duration
	// Overall bounds all attempts together, counted like PerTry. Uploads
	// and response bodies then stream for as long as they take, as with
	// Envoy's route timeout. Default 30s.
	Overall time.Duration
	// Idle closes a peer connection with no traffic for this long. Default 60s.
	Idle time.Duration
	// StreamIdle cuts a request whose bodies move no byte either way for
	// this long (a stalled upload, a stopped response). Default 5m, as
	// Envoy's stream_idle_timeout.
	StreamIdle time.Duration
}

// Limits refuse oversized requests with a 4xx before they are forwarded.
type Limits struct {
	// MaxHeaderBytes bounds the request line and headers (431). Default 64 KiB.
	MaxHeaderBytes int
	// MaxBodyBytes bounds a request body (413); 0 means unlimited (the
	// default: bodies stream with bounded memory whatever their size).
	MaxBodyBytes int64
	// MaxStreamsPerPeer is how many concurrent requests one peer
	// connection carries. Default 1000.
	MaxStreamsPerPeer int
}

// Defaults.
const (
	DefaultOutbound    = "127.0.0.1:15001"
	DefaultInboundQUIC = "127.0.0.1:15443"
	DefaultAdmin       = "127.0.0.1:15000"
	// Off disables a listener.
	Off = "off"
)

// ConfigError lists every problem of a Config at once.
type ConfigError struct{ Problems []string }

func (e *ConfigError) Error() string {
	return "sidecar config: " + strings.Join(e.Problems, "; ")
}

// withDefaults returns a filled copy of c, or every problem found.
func (c Config) withDefaults() (Config, error) {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	defd := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.Outbound, DefaultOutbound)
	def(&c.InboundQUIC, DefaultInboundQUIC)
	def(&c.Admin, DefaultAdmin)
	if c.InboundTCP == "" {
		c.InboundTCP = Off
	}
	defd(&c.Timeouts.Connect, 2*time.Second)
	defd(&c.Timeouts.PerTry, 15*time.Second)
	defd(&c.Timeouts.Overall, 30*time.Second)
	defd(&c.Timeouts.Idle, 60*time.Second)
	defd(&c.Timeouts.StreamIdle, 5*time.Minute)
	defd(&c.DrainTimeout, 20*time.Second)
	defd(&c.EjectTime, 5*time.Second)
	if c.Limits.MaxHeaderBytes == 0 {
		c.Limits.MaxHeaderBytes = 64 << 10
	}
	if c.Limits.MaxStreamsPerPeer == 0 {
		c.Limits.MaxStreamsPerPeer = 1000
	}
	switch {
	case c.Retries == 0:
		c.Retries = 1
	case c.Retries < 0:
		c.Retries = 0
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Registry == nil {
		c.Registry = prometheus.NewRegistry()
	}

	var ps []string
	bad := func(format string, args ...any) { ps = append(ps, fmt.Sprintf(format, args...)) }
	if c.Identity.Region == "" || c.Identity.Unit == "" || c.Identity.Service == "" {
		bad("identity needs region, unit and service (got %q, %q, %q)", c.Identity.Region, c.Identity.Unit, c.Identity.Service)
	}
	if strings.ToLower(c.Identity.Service) != c.Identity.Service {
		bad("identity: service %q: service names are lowercase (they are matched against the Host header)", c.Identity.Service)
	}
	if c.TLS == nil {
		bad("tls: no certificate store: give the mesh CA bundle, a certificate and its key")
	} else if id := c.TLS.ID(); id.Region != c.Identity.Region || id.Unit != c.Identity.Unit || id.Service != c.Identity.Service {
		bad("tls: the certificate is for %s, but this sidecar is region %s unit %s service %s: issue a certificate for this identity (cellmesh certs issue)",
			id, c.Identity.Region, c.Identity.Unit, c.Identity.Service)
	}
	checkAddr := func(name, a string, allowOff bool) {
		if allowOff && a == Off {
			return
		}
		if _, err := netip.ParseAddrPort(a); err != nil {
			bad("%s address %q: want ip:port, such as 127.0.0.1:15001", name, a)
		}
	}
	if c.App == "" {
		bad("app: the local app's address is required (host:port)")
	} else if err := checkHostPort(c.App); err != nil {
		bad("app address %q: %v", c.App, err)
	}
	checkAddr("outbound", c.Outbound, false)
	checkAddr("inbound_quic", c.InboundQUIC, true)
	checkAddr("inbound_tcp", c.InboundTCP, true)
	checkAddr("admin", c.Admin, true)
	if c.InboundQUIC == Off && c.InboundTCP == Off {
		bad("inbound: both inbound_quic and inbound_tcp are off: other units could not reach this one")
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{
		{"timeouts.connect", c.Timeouts.Connect}, {"timeouts.per_try", c.Timeouts.PerTry},
		{"timeouts.overall", c.Timeouts.Overall}, {"timeouts.idle", c.Timeouts.Idle}, {"timeouts.stream_idle", c.Timeouts.StreamIdle},
		{"drain_timeout", c.DrainTimeout}, {"eject_time", c.EjectTime},
	} {
		if d.d < 0 {
			bad("%s is negative (%s)", d.name, d.d)
		}
	}
	if c.Timeouts.PerTry > c.Timeouts.Overall {
		bad("timeouts.per_try (%s) is longer than timeouts.overall (%s)", c.Timeouts.PerTry, c.Timeouts.Overall)
	}
	if c.Limits.MaxHeaderBytes < 1024 || c.Limits.MaxHeaderBytes > 1<<20 {
		bad("limits.max_header_bytes %d: want 1024..1048576", c.Limits.MaxHeaderBytes)
	}
	if c.Limits.MaxBodyBytes < 0 {
		bad("limits.max_body_bytes %d is negative (0 means unlimited)", c.Limits.MaxBodyBytes)
	}
	if c.Limits.MaxStreamsPerPeer < 1 || c.Limits.MaxStreamsPerPeer > 1<<16 {
		bad("limits.max_streams_per_peer %d: want 1..65536", c.Limits.MaxStreamsPerPeer)
	}
	if len(ps) > 0 {
		return c, &ConfigError{Problems: ps}
	}
	return c, nil
}

func checkHostPort(a string) error {
	i := strings.LastIndexByte(a, ':')
	if i <= 0 || i == len(a)-1 {
		return errors.New("want host:port")
	}
	return nil
}
