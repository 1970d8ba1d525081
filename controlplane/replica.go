package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/cellmesh/cellmesh/controlplane/store"
	"github.com/cellmesh/cellmesh/controlplane/xds"
	"github.com/cellmesh/cellmesh/failover"
	"github.com/cellmesh/cellmesh/internal/meshtls"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// Config configures one control-plane replica. The zero value of a field
// means its default.
type Config struct {
	// ID names the replica in raft and in the API, required.
	ID string
	// Region is where the replica runs, shown by the API.
	Region string
	// DataDir holds the raft log and snapshots, required.
	DataDir string
	// Raft, API and XDS are the listen addresses (ip:port) of the raft
	// transport, the operator API and the xDS server, required.
	Raft, API, XDS string
	// RaftAdvertise is the raft address other replicas use, when not Raft.
	RaftAdvertise string
	// Join lists API addresses (http://host:port or host:port) of replicas
	// of an existing cluster; the replica asks them to add it as a voter.
	// Empty: a new single-replica cluster when DataDir holds no state.
	Join []string
	// Topology is applied by the leader when the state holds none or an
	// older version (a valid successor only), nil for none.
	Topology *routing.Topology
	// Token is the bearer token of the API. Empty refuses to start unless
	// InsecureDev is set.
	Token       string
	InsecureDev bool
	// TLS is the replica's mesh identity, whose service must be
	// meshtls.ControlPlaneService: the xDS server presents it and checks
	// sidecars' certificates against its CA bundle.
	TLS *meshtls.Store
	// LeaseTTL is the lease the leader grants every unit with a connected
	// sidecar, renewed every LeaseTTL/4 (default 4s).
	LeaseTTL time.Duration
	// Gossip joins the replica to the gossip pool (Meta, Name, Observer
	// and Logger are the replica's own); nil: no gossip, units' health is
	// unknown and leases follow xDS registrations alone.
	Gossip *failover.Config
	// Health tunes how gossip adds up to unit and region health.
	Health failover.HealthConfig
	// HandoffServices are the services that hold data and implement the
	// handoff contract (replication watermarks, promote, demote): the
	// orchestrator checks them before any handoff. None: shards move
	// without a check or a drain (stateless services).
	HandoffServices []string
	// HandoffTimeout bounds a planned handoff's wait for its standby to
	// catch up before it is blocked (default 5s).
	HandoffTimeout time.Duration
	// Fast shortens raft's timeouts (tests on one machine).
	Fast bool
	// Logger and Registry default to discarding and a new registry.
	Logger   *slog.Logger
	Registry *prometheus.Registry
}

// Replica is one control-plane replica: the raft state, its xDS server,
// and the operator API.
type Replica struct {
	cfg   Config
	log   *slog.Logger
	store *store.Store
	xds   *xds.Server
	m     *metrics
	reg   *registry
	// health is the gossip view of members, units and regions; gossip is
	// this replica's member (nil without Config.Gossip).
	health *failover.Health
	gossip *failover.Membership
	orch   *orchestrator
	drills drills
	boot   string // this process's prefix of xDS session names

	apiLn, xdsLn net.Listener
	api          *http.Server
	client       *http.Client // to the leader's API

	stop    context.CancelFunc
	wg      sync.WaitGroup
	closing sync.Once

	serving    bool // publishLoop's: the replica has caught up once
	streamMu   sync.Mutex
	streams    map[*liveStream]struct{}
	leaderless time.Time // since when no leader is known (zero: one is)
}

// liveStream is an xDS stream the replica can end.
type liveStream struct {
	since  time.Time
	cancel context.CancelCauseFunc
}

// noQuorumCycle is how long a replica that knows no leader keeps an xDS
// stream before ending it, so its sidecar tries the other replicas of its
// list (one of them may hold the quorum and newer state); a sidecar that
// reaches only this replica comes back and gets its last state again.
const noQuorumCycle = time.Second

