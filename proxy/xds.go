package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	cluster "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// XDSConfig configures the sidecar's xDS client (RunXDS): the control-plane
// replicas it streams from and the listener it registers as its endpoint.
// A zero field means its default, given in the field's comment.
type XDSConfig struct {
	// Servers are the control-plane replicas (host:port), at least one.
	// The client streams from one at a time, in an order shuffled per
	// sidecar so that a fleet spreads over the replicas, and moves to the
	// next when a stream fails or ends.
	Servers []string
	// Advertise is the inbound listener this sidecar registers as its
	// endpoint: QUIC (the default) for inbound_quic, H2 for inbound_tcp.
	// That listener must be on.
	Advertise Transport
	// BackoffMin is the wait before reconnecting after a stream that got
	// a response ended. Default 250ms: a replica that went away is
	// replaced at once, without a fleet reconnecting in lockstep.
	BackoffMin time.Duration
	// BackoffMax bounds the wait, which doubles with every attempt in a
	// row that gets no response (jittered between half and all of it).
	// Default 10s: a fleet whose control plane is down costs it little,
	// and it is back within seconds of the control plane.
	BackoffMax time.Duration

	// warmTimeout and holdTimeout replace xdsWarmTimeout and
	// xdsHoldTimeout in tests.
	warmTimeout, holdTimeout time.Duration
}

// Defaults of XDSConfig.
const (
	DefaultXDSBackoffMin = 250 * time.Millisecond
	DefaultXDSBackoffMax = 10 * time.Second
)

// withDefaults returns a filled copy of c, or every problem found.
func (c XDSConfig) withDefaults() (XDSConfig, error) {
	c.Servers = slices.Clone(c.Servers)
	if c.Advertise == "" {
		c.Advertise = QUIC
	}
	if c.BackoffMin == 0 {
		c.BackoffMin = DefaultXDSBackoffMin
	}
	if c.BackoffMax == 0 {
		c.BackoffMax = DefaultXDSBackoffMax
	}
	if c.warmTimeout == 0 {
		c.warmTimeout = xdsWarmTimeout
	}
	if c.holdTimeout == 0 {
		c.holdTimeout = xdsHoldTimeout
	}
	ps := c.problems()
	if c.BackoffMin < 0 || c.BackoffMax < 0 {
		ps = append(ps, fmt.Sprintf("xds: backoff is negative (min %s, max %s)", c.BackoffMin, c.BackoffMax))
	} else if c.BackoffMin > c.BackoffMax {
		ps = append(ps, fmt.Sprintf("xds: backoff min %s is above max %s", c.BackoffMin, c.BackoffMax))
	}
	if len(ps) > 0 {
		return c, &ConfigError{Problems: ps}
	}
	return c, nil
}

// problems lists what is wrong with the servers and the transport; the
// static file reports them too.
func (c XDSConfig) problems() []string {
	var ps []string
	if len(c.Servers) == 0 {
		ps = append(ps, "xds: servers: at least one control-plane address (host:port) is required")
	}
	seen := map[string]bool{}
	for i, a := range c.Servers {
		if err := checkServer(a); err != nil {
			ps = append(ps, fmt.Sprintf("xds: servers[%d] %q: %v", i, a, err))
		} else if seen[a] {
			ps = append(ps, fmt.Sprintf("xds: servers[%d] %q is listed twice", i, a))
		}
		seen[a] = true
	}
	if c.Advertise != "" && c.Advertise != QUIC && c.Advertise != H2 {
		ps = append(ps, fmt.Sprintf("xds: advertise %q: want quic (the inbound_quic listener) or h2 (inbound_tcp)", c.Advertise))
	}
	return ps
}

func checkServer(a string) error {
	host, port, err := net.SplitHostPort(a)
	if err != nil || host == "" {
		return errors.New("want host:port, such as 10.0.0.5:7701")
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("port %q: want 1..65535", port)
	}
	return nil
}

// Short names of the xDS types, for metrics, logs and /config.
const (
	xdsCluster  = "cluster"
	xdsEndpoint = "endpoint"
	xdsShardMap = "shardmap"
	xdsLease    = "lease"
)

func xdsShort(typeURL string) string {
	switch typeURL {
	case resource.ClusterType:
		return xdsCluster
	case resource.EndpointType:
		return xdsEndpoint
	case xdsapi.ShardMapType:
		return xdsShardMap
	case xdsapi.LeaseType:
		return xdsLease
	}
	return typeURL
}

