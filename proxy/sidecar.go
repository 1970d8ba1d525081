package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/routing"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Sidecar runs beside one service instance: it routes the app's outbound
// requests to the user's home unit and serves requests from other units'
// sidecars to the app. Where a request goes comes from the shard map and
// endpoints given to SetMap and SetEndpoints, by a static file today and
// by the xDS client later; both can change while traffic flows.
type Sidecar struct {
	cfg Config
	log *slog.Logger
	m   *metrics

	live      routing.Live
	updateMu  sync.Mutex // serializes SetMap and SetEndpoints
	endpoints atomic.Pointer[endpointSet]
	up        *upstream
	outProxy  *httputil.ReverseProxy
	appProxy  *httputil.ReverseProxy
	// localProxy delivers the app's requests for its own unit and service.
	localProxy *httputil.ReverseProxy

	outSrv   *http.Server
	tcpSrv   *http.Server
	adminSrv *http.Server
	h3Srv    *http3.Server

	listenOnce sync.Once
	listenErr  error
	outLn      net.Listener
	tcpLn      net.Listener
	adminLn    net.Listener
	udpIn      *net.UDPConn
	quicTr     *quic.Transport
	quicLn     *quic.Listener

	started  atomic.Bool
	draining atomic.Bool
	closed   sync.Once

	xds atomic.Pointer[xdsClient] // set by RunXDS, for /config

	leaseMu sync.Mutex // serializes grants
	// health is the gossip view (empty without RunGossip); gossip is the
	// sidecar's member of the pool.
	health *failover.Health
	gossip atomic.Pointer[failover.Membership]
	// mapCh is closed at every map change (holders of draining writes
	// wait on it); held counts the writes held.
	mapCh atomic.Pointer[chan struct{}]
	held  atomic.Int64
	lease atomic.Pointer[leaseGrant]
}

// New checks cfg and builds a sidecar. It starts nothing and binds no
// socket: Listen does, and Run serves.
func New(cfg Config) (*Sidecar, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Sidecar{cfg: cfg}
	s.log = cfg.Logger.With("component", "sidecar", "region", cfg.Identity.Region, "unit", cfg.Identity.Unit, "service", cfg.Identity.Service)
	s.m = newMetrics(cfg.Registry, s)
	ch := make(chan struct{})
	s.mapCh.Store(&ch)
	s.health = failover.NewHealth(failover.HealthConfig{})
	cfg.Registry.MustRegister(s.health.Collector())
	s.endpoints.Store(&endpointSet{by: map[string]map[string][]*endpoint{}, byAddr: map[string]*endpoint{}})
	s.up = newUpstream(s)
	s.buildServers()
	return s, nil
}

// SetMap makes m the shard map requests are routed and fenced with. Maps
// only move forward (routing.ShardMap.CheckSuccessor): an older version, new
// contents under the same version, a falling epoch or a new primary without
// a new epoch is refused with *routing.SuccessorError. Requests in flight
// finish on the map they started with; none fails because of the swap.
func (s *Sidecar) SetMap(m *routing.ShardMap) error {
	if m == nil {
		return errors.New("set a nil shard map")
	}
	if _, ok := m.Unit(s.cfg.Identity.Unit); !ok {
		err := fmt.Errorf("shard map version %d does not declare this sidecar's unit %s", m.Version(), s.cfg.Identity.Unit)
		s.m.reloads.WithLabelValues("error").Inc()
		return err
	}
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	if cur := s.live.Load(); cur != nil {
		if err := cur.CheckSuccessor(m); err != nil {
			s.m.reloads.WithLabelValues("error").Inc()
			return err
		}
	}
	if err := s.live.Store(m); err != nil {
		s.m.reloads.WithLabelValues("error").Inc()
		return err
	}
	s.m.reloads.WithLabelValues("ok").Inc()
	s.m.mapVersion.Set(float64(m.Version()))
	s.updateReady()
	s.signalMap()
	return nil
}

