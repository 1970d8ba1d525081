package xds

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
)

// meshNode puts every node in one group: the whole mesh sees the same
// endpoints and the same map.
type meshNode struct{}

func (meshNode) ID(*core.Node) string { return "mesh" }

// Server serves the resources over ADS (gRPC), state of the world and
// delta: the Envoy types from a snapshot cache, the shard map from a
// linear cache of its type, muxed by type URL.
type Server struct {
	snaps      cache.SnapshotCache
	maps       *cache.LinearCache
	leases     *cache.LinearCache
	leaseSeq   map[string]*cellmeshv1.Lease // the leases served, by unit
	grpc       *grpc.Server
	mu         sync.Mutex
	version    uint64
	served     *cache.Snapshot // the Envoy resources served, nil before the first
	mapVersion uint64
	mapSet     bool
}

// NewServer builds a server; Serve starts it. cb (nil for none) sees every
// stream and request; opts configure the gRPC server (credentials).
//
// Responses are encoded without copying their resources for each stream
// (responseCodec): a version's resources are marshaled once and every
// stream's response references them.
func NewServer(cb server.Callbacks, opts ...grpc.ServerOption) *Server {
	s := &Server{
		snaps:    cache.NewSnapshotCache(true, meshNode{}, log.NewDefaultLogger()),
		maps:     cache.NewLinearCache(ShardMapType, cache.WithLogger(log.NewDefaultLogger())),
		leases:   cache.NewLinearCache(LeaseType, cache.WithLogger(log.NewDefaultLogger())),
		leaseSeq: map[string]*cellmeshv1.Lease{},
	}
	classify := func(typeURL string) string {
		switch typeURL {
		case ShardMapType:
			return "map"
		case LeaseType:
			return "lease"
		}
		return "envoy"
	}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return classify(r.GetTypeUrl()) },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return classify(r.GetTypeUrl()) },
		Caches:        map[string]cache.Cache{"map": s.maps, "lease": s.leases, "envoy": s.snaps},
	}
	s.grpc = grpc.NewServer(append([]grpc.ServerOption{grpc.ForceServerCodecV2(newResponseCodec()),
		// Static flow-control windows: gRPC's dynamic windows send a BDP
		// ping (and a window update) for each data frame received when no
		// ping is out, so every ACK of every client cost the server two
		// more writes. Clients send only requests; 1 MiB is never used up.
		grpc.StaticStreamWindowSize(xdsapi.FlowWindow), grpc.StaticConnWindowSize(xdsapi.FlowWindow)}, opts...)...)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(s.grpc, server.NewServer(context.Background(), mux, cb))
	return s
}

// Publish makes res current for every connected and future client.
// Versions only move forward: an older or equal version is refused. Each
// type is pushed only when it changed: the shard map when its own version
// did, so a change of endpoints does not resend the map to every client;
// the clusters and the load assignments when their resources did (a type
// that did not keeps the version it was served at), so a shard move does
// not resend them.
func (s *Server) Publish(ctx context.Context, version uint64, res *Resources) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if version <= s.version {
		return fmt.Errorf("publish version %d: version %d is already published; versions only move forward", version, s.version)
	}
	if got := res.Endpoints.GetVersion(resource.ClusterType); got != strconv.FormatUint(version, 10) {
		return fmt.Errorf("publish version %d: the snapshot is version %q", version, got)
	}
	if snap, changed := keepUnchanged(s.served, res.Endpoints); changed {
		if err := s.snaps.SetSnapshot(ctx, "mesh", snap); err != nil {
			return fmt.Errorf("publish version %d: %w", version, err)
		}
		s.served = snap
	}
	if err := s.publishLeases(res.Leases); err != nil {
		return fmt.Errorf("publish version %d: %w", version, err)
	}
	if mv := res.ShardMap.GetVersion(); !s.mapSet || mv != s.mapVersion {
		if err := s.maps.UpdateResource(ShardMapName, res.ShardMap); err != nil {
			return fmt.Errorf("publish version %d: %w", version, err)
		}
		s.mapVersion, s.mapSet = mv, true
	}
	s.version = version
	return nil
}

// PublishLeases serves leases (one per unit, named by it) as version:
// a lease whose grant did not change is not sent again, a unit without a
// lease any more has its resource removed. Only the leases changed, so
// the rest stays as it is; version must still move forward.
func (s *Server) PublishLeases(version uint64, leases []*cellmeshv1.Lease) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if version <= s.version {
		return fmt.Errorf("publish leases at version %d: version %d is already published; versions only move forward", version, s.version)
	}
	if err := s.publishLeases(leases); err != nil {
		return fmt.Errorf("publish leases at version %d: %w", version, err)
	}
	s.version = version
	return nil
}

func (s *Server) publishLeases(leases []*cellmeshv1.Lease) error {
	update := map[string]types.Resource{}
	keep := map[string]bool{}
	for _, l := range leases {
		keep[l.GetName()] = true
		if old, ok := s.leaseSeq[l.GetName()]; ok && proto.Equal(old, l) {
			continue
		}
		update[l.GetName()] = l
	}
	var gone []string
	for name := range s.leaseSeq {
		if !keep[name] {
			gone = append(gone, name)
		}
	}
	if len(update) == 0 && len(gone) == 0 {
		return nil
	}
	if err := s.leases.UpdateResources(update, gone); err != nil {
		return err
	}
	for name, r := range update {
		s.leaseSeq[name] = r.(*cellmeshv1.Lease)
	}
	for _, name := range gone {
		delete(s.leaseSeq, name)
	}
	return nil
}

// Version is the last published version.
func (s *Server) Version() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version
}

// Serve serves ADS on ln until Stop.
func (s *Server) Serve(ln net.Listener) error { return s.grpc.Serve(ln) }

// Stop ends every stream and the server.
func (s *Server) Stop() { s.grpc.Stop() }

// keepUnchanged returns the snapshot to serve after served (nil for
// none): next, except that each type whose resources equal served's keeps
// served's resources and version, so that clients holding them are not
// sent them again. changed is false when no type changed.
func keepUnchanged(served, next *cache.Snapshot) (snap *cache.Snapshot, changed bool) {
	if served == nil {
		return next, true
	}
	snap = &cache.Snapshot{}
	for i := range next.Resources {
		if sameItems(served.Resources[i].Items, next.Resources[i].Items) {
			snap.Resources[i] = served.Resources[i]
		} else {
			snap.Resources[i] = next.Resources[i]
			changed = true
		}
	}
	return snap, changed
}

func sameItems(a, b map[string]types.ResourceWithTTL) bool {
	if len(a) != len(b) {
		return false
	}
	for name, x := range a {
		y, ok := b[name]
		if !ok || !proto.Equal(x.Resource, y.Resource) || !sameTTL(x.TTL, y.TTL) {
			return false
		}
	}
	return true
}

func sameTTL(a, b *time.Duration) bool {
	return a == b || (a != nil && b != nil && *a == *b)
}