// maxXDSMessage bounds one response: the whole map, or every endpoint of
// the mesh, with room to spare over gRPC's default 4 MiB.
const maxXDSMessage = 64 << 20

// XDSStatus is the xDS client's state, as /config shows it.
type XDSStatus struct {
	Servers []string `json:"servers"`
	// Server is the replica of the open stream; empty while none is.
	Server    string `json:"server,omitempty"`
	Connected bool   `json:"connected"`
	// Versions are the last versions accepted (ACKed), by type: cluster,
	// endpoint, shardmap. They are the server's, opaque.
	Versions map[string]string `json:"versions"`
	// LastError is the last refused update or stream failure.
	LastError string `json:"last_error,omitempty"`
}

// RunXDS registers the sidecar with the control plane and follows the
// shard map and endpoints it serves, until ctx ends; it returns nil then,
// and an error only when cfg or the sidecar's listeners do not allow it
// to start. It binds the listeners (Listen) when that has not been done,
// as the address it registers is the bound one.
//
// One ADS stream carries clusters, endpoints and the map. A map or an
// endpoint list the sidecar cannot apply is refused (NACK) with the reason
// and the last good one stays. A stream that fails or ends moves on to the
// next replica after a jittered backoff; the sidecar routes on its last
// map meanwhile. Call RunXDS once per sidecar, beside Run.
func (s *Sidecar) RunXDS(ctx context.Context, cfg XDSConfig) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if err := s.Listen(); err != nil {
		return err
	}
	addr, err := s.advertised(cfg.Advertise)
	if err != nil {
		return err
	}
	c := newXDSClient(s, cfg, addr)
	if !s.xds.CompareAndSwap(nil, c) {
		return errors.New("xds: RunXDS called twice")
	}
	c.log.Info("xds client starting", "servers", strings.Join(cfg.Servers, ","), "advertise", string(cfg.Advertise), "address", addr, "node", c.node.GetId())
	c.run(ctx)
	c.log.Info("xds client stopped")
	return nil
}

// advertised is the bound address of the inbound listener of t.
func (s *Sidecar) advertised(t Transport) (string, error) {
	a := s.Addrs()
	name, addr := "inbound_quic", a.InboundQUIC
	if t == H2 {
		name, addr = "inbound_tcp", a.InboundTCP
	}
	if addr == "" {
		return "", fmt.Errorf("xds: advertise %s needs the %s listener, which is off", t, name)
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return "", fmt.Errorf("xds: %s listens on %q: %w", name, addr, err)
	}
	if ap.Addr().IsUnspecified() {
		return "", fmt.Errorf("xds: %s listens on %s, which other sidecars cannot dial: listen on the address they reach this one at", name, addr)
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()).String(), nil
}

// xdsClient is the state of RunXDS. The fields from versions to refused
// belong to the RunXDS goroutine; status, under mu, is read by /config.
type xdsClient struct {
	s     *Sidecar
	cfg   XDSConfig
	log   *slog.Logger
	node  *core.Node
	creds credentials.TransportCredentials

	versions map[string]string           // type URL -> version of the last response accepted
	clusters map[string]bool             // cluster names of the last clusters accepted
	clas     map[string][]Endpoint       // cluster name -> endpoints of its last assignment accepted
	edsVer   uint64                      // the endpoint version as a number, for SetEndpoints
	pushed   []Endpoint                  // what the last SetEndpoints got
	held     int                         // how many of them push kept for the map (see push)
	refused  map[string]*refusedResponse // type URL -> the response last refused

	mu     sync.Mutex
	status XDSStatus
}

// refusedResponse is a version refused times times in a row. go-control-
// plane's snapshot cache answers a NACK with the same version at once, so
// the NACK of a version refused before waits out a backoff.
type refusedResponse struct {
	version string
	times   int
}