// SetEndpoints replaces the endpoints of every service. version is the
// source's version of the list (0 for static files), shown by /config.
// Requests in flight keep their endpoint; the in-flight counts of the
// endpoints that stay carry over.
func (s *Sidecar) SetEndpoints(eps []Endpoint, version uint64) error {
	s.updateMu.Lock()
	defer s.updateMu.Unlock()
	set, err := newEndpointSet(eps, version, s.endpoints.Load())
	if err != nil {
		s.m.reloads.WithLabelValues("error").Inc()
		return err
	}
	s.endpoints.Store(set)
	s.m.reloads.WithLabelValues("ok").Inc()
	s.updateReady()
	return nil
}

// Map returns the current shard map, or nil before the first SetMap.
func (s *Sidecar) Map() *routing.ShardMap { return s.live.Load() }

// Ready reports whether the sidecar takes traffic: a map is loaded, it
// listens, and it is not draining.
func (s *Sidecar) Ready() bool {
	return s.live.Load() != nil && s.started.Load() && !s.draining.Load()
}

func (s *Sidecar) updateReady() {
	if s.Ready() {
		s.m.ready.Set(1)
	} else {
		s.m.ready.Set(0)
	}
}

// Addrs are the addresses a sidecar listens on; "" for a listener that is off.
type Addrs struct {
	Outbound, InboundQUIC, InboundTCP, Admin string
}

// Addrs returns the bound addresses, after Listen.
func (s *Sidecar) Addrs() Addrs {
	var a Addrs
	if s.outLn != nil {
		a.Outbound = s.outLn.Addr().String()
	}
	if s.udpIn != nil {
		a.InboundQUIC = s.udpIn.LocalAddr().String()
	}
	if s.tcpLn != nil {
		a.InboundTCP = s.tcpLn.Addr().String()
	}
	if s.adminLn != nil {
		a.Admin = s.adminLn.Addr().String()
	}
	return a
}

// Listen binds every listener. Run calls it when it has not been called;
// call it first to learn the ports chosen for ":0" addresses.
func (s *Sidecar) Listen() error {
	s.listenOnce.Do(func() { s.listenErr = s.listen() })
	return s.listenErr
}

func (s *Sidecar) listen() (err error) {
	defer func() {
		if err != nil {
			s.closeListeners()
		}
	}()
	bind := func(name, addr string) (net.Listener, error) {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("%s listener on %s: %w (is another process using the port?)", name, addr, err)
		}
		return ln, nil
	}
	var resetKey *quic.StatelessResetKey
	if k, err := s.cfg.TLS.DeriveKey("cellmesh quic stateless reset"); err == nil {
		rk := quic.StatelessResetKey(k)
		resetKey = &rk
	} else {
		s.log.Warn("no QUIC stateless reset key: after a restart, peers notice the old connections only at their idle timeout", "error", err)
	}
	if err := s.up.open(resetKey); err != nil {
		return err
	}
	if s.outLn, err = bind("outbound", s.cfg.Outbound); err != nil {
		return err
	}
	if s.cfg.Admin != Off {
		if s.adminLn, err = bind("admin", s.cfg.Admin); err != nil {
			return err
		}
	}
	if s.cfg.InboundTCP != Off {
		if s.tcpLn, err = bind("inbound_tcp", s.cfg.InboundTCP); err != nil {
			return err
		}
	}
	if s.cfg.InboundQUIC != Off {
		ua, err := net.ResolveUDPAddr("udp", s.cfg.InboundQUIC)
		if err != nil {
			return fmt.Errorf("inbound_quic address %s: %w", s.cfg.InboundQUIC, err)
		}
		if s.udpIn, err = net.ListenUDP("udp", ua); err != nil {
			return fmt.Errorf("inbound_quic listener on %s: %w (is another process using the port?)", s.cfg.InboundQUIC, err)
		}
		s.quicTr = &quic.Transport{Conn: s.udpIn, StatelessResetKey: resetKey}
		tc := s.cfg.TLS.ServerConfig(s.authorizePeer, s.tlsRejected("inbound"))
		tc.NextProtos = []string{http3.NextProtoH3}
		s.quicLn, err = s.quicTr.Listen(tc, &quic.Config{
			HandshakeIdleTimeout:  s.cfg.Timeouts.Connect,
			MaxIdleTimeout:        s.cfg.Timeouts.Idle,
			MaxIncomingStreams:    int64(s.cfg.Limits.MaxStreamsPerPeer),
			MaxIncomingUniStreams: 16,
			Allow0RTT:             false, // see inbound.go: no early data, so no replayed writes
		})
		if err != nil {
			return fmt.Errorf("inbound_quic listener on %s: %w", s.cfg.InboundQUIC, err)
		}
	}
	return nil
}