// Open checks cfg, opens the state and binds every listener. Run serves.
func Open(cfg Config) (*Replica, error) {
	var problems []string
	if cfg.ID == "" {
		problems = append(problems, "an id is required")
	} else if err := meshtls.ValidateSegment(cfg.ID); err != nil {
		problems = append(problems, fmt.Sprintf("id %q: %v", cfg.ID, err))
	}
	if cfg.DataDir == "" {
		problems = append(problems, "a data directory is required")
	}
	if cfg.Token == "" && !cfg.InsecureDev {
		problems = append(problems, "no API token: give one (a token file or CELLMESH_TOKEN), or run with --insecure-dev on a development machine")
	}
	if cfg.TLS == nil {
		problems = append(problems, "a TLS identity is required for the xDS server")
	} else if id := cfg.TLS.ID(); id.Service != meshtls.ControlPlaneService {
		problems = append(problems, fmt.Sprintf("the certificate is for %s; a control-plane replica needs one for service %s (cellmesh certs issue --service %s)", id, meshtls.ControlPlaneService, meshtls.ControlPlaneService))
	}
	for _, a := range []struct{ name, addr string }{{"raft", cfg.Raft}, {"api", cfg.API}, {"xds", cfg.XDS}} {
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			problems = append(problems, fmt.Sprintf("%s address %q: want ip:port", a.name, a.addr))
		}
	}
	if cfg.LeaseTTL < 0 || (cfg.LeaseTTL > 0 && cfg.LeaseTTL < 100*time.Millisecond) {
		problems = append(problems, fmt.Sprintf("lease ttl %s: want at least 100ms", cfg.LeaseTTL))
	}
	if cfg.Topology != nil {
		if _, err := routing.Compile(cfg.Topology); err != nil {
			problems = append(problems, fmt.Sprintf("topology: %v", err))
		}
	}
	if len(problems) > 0 {
		return nil, &ConfigError{Problems: problems}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Registry == nil {
		cfg.Registry = prometheus.NewRegistry()
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.HandoffTimeout <= 0 {
		cfg.HandoffTimeout = 5 * time.Second
	}
	cfg.HandoffServices = slices.Clone(cfg.HandoffServices)
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	r := &Replica{
		cfg:    cfg,
		log:    cfg.Logger.With("component", "controlplane", "replica", cfg.ID),
		boot:   cfg.ID + "/" + hex.EncodeToString(nonce[:]) + "/",
		client: &http.Client{Timeout: 10 * time.Second},
	}
	st, err := store.Open(store.Config{
		ID: cfg.ID, Dir: cfg.DataDir, Bind: cfg.Raft, Advertise: cfg.RaftAdvertise,
		Bootstrap: len(cfg.Join) == 0, Fast: cfg.Fast, Logger: cfg.Logger,
	})
	if err != nil {
		return nil, err
	}
	r.store = st
	r.m = newMetrics(cfg.Registry, r)
	r.health = failover.NewHealth(cfg.Health)
	cfg.Registry.MustRegister(r.health.Collector())
	r.orch = newOrchestrator(r)
	r.reg = newRegistry(r)
	creds := credentials.NewTLS(cfg.TLS.ServerConfig(nil, func(remote string, err error) {
		r.log.Warn("refused an xDS client's certificate", "remote", remote, "error", err)
	}))
	r.streams = map[*liveStream]struct{}{}
	r.xds = xds.NewServer(r.reg.callbacks(), grpc.Creds(creds), grpc.ChainStreamInterceptor(r.trackStream),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.MaxConcurrentStreams(16))
	if r.apiLn, err = net.Listen("tcp", cfg.API); err != nil {
		st.Close()
		return nil, fmt.Errorf("api listener on %s: %w", cfg.API, err)
	}
	if r.xdsLn, err = net.Listen("tcp", cfg.XDS); err != nil {
		r.apiLn.Close()
		st.Close()
		return nil, fmt.Errorf("xds listener on %s: %w", cfg.XDS, err)
	}
	if err := r.startGossip(); err != nil {
		r.xdsLn.Close()
		r.apiLn.Close()
		st.Close()
		return nil, err
	}
	r.api = &http.Server{Handler: r.apiHandler(), ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 2 * time.Minute,
		ErrorLog: slog.NewLogLogger(r.log.Handler(), slog.LevelWarn)}
	return r, nil
}

// DefaultLeaseTTL is the lease granted to units when Config does not say.
const DefaultLeaseTTL = 4 * time.Second

// ConfigError lists every problem of a Config.
type ConfigError struct{ Problems []string }

func (e *ConfigError) Error() string {
	s := "control plane configuration:"
	for _, p := range e.Problems {
		s += " " + p + ";"
	}
	return s[:len(s)-1]
}

// Addrs are the bound addresses.
type Addrs struct{ Raft, API, XDS string }

// Addrs returns the bound addresses (useful with port 0).
func (r *Replica) Addrs() Addrs {
	return Addrs{Raft: r.store.Addr(), API: r.apiLn.Addr().String(), XDS: r.xdsLn.Addr().String()}
}

// Store is the replica's raft state.
func (r *Replica) Store() *store.Store { return r.store }

// Run serves until ctx ends, then stops: the API and xDS servers close
// (sidecars move to another replica), raft shuts down, the state stays on
// disk.
func (r *Replica) Run(ctx context.Context) error {
	ctx, r.stop = context.WithCancel(ctx)
	errc := make(chan error, 2)
	r.wg.Add(5)
	go func() {
		defer r.wg.Done()
		if err := r.api.Serve(r.apiLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			errc <- fmt.Errorf("api: %w", err)
		}
	}()
	go func() {
		defer r.wg.Done()
		if err := r.xds.Serve(r.xdsLn); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			errc <- fmt.Errorf("xds: %w", err)
		}
	}()
	go func() { defer r.wg.Done(); r.publishLoop(ctx) }()
	go func() { defer r.wg.Done(); r.leaderLoop(ctx) }()
	go func() { defer r.wg.Done(); r.reg.run(ctx) }()
	r.wg.Add(2)
	go func() { defer r.wg.Done(); r.healthLoop(ctx) }()
	go func() { defer r.wg.Done(); r.orch.run(ctx) }()
	if r.gossip != nil {
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			if err := r.gossip.Run(ctx); err != nil {
				r.log.Warn("gossip stopped", "error", err)
			}
		}()
	}
	if len(r.cfg.Join) > 0 {
		r.wg.Add(1)
		go func() { defer r.wg.Done(); r.join(ctx) }()
	}
	r.log.Info("control plane replica serving", "api", r.apiLn.Addr().String(), "xds", r.xdsLn.Addr().String(), "raft", r.store.Addr())
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		r.log.Error("a server failed; stopping", "error", err)
	}
	r.shutdown()
	return err
}