func newXDSClient(s *Sidecar, cfg XDSConfig, addr string) *xdsClient {
	id := s.cfg.Identity
	c := &xdsClient{
		s:   s,
		cfg: cfg,
		log: s.cfg.Logger.With("component", "xds", "region", id.Region, "unit", id.Unit, "service", id.Service),
		node: &core.Node{
			Id:            id.Unit + "/" + id.Service + "/" + addr,
			Cluster:       id.Service,
			Locality:      &core.Locality{Region: id.Region, Zone: id.Unit},
			UserAgentName: "cellmesh-sidecar",
			Metadata: &structpb.Struct{Fields: map[string]*structpb.Value{
				xdsapi.MetaService:   structpb.NewStringValue(id.Service),
				xdsapi.MetaUnit:      structpb.NewStringValue(id.Unit),
				xdsapi.MetaRegion:    structpb.NewStringValue(id.Region),
				xdsapi.MetaAddress:   structpb.NewStringValue(addr),
				xdsapi.MetaTransport: structpb.NewStringValue(string(cfg.Advertise)),
			}},
		},
		versions: map[string]string{},
		clusters: map[string]bool{},
		clas:     map[string][]Endpoint{},
		refused:  map[string]*refusedResponse{},
		status:   XDSStatus{Servers: slices.Clone(cfg.Servers), Versions: map[string]string{}},
	}
	expect := func(peer meshtls.ID) error {
		if peer.Service != meshtls.ControlPlaneService {
			return fmt.Errorf("an xDS server must be service %s, not %s", meshtls.ControlPlaneService, peer.Service)
		}
		return nil
	}
	c.creds = credentials.NewTLS(s.cfg.TLS.ClientConfig(expect, s.tlsRejected("xds")))
	return c
}

// snapshot returns a copy of the status.
func (c *xdsClient) snapshot() XDSStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.status
	st.Servers = slices.Clone(st.Servers)
	st.Versions = maps.Clone(st.Versions)
	return st
}

func (c *xdsClient) setStatus(f func(*XDSStatus)) {
	c.mu.Lock()
	defer c.mu.Unlock()
	f(&c.status)
}