func (s *Sidecar) closeListeners() {
	for _, ln := range []net.Listener{s.outLn, s.tcpLn, s.adminLn} {
		if ln != nil {
			ln.Close()
		}
	}
	if s.quicLn != nil {
		s.quicLn.Close()
	}
	if s.quicTr != nil {
		s.quicTr.Close()
	}
	if s.udpIn != nil {
		s.udpIn.Close()
	}
}

// Run serves until ctx ends, then drains: it stops accepting, marks itself
// not ready, waits up to Config.DrainTimeout for requests in flight and
// returns nil when they all finished. It returns an error when a listener
// fails or the drain deadline passes with requests still in flight.
func (s *Sidecar) Run(ctx context.Context) error {
	if err := s.Listen(); err != nil {
		return err
	}
	if !s.started.CompareAndSwap(false, true) {
		return errors.New("sidecar: Run called twice")
	}
	s.updateReady()
	a := s.Addrs()
	s.log.Info("sidecar listening", "outbound", a.Outbound, "inbound_quic", a.InboundQUIC,
		"inbound_tcp", a.InboundTCP, "admin", a.Admin, "app", s.cfg.App, "identity", s.cfg.TLS.ID().String())

	errc := make(chan error, 4)
	serve := func(name string, f func() error) {
		go func() {
			err := f()
			if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, quic.ErrServerClosed) {
				errc <- fmt.Errorf("%s listener: %w", name, err)
				return
			}
			errc <- nil
		}()
	}
	n := 1
	serve("outbound", func() error { return s.outSrv.Serve(s.outLn) })
	if s.adminLn != nil {
		n++
		serve("admin", func() error { return s.adminSrv.Serve(s.adminLn) })
	}
	if s.tcpLn != nil {
		n++
		serve("inbound_tcp", func() error { return s.tcpSrv.ServeTLS(s.tcpLn, "", "") })
	}
	if s.quicLn != nil {
		n++
		serve("inbound_quic", func() error { return s.h3Srv.ServeListener(s.quicLn) })
	}

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		n--
		if runErr == nil {
			runErr = errors.New("a listener stopped unexpectedly")
		}
	}
	drainErr := s.drain()
	s.close()
	for ; n > 0; n-- {
		<-errc
	}
	return errors.Join(runErr, drainErr)
}

// drain stops accepting and waits for requests in flight.
func (s *Sidecar) drain() error {
	s.draining.Store(true)
	s.updateReady()
	start := time.Now()
	s.log.Info("draining: no new connections; waiting for requests in flight", "deadline_seconds", s.cfg.DrainTimeout.Seconds())
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.DrainTimeout)
	defer cancel()
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	shut := func(name string, f func(context.Context) error) {
		wg.Go(func() {
			if err := f(ctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
				mu.Unlock()
			}
		})
	}
	// Inbound first: the app may call other units while it finishes the
	// requests it has, so outbound keeps accepting until inbound drained.
	if s.tcpLn != nil {
		shut("inbound_tcp", s.tcpSrv.Shutdown)
	}
	if s.quicLn != nil {
		s.quicLn.Close()
		shut("inbound_quic", s.h3Srv.Shutdown)
	}
	wg.Wait()
	shut("outbound", s.outSrv.Shutdown)
	wg.Wait()
	if len(errs) > 0 {
		err := &DrainError{Timeout: s.cfg.DrainTimeout, Err: errors.Join(errs...)}
		s.log.Error("drain incomplete", "error", err)
		return err
	}
	s.log.Info("drained", "drain_seconds", time.Since(start).Seconds())
	return nil
}