func (r *Replica) shutdown() {
	r.closing.Do(func() {
		r.stop()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = r.api.Shutdown(sctx)
		r.xds.Stop()
		r.wg.Wait()
		if err := r.store.Close(); err != nil {
			r.log.Warn("raft shutdown", "error", err)
		}
		r.log.Info("control plane replica stopped")
	})
}

// Close stops a replica that was opened but is not running.
func (r *Replica) Close() error {
	if r.stop != nil {
		r.stop()
		r.wg.Wait()
		return nil
	}
	r.apiLn.Close()
	r.xdsLn.Close()
	if r.gossip != nil {
		r.gossip.Close()
	}
	return r.store.Close()
}

// publishLoop serves every new state over xDS: it builds the resources of
// the state's raft index, checks them, and publishes them. It starts only
// once the replica has caught up (see caughtUp), so a restarted replica
// replaying its log never serves an older state than its peers do.
func (r *Replica) publishLoop(ctx context.Context) {
	t := time.NewTicker(100 * time.Millisecond)
	defer t.Stop()
	started := time.Now()
	last := &store.State{} // what was published last
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.store.Changed():
		case <-t.C:
		}
		if !r.serving && !r.caughtUp(started) {
			continue
		}
		st := r.store.State()
		if st.Map == nil || st.Index <= r.xds.Version() {
			continue
		}
		start := time.Now()
		leases := make([]*cellmeshv1.Lease, 0, len(st.Leases))
		for _, l := range st.Leases {
			leases = append(leases, &cellmeshv1.Lease{Name: l.Unit, Unit: l.Unit, Seq: l.Seq, TtlMillis: uint64(l.TTL / time.Millisecond), GrantedUnixMillis: uint64(l.GrantedAt.UnixMilli())})
		}
		var err error
		leasesOnly := st.Map == last.Map && slices.Equal(st.Endpoints, last.Endpoints)
		if leasesOnly {
			// Only leases changed (a renewal every second): the map and
			// the endpoints are not built again.
			err = r.xds.PublishLeases(st.Index, leases)
		} else {
			eps := make([]xds.Endpoint, 0, len(st.Endpoints))
			for _, e := range st.Endpoints {
				eps = append(eps, xds.Endpoint{Service: e.Service, Unit: e.Unit, Address: e.Address, Transport: e.Transport, Down: e.Down, Draining: e.Draining})
			}
			var res *xds.Resources
			res, err = xds.Build(strconv.FormatUint(st.Index, 10), st.Map, eps)
			if err == nil {
				res.Leases = leases
				err = r.xds.Publish(ctx, st.Index, res)
			}
		}
		if err != nil {
			r.m.publishErrors.Inc()
			r.log.Error("state not published over xDS; sidecars keep the previous version", "index", st.Index, "error", err)
			continue
		}
		last = st
		r.m.pushDuration.Observe(time.Since(start).Seconds())
		if leasesOnly {
			continue // a renewal a second: not worth a log line
		}
		r.log.Debug("published", "index", st.Index, "map_version", st.Map.Version(), "endpoints", len(st.Endpoints), "leases", len(leases))
	}
}