// run streams from one replica after another until ctx ends.
func (c *xdsClient) run(ctx context.Context) {
	order := slices.Clone(c.cfg.Servers)
	rand.Shuffle(len(order), func(i, j int) { order[i], order[j] = order[j], order[i] })
	failures := 0 // attempts in a row that got no response
	for i := 0; ; i++ {
		server := order[i%len(order)]
		if i > 0 {
			c.s.m.xdsReconnects.Inc()
		}
		answered, err := c.stream(ctx, server)
		c.s.m.xdsConnected.Set(0)
		c.setStatus(func(st *XDSStatus) {
			st.Connected, st.Server = false, ""
			if err != nil && ctx.Err() == nil {
				st.LastError = fmt.Sprintf("%s: %v", server, err)
			}
		})
		if ctx.Err() != nil {
			return
		}
		if answered {
			failures = 0
		}
		wait := c.backoff(failures)
		failures++
		c.log.Warn("xds stream ended; routing on the last map while reconnecting", "server", server, "error", err,
			"next", order[(i+1)%len(order)], "retry_seconds", wait.Seconds())
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// backoff is the wait after failures attempts in a row without a
// response: BackoffMin doubled that many times, at most BackoffMax, and
// jittered between half and all of it.
func (c *xdsClient) backoff(failures int) time.Duration {
	d := c.cfg.BackoffMin
	for range failures {
		if d >= c.cfg.BackoffMax/2 {
			d = c.cfg.BackoffMax
			break
		}
		d *= 2
	}
	d = min(d, c.cfg.BackoffMax)
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}

// probeTimeout bounds the connection that tells a silent replica from a
// cut-off one.
const probeTimeout = 500 * time.Millisecond

// reachable opens (and closes) a TCP connection to server.
func reachable(ctx context.Context, server string) error {
	d := net.Dialer{Timeout: probeTimeout}
	c, err := d.DialContext(ctx, "tcp", server)
	if err != nil {
		return err
	}
	return c.Close()
}

// streamState is what one stream knows: the last nonce of each type, and
// the cluster names last asked for (nil before the first endpoint request).
type streamState struct {
	nonces   map[string]string
	edsNames []string
	sentNode bool
}

// stream runs one ADS stream with server until it fails or ctx ends.
// answered reports whether the server sent anything.
func (c *xdsClient) stream(ctx context.Context, server string) (answered bool, err error) {
	log := c.log.With("server", server)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	conn, err := grpc.NewClient(server,
		grpc.WithTransportCredentials(c.creds),
		grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: c.s.cfg.Timeouts.Connect}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxXDSMessage)),
		grpc.WithStaticStreamWindowSize(xdsapi.FlowWindow), grpc.WithStaticConnWindowSize(xdsapi.FlowWindow),
		// A replica cut off without a reset (a partition) is noticed by
		// pings within about 15 s, and the next replica is tried; the
		// control plane allows pings every 5 s. With a lease, silence is
		// noticed sooner (see watch below).
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
	)
	if err != nil {
		return false, fmt.Errorf("dial: %w", err)
	}
	defer conn.Close()
	st, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return false, err
	}
	ss := &streamState{nonces: map[string]string{}}
	send := func(req *discovery.DiscoveryRequest) error {
		if !ss.sentNode {
			req.Node, ss.sentNode = c.node, true
		}
		if req.TypeUrl == resource.EndpointType {
			ss.edsNames = req.ResourceNames
		}
		if err := st.Send(req); err != nil {
			return fmt.Errorf("send %s request: %w", xdsShort(req.TypeUrl), err)
		}
		return nil
	}
	// The versions held go with the first requests, so a replica that
	// serves the same need not resend them.
	for _, typ := range []string{resource.ClusterType, resource.EndpointType, xdsapi.ShardMapType, xdsapi.LeaseType} {
		if typ == resource.EndpointType && len(c.clusters) == 0 {
			continue // an endpoint request naming no cluster would ask for all of them
		}
		if err := send(c.request(typ, ss)); err != nil {
			return false, err
		}
	}

	type received struct {
		r   *discovery.DiscoveryResponse
		err error
	}
	recv := make(chan received)
	recvDone := make(chan struct{})
	defer func() {
		cancel()
		<-recvDone
	}()
	go func() {
		defer close(recvDone)
		for {
			r, err := st.Recv()
			select {
			case recv <- received{r, err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
		}
	}()

	delayed := make(chan *discovery.DiscoveryRequest)
	var timers []*time.Timer
	defer func() {
		for _, t := range timers {
			t.Stop()
		}
	}()

	// handle applies a response and answers it: an ACK, or a NACK (held
	// back when the same version was refused before).
	handle := func(r *discovery.DiscoveryResponse) error {
		typ := r.GetTypeUrl()
		applyErr := c.apply(log, r)
		req := c.request(typ, ss)
		if applyErr != nil {
			c.s.m.xdsUpdates.WithLabelValues(xdsShort(typ), "nack").Inc()
			req.ErrorDetail = status.New(codes.InvalidArgument, applyErr.Error()).Proto()
			c.setStatus(func(st *XDSStatus) {
				st.LastError = fmt.Sprintf("%s version %s refused: %v", xdsShort(typ), r.GetVersionInfo(), applyErr)
			})
			wait := c.refuse(typ, r.GetVersionInfo())
			log.Error("xds update refused (NACK); keeping the last good one", "type", xdsShort(typ), "version", r.GetVersionInfo(),
				"kept_version", c.versions[typ], "error", applyErr, "nack_delay_seconds", wait.Seconds())
			if wait > 0 {
				timers = append(timers, time.AfterFunc(wait, func() {
					select {
					case delayed <- req:
					case <-ctx.Done():
					}
				}))
				return nil
			}
		} else {
			delete(c.refused, typ)
			c.s.m.xdsUpdates.WithLabelValues(xdsShort(typ), "ack").Inc()
			c.versions[typ] = r.GetVersionInfo()
			req.VersionInfo = r.GetVersionInfo()
			c.setStatus(func(st *XDSStatus) { st.Versions[xdsShort(typ)] = r.GetVersionInfo() })
		}
		if err := send(req); err != nil {
			return err
		}
		// New clusters: ask for their endpoints (after the ACK, so the
		// request carries the endpoint type's own version and nonce).
		if typ == resource.ClusterType {
			names := c.clusterNames()
			if (ss.edsNames != nil || len(names) > 0) && !slices.Equal(names, ss.edsNames) {
				return send(c.request(resource.EndpointType, ss))
			}
		}
		return nil
	}

	// A map waits, unanswered, while the endpoints are warming (see warm),
	// at most warmTimeout.
	var waiting *discovery.DiscoveryResponse
	var warmTimer *time.Timer
	var warmed <-chan time.Time
	defer func() {
		if warmTimer != nil {
			warmTimer.Stop()
		}
	}()
	applyWaiting := func() error {
		r := waiting
		waiting, warmed = nil, nil
		warmTimer.Stop()
		return handle(r)
	}

	// Endpoints held for the map are dropped after holdTimeout.
	var holdTimer *time.Timer
	var holdEnded <-chan time.Time
	defer func() {
		if holdTimer != nil {
			holdTimer.Stop()
		}
	}()

	// A replica cut off without a reset (a partition) just goes silent.
	// gRPC's pings would notice after about 15 s (grpc-go pings no more
	// often than every 10 s), longer than a lease: while the unit holds a
	// lease, which the leader renews every quarter TTL, a stream silent for
	// half the TTL is given up and the next replica tried, in time to
	// renew the lease there.
	var silence *time.Timer
	var silent <-chan time.Time
	var limit time.Duration
	heard := time.Now() // the last response
	watch := func() {
		if limit = c.s.silenceLimit(); limit == 0 {
			silent = nil
			return
		}
		d := time.Until(heard.Add(limit))
		if silence == nil {
			silence = time.NewTimer(d)
		} else {
			silence.Reset(d)
		}
		silent = silence.C
	}
	defer func() {
		if silence != nil {
			silence.Stop()
		}
	}()

	c.s.m.xdsConnected.Set(1)
	c.setStatus(func(st *XDSStatus) { st.Connected, st.Server = true, server })
	log.Info("xds stream open")
	for {
		watch() // after what the last response changed (a first lease)
		if c.held > 0 && holdEnded == nil {
			holdTimer = time.NewTimer(c.cfg.holdTimeout)
			holdEnded = holdTimer.C
		}
		var in received
		select {
		case <-holdEnded:
			holdEnded = nil
			if c.held > 0 {
				log.Info("xds: dropping the endpoints held for units the map still declares", "endpoints", c.held, "hold_seconds", c.cfg.holdTimeout.Seconds())
				if err := c.push(c.clusters, c.clas, c.edsVer, false); err != nil {
					log.Error("xds endpoints: dropping those held for the map failed", "error", err)
				}
			}
			continue
		case <-ctx.Done():
			return answered, ctx.Err()
		case <-silent:
			// Silence alone is not proof: a replica waiting for a new
			// raft leader renews nothing either, and leaving it for another
			// only churns registrations. A new connection to it tells: a
			// replica cut off does not accept one.
			if err := reachable(ctx, server); err != nil {
				return answered, fmt.Errorf("nothing from the replica for %s (half the lease's TTL) and a new connection to it failed (%v): it may be cut off; trying the next", limit, err)
			}
			heard = time.Now()
		case req := <-delayed:
			if req.ResponseNonce != ss.nonces[req.TypeUrl] {
				continue // a newer response of the type has been answered
			}
			if err := send(req); err != nil {
				return answered, err
			}
			continue
		case <-warmed:
			log.Warn("xds: applying the shard map before the endpoints of every cluster arrived", "wait_seconds", c.cfg.warmTimeout.Seconds(),
				"clusters", len(c.clusters), "assignments", len(c.clas))
			if err := applyWaiting(); err != nil {
				return answered, err
			}
			continue
		case in = <-recv:
		}
		if in.err != nil {
			return answered, in.err
		}
		answered = true
		heard = time.Now()
		r := in.r
		typ := r.GetTypeUrl()
		if typ != resource.ClusterType && typ != resource.EndpointType && typ != xdsapi.ShardMapType && typ != xdsapi.LeaseType {
			// Answering would subscribe to the type.
			log.Warn("xds response of a type never asked for; ignored", "type_url", typ)
			continue
		}
		ss.nonces[typ] = r.GetNonce()
		if typ == xdsapi.ShardMapType && !c.warm() {
			log.Debug("xds: the shard map waits for the endpoints of its clusters", "version", r.GetVersionInfo())
			waiting = r
			warmTimer = time.NewTimer(c.cfg.warmTimeout)
			warmed = warmTimer.C
			continue
		}
		if err := handle(r); err != nil {
			return answered, err
		}
		if waiting != nil && c.warm() {
			if err := applyWaiting(); err != nil {
				return answered, err
			}
		}
	}
}

// xdsWarmTimeout bounds how long a shard map waits for endpoints, as
// Envoy's initial_fetch_timeout bounds its warming.
const xdsWarmTimeout = 5 * time.Second

// warm reports whether the endpoints are complete enough for a map: the
// clusters have come (once), and each has its load assignment. A map that
// adds a unit is then applied after the endpoints of that unit, when the
// clusters come first, and a sidecar becomes ready with its endpoints.
func (c *xdsClient) warm() bool {
	if _, ok := c.versions[resource.ClusterType]; !ok {
		return false
	}
	for name := range c.clusters {
		if _, ok := c.clas[name]; !ok {
			return false
		}
	}
	return true
}

// refuse records a refused version of typ and returns how long its NACK
// waits: nothing the first time, a backoff when the same version comes
// back.
func (c *xdsClient) refuse(typ, version string) time.Duration {
	r := c.refused[typ]
	if r == nil || r.version != version {
		c.refused[typ] = &refusedResponse{version: version, times: 1}
		return 0
	}
	r.times++
	return c.backoff(r.times - 2)
}

// request is the next request of typ on the stream: the version accepted
// last, the nonce received last and the names wanted.
func (c *xdsClient) request(typ string, ss *streamState) *discovery.DiscoveryRequest {
	req := &discovery.DiscoveryRequest{TypeUrl: typ, VersionInfo: c.versions[typ], ResponseNonce: ss.nonces[typ]}
	switch typ {
	case resource.EndpointType:
		req.ResourceNames = c.clusterNames()
	case xdsapi.ShardMapType:
		req.ResourceNames = []string{xdsapi.ShardMapName}
	case xdsapi.LeaseType:
		req.ResourceNames = []string{c.s.cfg.Identity.Unit}
	}
	// Clusters: no names, every cluster (wildcard).
	return req
}

func (c *xdsClient) clusterNames() []string {
	return slices.Sorted(maps.Keys(c.clusters))
}

// apply applies a response, or returns why it cannot and changes nothing.
func (c *xdsClient) apply(log *slog.Logger, r *discovery.DiscoveryResponse) error {
	switch r.GetTypeUrl() {
	case resource.ClusterType:
		return c.applyClusters(log, r)
	case resource.EndpointType:
		return c.applyEndpoints(log, r)
	case xdsapi.LeaseType:
		return c.applyLease(log, r)
	default:
		return c.applyShardMap(log, r)
	}
}

// applyLease takes the unit's lease grant. A grant not newer than the one
// held is acknowledged and ignored (it must not extend the lease).
func (c *xdsClient) applyLease(log *slog.Logger, r *discovery.DiscoveryResponse) error {
	unit := c.s.cfg.Identity.Unit
	res := r.GetResources()
	switch len(res) {
	case 0:
		log.Debug("xds: no lease for this unit yet", "version", r.GetVersionInfo())
		return nil
	case 1:
	default:
		return fmt.Errorf("%d lease resources, want the one of unit %s", len(res), unit)
	}
	var l cellmeshv1.Lease
	if err := unwrap(res[0], &l); err != nil {
		return fmt.Errorf("lease: %w", err)
	}
	if l.GetUnit() != unit || l.GetName() != unit {
		return fmt.Errorf("lease of unit %q (resource %q), want this sidecar's unit %s", l.GetUnit(), l.GetName(), unit)
	}
	if l.GetTtlMillis() == 0 || l.GetTtlMillis() > uint64(time.Hour/time.Millisecond) {
		return fmt.Errorf("lease ttl %d ms: want 1 ms to 1 hour", l.GetTtlMillis())
	}
	ttl := time.Duration(l.GetTtlMillis()) * time.Millisecond
	var granted time.Time
	if ms := l.GetGrantedUnixMillis(); ms > 0 {
		granted = time.UnixMilli(int64(ms))
	}
	if c.s.grantLease(l.GetSeq(), ttl, granted) {
		log.Debug("xds lease granted", "seq", l.GetSeq(), "ttl_seconds", ttl.Seconds())
	}
	return nil
}

// unwrap returns the resource in a, unwrapping a discovery Resource (the
// form of a resource with a TTL).
func unwrap(a *anypb.Any, into proto.Message) error {
	if a.MessageIs(&discovery.Resource{}) {
		var w discovery.Resource
		if err := a.UnmarshalTo(&w); err != nil {
			return err
		}
		if w.GetResource() == nil {
			return fmt.Errorf("resource %q is empty", w.GetName())
		}
		a = w.GetResource()
	}
	return a.UnmarshalTo(into)
}

func (c *xdsClient) applyClusters(log *slog.Logger, r *discovery.DiscoveryResponse) error {
	names := map[string]bool{}
	for i, a := range r.GetResources() {
		var cl cluster.Cluster
		if err := unwrap(a, &cl); err != nil {
			return fmt.Errorf("cluster %d: %w", i, err)
		}
		if _, _, ok := xdsapi.ParseClusterName(cl.GetName()); !ok {
			return fmt.Errorf("cluster %d: name %q is not a cellmesh cluster (cellmesh|service|unit)", i, cl.GetName())
		}
		names[cl.GetName()] = true
	}
	clas := maps.Clone(c.clas)
	maps.DeleteFunc(clas, func(name string, _ []Endpoint) bool { return !names[name] })
	if err := c.push(names, clas, c.edsVer, true); err != nil {
		return err
	}
	if !maps.Equal(names, c.clusters) {
		log.Info("xds clusters updated", "version", r.GetVersionInfo(), "clusters", len(names))
	}
	c.clusters, c.clas = names, clas
	return nil
}

func (c *xdsClient) applyEndpoints(log *slog.Logger, r *discovery.DiscoveryResponse) error {
	clas := maps.Clone(c.clas)
	var dead []string
	for i, a := range r.GetResources() {
		var cla endpointv3.ClusterLoadAssignment
		if err := unwrap(a, &cla); err != nil {
			return fmt.Errorf("load assignment %d: %w", i, err)
		}
		name := cla.GetClusterName()
		svc, unit, ok := xdsapi.ParseClusterName(name)
		if !ok {
			return fmt.Errorf("load assignment %d: cluster name %q is not a cellmesh cluster (cellmesh|service|unit)", i, name)
		}
		if !c.clusters[name] {
			log.Debug("xds load assignment of a cluster not (or no longer) served; ignored", "cluster", name)
			continue
		}
		eps, gone, err := claEndpoints(&cla, svc, unit)
		if err != nil {
			return fmt.Errorf("cluster %s: %w", name, err)
		}
		clas[name] = eps
		dead = append(dead, gone...)
	}
	ver, err := strconv.ParseUint(r.GetVersionInfo(), 10, 64)
	if err != nil {
		ver = 0 // not a number: /config shows the string
	}
	if err := c.push(c.clusters, clas, ver, true); err != nil {
		return err
	}
	c.clas, c.edsVer = clas, ver
	log.Debug("xds endpoints updated", "version", r.GetVersionInfo(), "endpoints", len(c.pushed))
	// An address dead in one cluster but healthy in another (reused)
	// keeps its connections.
	dead = slices.DeleteFunc(dead, func(k string) bool {
		for _, eps := range clas {
			if slices.ContainsFunc(eps, func(e Endpoint) bool { return e.key() == k }) {
				return true
			}
		}
		return false
	})
	if n := c.s.up.conns.closeAll(dead); n > 0 {
		log.Info("closed the connections to peers the control plane finds dead", "connections", n, "endpoints", dead)
	}
	return nil
}

// claEndpoints reads the endpoints of one cluster's load assignment: those
// in load balancing, and the keys (transport://address) of those the
// control plane finds dead (UNHEALTHY, TIMEOUT), whose connections are
// closed. DRAINING endpoints are out of load balancing too, as Envoy
// leaves them, but keep their connections.
func claEndpoints(cla *endpointv3.ClusterLoadAssignment, svc, unit string) (eps []Endpoint, dead []string, err error) {
	for _, loc := range cla.GetEndpoints() {
		if z := loc.GetLocality().GetZone(); z != "" && z != unit {
			return nil, nil, fmt.Errorf("locality zone %q, but the cluster is of unit %s", z, unit)
		}
		for j, lb := range loc.GetLbEndpoints() {
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			if sa == nil {
				return nil, nil, fmt.Errorf("endpoint %d has no socket address", j)
			}
			ip, err := netip.ParseAddr(sa.GetAddress())
			if err != nil {
				return nil, nil, fmt.Errorf("endpoint %d: address %q is not an IP address", j, sa.GetAddress())
			}
			port, ok := sa.GetPortSpecifier().(*core.SocketAddress_PortValue)
			if !ok || port.PortValue == 0 || port.PortValue > 65535 {
				return nil, nil, fmt.Errorf("endpoint %d (%s): want a port number 1..65535", j, sa.GetAddress())
			}
			e := Endpoint{Service: svc, Unit: unit, Address: netip.AddrPortFrom(ip, uint16(port.PortValue)).String(), Transport: QUIC}
			if t := lb.GetMetadata().GetFilterMetadata()["cellmesh"].GetFields()["transport"].GetStringValue(); t != "" {
				e.Transport = Transport(t)
			}
			if err := e.validate(); err != nil {
				return nil, nil, fmt.Errorf("endpoint %d (%s): %w", j, e.Address, err)
			}
			switch lb.GetHealthStatus() {
			case core.HealthStatus_UNHEALTHY, core.HealthStatus_TIMEOUT:
				dead = append(dead, e.key())
				continue
			case core.HealthStatus_DRAINING:
				continue
			}
			eps = append(eps, e)
		}
	}
	return eps, dead, nil
}

// push gives the sidecar the endpoints of clusters in clas. With retain,
// the endpoints of a service in a unit whose cluster the list no longer
// has are held while the map in use still declares the unit: the control plane
// drops a unit from the endpoints and the map in one version, whose two
// responses may come in either order, and the map still routes there; and
// a sidecar that moves to another replica is gone from the endpoints until
// it has registered there. The next map applied drops them (it pushes
// without retain), as Apply does after its swap, and so does holdTimeout
// after they were first held, when no new map comes.
func (c *xdsClient) push(clusters map[string]bool, clas map[string][]Endpoint, version uint64, retain bool) error {
	var list []Endpoint
	groups := map[[2]string]bool{}
	for _, name := range slices.Sorted(maps.Keys(clusters)) {
		eps, ok := clas[name]
		if svc, unit, named := xdsapi.ParseClusterName(name); ok && named {
			// A cluster served with an assignment, even one with no
			// healthy endpoint, holds nothing: its list is the truth.
			groups[[2]string{svc, unit}] = true
		}
		list = append(list, eps...)
	}
	held := 0
	if m := c.s.Map(); retain && m != nil {
		for _, e := range c.pushed {
			if _, declared := m.Unit(e.Unit); declared && !groups[[2]string{e.Service, e.Unit}] {
				list = append(list, e)
				held++
			}
		}
	}
	if slices.Equal(list, c.pushed) && c.s.endpoints.Load().version == version {
		return nil
	}
	if err := c.s.SetEndpoints(list, version); err != nil {
		return err
	}
	c.pushed, c.held = list, held
	return nil
}

// xdsHoldTimeout bounds how long push holds endpoints for the map in use.
const xdsHoldTimeout = 5 * time.Second

func (c *xdsClient) applyShardMap(log *slog.Logger, r *discovery.DiscoveryResponse) error {
	res := r.GetResources()
	switch len(res) {
	case 0:
		log.Info("xds: the control plane has no shard map yet", "version", r.GetVersionInfo())
		return nil
	case 1:
	default:
		return fmt.Errorf("%d shard map resources, want one named %s", len(res), xdsapi.ShardMapName)
	}
	var sm cellmeshv1.ShardMap
	if err := unwrap(res[0], &sm); err != nil {
		return fmt.Errorf("shard map: %w", err)
	}
	if sm.GetName() != xdsapi.ShardMapName {
		return fmt.Errorf("shard map resource named %q, want %s", sm.GetName(), xdsapi.ShardMapName)
	}
	t, err := xdsapi.ToTopology(&sm)
	if err != nil {
		return err
	}
	m, err := routing.Compile(t)
	if err != nil {
		return fmt.Errorf("shard map version %d does not compile: %w", sm.GetVersion(), err)
	}
	cur := c.s.Map()
	if cur != nil && cur.Version() == m.Version() && cur.CheckSuccessor(m) == nil {
		log.Debug("xds shard map unchanged", "map_version", m.Version(), "version", r.GetVersionInfo())
		return nil
	}
	if err := c.s.SetMap(m); err != nil {
		if cur != nil && m.Version() < cur.Version() {
			return fmt.Errorf("%w (the control-plane replica is behind; keeping version %d)", err, cur.Version())
		}
		return err
	}
	from := uint64(0)
	if cur != nil {
		from = cur.Version()
	}
	log.Info("xds shard map applied", "map_version", m.Version(), "previous_map_version", from, "version", r.GetVersionInfo())
	// The swap is done: endpoints held for the old map go.
	if err := c.push(c.clusters, c.clas, c.edsVer, false); err != nil {
		log.Error("xds endpoints: dropping those held for the old map failed", "error", err)
	}
	return nil
}
