package xds

import (
	"context"
	"net"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/cellmesh/cellmesh/internal/xdsapi"
	"github.com/cellmesh/cellmesh/internal/xdsapi/cellmeshv1"
	"github.com/cellmesh/cellmesh/routing"
)

// A real ADS stream over gRPC gets the shard map and the clusters, ACKs
// them, and gets the next version when it is published; an older version
// is refused.
func TestADSStream(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s := NewServer(nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	defer s.Stop()

	m := localMap(t)
	eps := []Endpoint{{"echo", "us-east-1", "127.0.0.1:15201", "quic"}, {"echo", "eu-west-1", "127.0.0.1:15203", "quic"}}
	res, err := Build("1", m, eps)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(ctx, 1, res); err != nil {
		t.Fatal(err)
	}

	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	stream, err := discovery.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := &core.Node{Id: "sidecar-us-east-1"}
	recv := func(typeURL string) *discovery.DiscoveryResponse {
		t.Helper()
		for {
			r, err := stream.Recv()
			if err != nil {
				t.Fatalf("waiting for %s: %v", typeURL, err)
			}
			if r.TypeUrl == typeURL {
				return r
			}
		}
	}
	shardMap := func(r *discovery.DiscoveryResponse) *routing.Topology {
		t.Helper()
		if len(r.Resources) != 1 {
			t.Fatalf("%d shard map resources, want 1", len(r.Resources))
		}
		var sm cellmeshv1.ShardMap
		if err := r.Resources[0].UnmarshalTo(&sm); err != nil {
			t.Fatal(err)
		}
		topo, err := xdsapi.ToTopology(&sm)
		if err != nil {
			t.Fatal(err)
		}
		return topo
	}

	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: ShardMapType}); err != nil {
		t.Fatal(err)
	}
	r := recv(ShardMapType)
	if got := shardMap(r); got.Version != 1 {
		t.Fatalf("topology version %d, want 1", got.Version)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: ShardMapType, VersionInfo: r.VersionInfo, ResponseNonce: r.Nonce}); err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&discovery.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if c := recv(resource.ClusterType); len(c.Resources) != 2 || c.VersionInfo != "1" {
		t.Fatalf("%d clusters at version %q, want 2 at 1", len(c.Resources), c.VersionInfo)
	}

	// Shard 7 moves: the next version reaches the open stream.
	next := m.Topology()
	next.Version = 2
	for i := range next.Assignments {
		if a := &next.Assignments[i]; a.Shard == 7 {
			a.Primary, a.Standbys, a.Epoch = "eu-west-1", []string{"us-east-1"}, 2
		}
	}
	m2, err := routing.Compile(next)
	if err != nil {
		t.Fatal(err)
	}
	res2, err := Build("2", m2, eps)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Publish(ctx, 2, res2); err != nil {
		t.Fatal(err)
	}
	got := shardMap(recv(ShardMapType))
	if got.Version != 2 {
		t.Fatalf("pushed topology version %d, want 2", got.Version)
	}
	for _, a := range got.Assignments {
		if a.Shard == 7 && (a.Primary != "eu-west-1" || a.Epoch != 2) {
			t.Fatalf("pushed shard 7 on %s at epoch %d, want eu-west-1 at 2", a.Primary, a.Epoch)
		}
	}
	if err := s.Publish(ctx, 2, res2); err == nil {
		t.Fatal("the same version was published twice")
	}
	if err := s.Publish(ctx, 1, res); err == nil {
		t.Fatal("an older version was published")
	}
}