// close releases everything; safe to call more than once.
func (s *Sidecar) close() {
	s.closed.Do(func() {
		s.outSrv.Close()
		s.tcpSrv.Close()
		s.h3Srv.Close()
		if s.adminSrv != nil {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			s.adminSrv.Shutdown(ctx)
			cancel()
		}
		s.closeListeners()
		s.up.close()
	})
}

// Close releases a sidecar whose Run was never called (or has returned).
func (s *Sidecar) Close() error {
	s.close()
	return nil
}

// authorizePeer accepts an inbound peer whose unit is in the current map,
// in the region the map gives it.
func (s *Sidecar) authorizePeer(peer meshtls.ID) error {
	if peer.Service == meshtls.ControlPlaneService {
		// A control-plane replica calls the handoff contract only (see
		// serveInbound); its certificate names a replica, not a unit.
		return nil
	}
	m := s.live.Load()
	if m == nil {
		return errors.New("no shard map loaded yet, so no unit can be authorized")
	}
	u, ok := m.Unit(peer.Unit)
	if !ok {
		return fmt.Errorf("unit %s is not in topology version %d", peer.Unit, m.Version())
	}
	if u.Region != peer.Region {
		return fmt.Errorf("certificate places unit %s in region %s, topology version %d in %s", peer.Unit, peer.Region, m.Version(), u.Region)
	}
	return nil
}

// tlsRejected logs and counts a refused peer certificate.
func (s *Sidecar) tlsRejected(direction string) func(remote string, err error) {
	return func(remote string, err error) {
		reason := "other"
		var ve *meshtls.VerifyError
		if errors.As(err, &ve) {
			reason = string(ve.Reason)
		}
		s.m.tlsRejected.WithLabelValues(direction, reason).Inc()
		s.log.Warn("peer certificate refused", "direction", direction, "remote", remote, "reason", reason, "error", err)
	}
}

// unreachable ejects an endpoint that could not be reached for EjectTime.
func (s *Sidecar) unreachable(ep *endpoint, err error) {
	s.m.unreachable.WithLabelValues(ep.Unit).Inc()
	n := ep.stats.failures.Add(1)
	until := time.Now().Add(s.cfg.EjectTime).UnixNano()
	if old := ep.stats.ejectedUntil.Swap(until); old < time.Now().UnixNano() {
		s.log.Warn("peer unreachable; skipping it", "peer_unit", ep.Unit, "peer_service", ep.Service, "address", ep.Address,
			"transport", string(ep.Transport), "failures", n, "eject_seconds", s.cfg.EjectTime.Seconds(), "error", err)
	}
}

// healthy clears an endpoint's failures after a response.
func (s *Sidecar) healthy(ep *endpoint) {
	if ep.stats.failures.Load() != 0 {
		ep.stats.failures.Store(0)
		ep.stats.ejectedUntil.Store(0)
	}
}

// DrainError: the drain deadline passed with requests still in flight,
// which were then cut.
type DrainError struct {
	Timeout time.Duration
	Err     error
}

func (e *DrainError) Error() string {
	return fmt.Sprintf("drain deadline of %s passed with requests in flight; they were cut (raise drain_timeout if they were legitimate): %v", e.Timeout, e.Err)
}

func (e *DrainError) Unwrap() error { return e.Err }
