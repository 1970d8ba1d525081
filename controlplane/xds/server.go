package xds

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/log"
	server "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
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
	grpc       *grpc.Server
	mu         sync.Mutex
	version    uint64
	mapVersion uint64
	mapSet     bool
}

// NewServer builds a server; Serve starts it. cb (nil for none) sees every
// stream and request; opts configure the gRPC server (credentials).
func NewServer(cb server.Callbacks, opts ...grpc.ServerOption) *Server {
	s := &Server{
		snaps: cache.NewSnapshotCache(true, meshNode{}, log.NewDefaultLogger()),
		maps:  cache.NewLinearCache(ShardMapType, cache.WithLogger(log.NewDefaultLogger())),
	}
	isMap := func(typeURL string) string {
		if typeURL == ShardMapType {
			return "map"
		}
		return "envoy"
	}
	mux := &cache.MuxCache{
		Classify:      func(r *cache.Request) string { return isMap(r.GetTypeUrl()) },
		ClassifyDelta: func(r *cache.DeltaRequest) string { return isMap(r.GetTypeUrl()) },
		Caches:        map[string]cache.Cache{"map": s.maps, "envoy": s.snaps},
	}
	s.grpc = grpc.NewServer(opts...)
	discoverygrpc.RegisterAggregatedDiscoveryServiceServer(s.grpc, server.NewServer(context.Background(), mux, cb))
	return s
}

// Publish makes res current for every connected and future client.
// Versions only move forward: an older or equal version is refused. The
// shard map is pushed only when its own version changed, so a change of
// endpoints does not resend the map to every client.
func (s *Server) Publish(ctx context.Context, version uint64, res *Resources) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if version <= s.version {
		return fmt.Errorf("publish version %d: version %d is already published; versions only move forward", version, s.version)
	}
	if got := res.Endpoints.GetVersion("type.googleapis.com/envoy.config.cluster.v3.Cluster"); got != strconv.FormatUint(version, 10) {
		return fmt.Errorf("publish version %d: the snapshot is version %q", version, got)
	}
	if err := s.snaps.SetSnapshot(ctx, "mesh", res.Endpoints); err != nil {
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