// caughtUpWait is how long a replica that hears from no leader waits
// before it serves the state it has on disk anyway.
const caughtUpWait = 5 * time.Second

// caughtUp decides when the replica starts serving xDS: as the leader, or
// as a follower that heard from the leader and applied everything it knows
// committed; or, when no leader answers for caughtUpWait after the start
// (a replica restarted inside a partition), with what it has on disk.
func (r *Replica) caughtUp(started time.Time) bool {
	st := r.store.Stats()
	_, leader := r.store.Leader()
	switch {
	case r.store.IsLeader():
	case leader != "" && !r.store.LastContact().IsZero() && st.Applied >= st.Commit:
	case leader == "" && time.Since(started) > caughtUpWait:
		r.log.Warn("no raft leader answers: serving the state on disk over xDS; it may be behind", "applied", st.Applied)
	default:
		return false
	}
	r.serving = true
	r.log.Info("serving xDS", "applied", st.Applied, "commit", st.Commit)
	return true
}

// leaderLoop does the leader's chores: record this replica's addresses,
// apply the configured topology when it is newer than the state's, and
// renew the leases of the units whose sidecars are connected.
func (r *Replica) leaderLoop(ctx context.Context) {
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	var lastGrant time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if r.store.IsLeader() && time.Since(lastGrant) >= r.cfg.LeaseTTL/4 {
			lastGrant = time.Now()
			r.grantLeases(ctx)
		}
		r.cycleIfLeaderless()
		if !r.store.IsLeader() {
			continue
		}
		st := r.store.State()
		r.forgetRemoved(ctx, st)
		if me := r.self(); !hasReplica(st.Replicas, me) {
			if _, err := r.store.Apply(ctx, store.Command{Op: store.OpReplica, Replica: &me, Who: "replica " + r.cfg.ID, At: time.Now().UTC()}); err != nil {
				r.log.Warn("could not record this replica's addresses", "error", err)
			}
		}
		if t := r.cfg.Topology; t != nil && (st.Map == nil || st.Map.Version() < t.Version) {
			_, err := r.store.Apply(ctx, store.Command{Op: store.OpSetTopology, Topology: t, Who: "replica " + r.cfg.ID + " (--topology)", At: time.Now().UTC()})
			var refused *store.RefusedError
			if errors.As(err, &refused) {
				r.log.Error("the configured topology was refused; fix the file or drop --topology", "version", t.Version, "error", err)
				r.cfg.Topology = nil
			} else if err != nil {
				r.log.Warn("the configured topology is not committed yet; retrying", "version", t.Version, "error", err)
			} else {
				r.log.Info("applied the configured topology", "version", t.Version)
			}
		}
	}
}

// grantLeases renews the lease of every unit with a registered sidecar
// that gossip does not find down. A unit whose sidecars are all gone, or
// that gossip finds suspect or down, gets no renewal: its lease ends.
func (r *Replica) grantLeases(ctx context.Context) {
	st := r.store.State()
	if st.Map == nil {
		return
	}
	v := r.health.View()
	var units []string
	for _, e := range st.Endpoints {
		if !e.Down && !e.Draining && !slices.Contains(units, e.Unit) && unitLive(&v, e.Unit) {
			units = append(units, e.Unit)
		}
	}
	if len(units) == 0 {
		return
	}
	slices.Sort(units)
	gctx, cancel := context.WithTimeout(ctx, r.cfg.LeaseTTL/2)
	defer cancel()
	if _, err := r.store.Apply(gctx, store.Command{Op: store.OpGrant, Grants: units, TTL: r.cfg.LeaseTTL, Who: "leader " + r.cfg.ID, At: time.Now().UTC()}); err != nil {
		r.log.Warn("lease renewal not committed", "units", len(units), "error", err)
	}
}

// forgetRemoved drops the records of replicas no longer in the raft
// configuration (a removed leader could not drop its own).
func (r *Replica) forgetRemoved(ctx context.Context, st *store.State) {
	conf, err := r.store.Configuration()
	if err != nil {
		return
	}
	for _, rep := range st.Replicas {
		if slices.ContainsFunc(conf, func(s store.Server) bool { return s.ID == rep.ID }) {
			continue
		}
		gone := store.Replica{ID: rep.ID}
		if _, err := r.store.Apply(ctx, store.Command{Op: store.OpForgetReplica, Replica: &gone, Who: "leader " + r.cfg.ID, At: time.Now().UTC()}); err != nil {
			r.log.Warn("could not drop the record of a removed replica", "replica", rep.ID, "error", err)
		}
	}
}

func (r *Replica) self() store.Replica {
	a := r.Addrs()
	return store.Replica{ID: r.cfg.ID, Region: r.cfg.Region, Raft: a.Raft, API: a.API, XDS: a.XDS}
}

func hasReplica(rs []store.Replica, me store.Replica) bool {
	for _, o := range rs {
		if o == me {
			return true
		}
	}
	return false
}

// trackStream lets the replica end an xDS stream (cycleIfLeaderless).
func (r *Replica) trackStream(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
	ctx, cancel := context.WithCancelCause(ss.Context())
	defer cancel(nil)
	ls := &liveStream{since: time.Now(), cancel: cancel}
	r.streamMu.Lock()
	r.streams[ls] = struct{}{}
	r.streamMu.Unlock()
	defer func() {
		r.streamMu.Lock()
		delete(r.streams, ls)
		r.streamMu.Unlock()
	}()
	err := h(srv, &ctxStream{ServerStream: ss, ctx: ctx})
	if cause := context.Cause(ctx); errors.Is(cause, errNoQuorum) {
		return status.Error(codes.Unavailable, cause.Error())
	}
	return err
}

var errNoQuorum = errors.New("this control-plane replica knows no raft leader (no quorum): its state may be behind; try another replica")

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// RecvMsg returns when a message arrives or the stream is ended by the
// replica: go-control-plane's stream loop ends when its receive fails. An
// abandoned receive returns when the handler has returned and gRPC closed
// the stream; its message is never read.
func (s *ctxStream) RecvMsg(m any) error {
	done := make(chan error, 1)
	go func() { done <- s.ServerStream.RecvMsg(m) }()
	select {
	case err := <-done:
		return err
	case <-s.ctx.Done():
		return context.Cause(s.ctx)
	}
}

// cycleIfLeaderless ends the xDS streams older than noQuorumCycle while
// the replica has known no leader for that long.
func (r *Replica) cycleIfLeaderless() {
	if _, id := r.store.Leader(); id != "" {
		r.leaderless = time.Time{}
		return
	}
	now := time.Now()
	if r.leaderless.IsZero() {
		r.leaderless = now
		return
	}
	if now.Sub(r.leaderless) < noQuorumCycle {
		return
	}
	r.streamMu.Lock()
	defer r.streamMu.Unlock()
	n := 0
	for ls := range r.streams {
		if now.Sub(ls.since) >= noQuorumCycle {
			ls.cancel(errNoQuorum)
			n++
		}
	}
	if n > 0 {
		r.log.Warn("no raft leader known: ended xDS streams so their sidecars try the other replicas", "streams", n, "leaderless_for", now.Sub(r.leaderless).Round(time.Millisecond))
	}
}
